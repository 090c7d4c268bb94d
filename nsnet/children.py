"""How nsnet starts its child processes: the namespace helpers, the
forwarder, and the fast path's relay and connector.

Each is forked from the single-threaded supervisor (so it may still join a
user namespace), dies with it (PR_SET_PDEATHSIG, and a check that the
parent did not die before the prctl), keeps no fd of the supervisor's but
the ones it is given, leaves terminal signals to the supervisor
(SIGINT and SIGHUP ignored, SIGTERM default, nothing blocked), and always
leaves through os._exit: it never returns into the supervisor's code.

Stdio: a child never holds the caller's terminal (with it, a compromised
child, even sandboxed, could push input into the user's shell with
TIOCSTI or change the terminal's settings).  Its stdin and stdout are
/dev/null.  Its stderr is the supervisor's when that is not a terminal (a
file, a pipe, the journal); when it is one, the supervisor opens a log
pipe before its first child (open_log_pipe), children write their log
lines there (non-blocking: a child drops a line rather than wait), and the
supervisor copies what arrives to the terminal with control characters
replaced (copy_log), so that no escape sequence of a child's reaches it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Callable, Iterable

from . import linux


def _close_fds_except(keep: Iterable[int]) -> None:
    lo = 3
    for fd in sorted(set(keep)):
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 1 << 20)  # close_range(2) where available


_log_r = -1  # the log pipe (supervisor: read end; children: write end)
_log_w = -1
LOG_CHUNK = 65536  # copy_log reads at most this much per call
# C0 controls but tab and newline, DEL, C1 controls: shown as "?".
_UNPRINTABLE = {c: "?" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (9, 10)}


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def open_log_pipe() -> int | None:
    """In the supervisor, before its first child: when stderr is a
    terminal, the pipe children log into; returns its read end, for the
    supervisor's loop (copy_log on POLLIN), or None (children then share
    the supervisor's stderr)."""
    global _log_r, _log_w
    if _log_r >= 0:
        return _log_r
    if not _isatty(2):
        return None
    _log_r, _log_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    return _log_r


def copy_log() -> None:
    """Copy what children logged (one read) to stderr, control characters
    replaced."""
    if _log_r < 0:
        return
    try:
        data = os.read(_log_r, LOG_CHUNK)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if data:
        try:
            sys.stderr.write(data.decode("utf-8", "replace").translate(_UNPRINTABLE))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def close_log_pipe() -> None:
    """At teardown, once the children are gone: copy what is left, close."""
    global _log_r, _log_w
    if _log_r < 0:
        return
    for _ in range(16):  # bounded: a writer may still be alive
        if not _readable(_log_r):
            break
        copy_log()
    for fd in (_log_r, _log_w):
        try:
            os.close(fd)
        except OSError:
            pass
    _log_r = _log_w = -1


def detach_stdio() -> None:
    """In a child: stdin and stdout on /dev/null; stderr on the log pipe
    when the supervisor has one, /dev/null if it is a terminal anyway,
    left alone otherwise.  Call it before closing the other fds."""
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        # Forked at the fd limit (lowered from outside): stdin, replaced
        # by /dev/null anyway, makes room; the open gets fd 0.
        os.close(0)
        null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if _log_w >= 0:
        os.dup2(_log_w, 2)
    elif _isatty(2):
        os.dup2(null, 2)
    if null > 2:
        os.close(null)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def fork_child(name: str, main: Callable[[], int], keep: Iterable[int] = (),
               rename: bool = True) -> int:
    """Fork a child that runs main() and exits with its return value; the
    child keeps only the fds in `keep` and stdio (detach_stdio). Returns the child's PID;
    raises OSError if the fork fails.  rename=False: main() execs a program
    that takes the name itself; until then the child keeps the
    supervisor's (and its memory: a watcher must not see, by its name, a
    namespace-side child with libslirp mapped)."""
    parent = os.getpid()
    keep = tuple(keep)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        linux.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before the prctl
            os._exit(1)
        _reset_signals()
        detach_stdio()
        _close_fds_except(keep)
        # Named only now: until its fds are closed the child still holds
        # the supervisor's (the target's namespace files among them), and a
        # watcher of /proc must never see a host-side child, by its name,
        # holding them.
        if rename:
            linux.set_process_name(name)
        code = main()
    except BrokenPipeError:
        pass  # the supervisor gave up on this child first; it says why
    except BaseException as e:
        try:
            from . import log

            log.get("nsnet").error(f"{name}: {e!r}")
        except BaseException:
            pass
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid  # not reached
