"""What a child may put on the caller's terminal (nsnet/children.py): its
log lines pass through the supervisor, which replaces control characters,
so a compromised child cannot send escape sequences (retitle the window,
rewrite the screen, answerback tricks) to the user's terminal.  And a
child's stdio never is a terminal."""
from __future__ import annotations

import os
import pty
import resource

import pytest

from nsnet import children


@pytest.fixture
def log_pipe(monkeypatch, capsys):
    """The supervisor's end of a log pipe; what copy_log shows, via capsys."""
    r, w = os.pipe2(os.O_NONBLOCK)
    monkeypatch.setattr(children, "_log_r", r)
    monkeypatch.setattr(children, "_log_w", w)
    yield w, capsys
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("raw,shown", [
    (b"nsnet: relay: fine\n", "nsnet: relay: fine\n"),
    (b"\x1b]0;owned\x07title\n", "?]0;owned?title\n"),          # OSC: window title
    (b"\x1b[2J\x1b[Hcleared\r\n", "?[2J?[Hcleared?\n"),        # CSI, carriage return
    ("\u009b31mred\n".encode(), "?31mred\n"),                   # C1 CSI, UTF-8 encoded
    (b"tab\tok\x7f\x00\n", "tab\tok??\n"),                      # DEL, NUL
    (b"\xff\xfe bad utf-8\n", "\ufffd\ufffd bad utf-8\n"),
])
def test_child_log_sanitised(log_pipe, raw, shown):
    w, out = log_pipe
    os.write(w, raw)
    children.copy_log()
    assert out.readouterr().err == shown


def test_copy_log_bounded_and_nonblocking(log_pipe):
    w, out = log_pipe
    children.copy_log()  # nothing there: returns at once
    os.write(w, b"x" * (children.LOG_CHUNK + 100))
    children.copy_log()
    assert len(out.readouterr().err) == children.LOG_CHUNK  # one read per call


def test_detach_stdio_in_a_child():
    """A forked child that had a terminal on 0, 1 and 2 keeps none of them."""
    master, slave = pty.openpty()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            children.detach_stdio()
            code = 0 if not any(os.isatty(fd) for fd in (0, 1, 2)) else 3
        finally:
            os._exit(code)
    os.close(slave)
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0


def test_child_named_only_after_its_fds_are_closed(monkeypatch):
    """fork_child names the child (what a /proc watcher tells host-side
    children apart by) only once it holds nothing but `keep` and stdio: a
    forwarder must never be seen holding the supervisor's fds, such as the
    target's namespace files (seen in CI: test_ns_attack's HostWatch caught
    a just-forked 'nsnet-forwarder' with them)."""
    r, w = os.pipe()
    secret = os.open(os.devnull, os.O_RDONLY)  # stands for the namespace files

    def record_fds(name: str) -> None:  # runs in the child, at naming time
        os.write(w, (" ".join(sorted(os.listdir("/proc/self/fd"))) + "\n").encode())

    monkeypatch.setattr(children.linux, "set_process_name", record_fds)
    try:
        pid = children.fork_child("nsnet-test", lambda: 0, keep=[w])
        _, status = os.waitpid(pid, 0)
        os.close(w)
        w = -1
        seen = os.read(r, 4096).decode().split()
    finally:
        for fd in (r, w, secret):
            if fd >= 0:
                os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert seen, "the child was never named"
    assert str(secret) not in seen, seen


def test_fork_child_at_the_fd_limit():
    """A child forked while the supervisor is at its fd limit (lowered
    from outside: prlimit --pid) still gets its /dev/null stdio (stdin,
    replaced anyway, makes room) and runs: a forwarder restart at the
    limit does not fail in the child (tests/test_fd_limit.py)."""
    pid = os.fork()
    if pid == 0:  # the test's own limits stay as they are
        code = 1
        try:
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            top = max(int(n) for n in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + 8, hard))
            while True:  # every fd number below the limit taken
                try:
                    os.open(os.devnull, os.O_RDONLY)
                except OSError:
                    break
            child = children.fork_child("nsnet-test", lambda: 0)
            _, status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(status)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
