"""The relay's debug line for a fast-path connection the guest refused
(issue 14): what it says, that only the connector's errno number reaches
the log, and the rate limit (a fake clock; a real Relay on a socketpair)."""
from __future__ import annotations

import json
import socket

import pytest

from nsnet import log
from nsnet.forwards import Forward
from nsnet.host import relay as relay_mod

FWD = Forward("tcp", "127.0.0.1", 8080, "10.0.2.100", 80, mode="splice")
PEER = ("127.0.0.1", 40000)


@pytest.fixture
def relay():
    ctl, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r = relay_mod.Relay(ctl)
    now = [1000.0]
    r.clock = lambda: now[0]
    r.now = now
    yield r
    ctl.close()
    other.close()
    log.setup("info", "text")


def lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln]


def test_refused_line_at_debug_only(relay, capsys):
    log.setup("info", "text")
    relay._refused(FWD, PEER, 111)
    assert lines(capsys) == [] and relay.refused == 1
    log.setup("debug", "text")
    relay._refused(FWD, PEER, 111)
    assert lines(capsys) == [
        "nsnet: fast path: the guest refused 10.0.2.100:80 (forward 127.0.0.1:8080/tcp): "
        "Connection refused (ECONNREFUSED); the connection from 127.0.0.1:40000 was reset"]
    log.setup("debug", "json")
    relay._refused(FWD, ("::1", 40001, 0, 0), 110)
    [line] = map(json.loads, lines(capsys))
    assert (line["level"], line["event"], line["errno"], line["client"], line["host_port"],
            line["guest_port"]) == ("debug", "fastpath_refused", "ETIMEDOUT", "[::1]:40001",
                                    8080, 80)
    # No errno (or one that is not): "unknown error", nothing of the connector's text.
    log.setup("debug", "text")
    relay._refused(FWD, PEER, None)
    assert lines(capsys)[0].endswith("unknown error; the connection from 127.0.0.1:40000 "
                                     "was reset")
    assert relay.refused == 4


def test_refused_lines_rate_limited(relay, capsys):
    log.setup("debug", "text")
    for _ in range(25):  # within one second
        relay._refused(FWD, PEER, 111)
    assert len(lines(capsys)) == relay_mod.REFUSED_LOG_PER_SECOND
    relay.now[0] += 0.5
    relay._refused(FWD, PEER, 111)
    assert lines(capsys) == []
    relay.now[0] += 0.6  # a new second: the count of the hidden ones, then the line
    relay._refused(FWD, PEER, 111)
    out = lines(capsys)
    assert out[0] == ("nsnet: fast path: 16 more connections refused by the guest were not "
                      "logged (at most 10 lines a second)")
    assert len(out) == 2 and "ECONNREFUSED" in out[1]
    # the serve loop's turn says it too when no refusal follows
    for _ in range(12):
        relay._refused(FWD, PEER, 111)
    capsys.readouterr()
    relay.now[0] += 1.0
    relay._refused_window(relay.clock())
    assert lines(capsys) == ["nsnet: fast path: 3 more connections refused by the guest were "
                             "not logged (at most 10 lines a second)"]
    assert relay.refused == 25 + 1 + 1 + 12


def test_relay_exits_cleanly_under_its_seccomp_list():
    """The supervisor hangs up (it died, or closed the relay's socket): the
    relay, under its own seccomp list, exits 0 with a listener, the
    connector's socket and its reserve still open.  Before, those sockets
    were left to the interpreter, which repr()s them as it frees them
    (getpeername, not on the list): killed by SIGSYS.  A forked child runs
    relay_main (no sandbox, the "relay" filter; PR_SET_NO_NEW_PRIVS lets
    any user load it)."""
    import os
    import signal
    import time

    from nsnet import fdpass

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn_mine, conn_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ctl.close()
            conn_mine.close()
            code = relay_mod.relay_main(theirs, sandbox=False, seccomp=True)
        finally:
            os._exit(code)
    theirs.close()
    try:
        fwd = Forward("tcp", "127.0.0.1", port, "10.0.2.100", 80, mode="splice").to_dict()
        ctl.settimeout(10)
        ctl.send(json.dumps({"op": "add", "forward": fwd, "seq": 1}).encode())
        assert json.loads(ctl.recv(65536))["ok"] is True
        fdpass.send_fds(ctl, {"op": "connector", "seq": 2}, [conn_theirs.fileno()])
        assert json.loads(ctl.recv(65536))["ok"] is True
        ctl.close()  # the supervisor hangs up
        status = None
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the relay did not exit within 10 s")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
            f"relay ended by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
            else f"relay exited {os.WEXITSTATUS(status)}")
    finally:
        conn_mine.close()
        conn_theirs.close()
