"""Issue 11, finding 4: the supervisor believes its children.

From the attacker's side: a child taken over (a forwarder compromised
through libslirp, a connector taken over from inside the namespace) is
played by the test, which steals the real child's control socket with
pidfd_getfd(2) and speaks on it: deeply nested JSON, a flood of events
while the supervisor waits for a reply, a forged tap_error, fields of the
wrong type.  nsnet must stay up, kill and replace the child as a crashed
one, and the namespace keeps its network.  And no request to a child
blocks the supervisor's loop: with the forwarder stopped, other API
clients are answered and SIGTERM ends nsnet at once.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import threading
import time

import psutil
import pytest

from harness import add_hostfwd, api_call, free_port, wait_until
from test_supervisor import (api, assert_gone, host_echo, info, ns_echo,  # noqa: F401
                             ns_script, wait_exit_exact)
import test_fastpath as fp
from test_fastpath import fnet, guest  # noqa: F401

pytestmark = pytest.mark.timeout(180)

_libc = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_GETFD = 438
NESTED = b"[" * 30000 + b"]" * 30000  # json.loads: RecursionError


@pytest.fixture
def impl(nsnet_impl):
    return nsnet_impl


def pidfd_getfd(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return new
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def steal_seqpacket(pid: int):
    """The child's one AF_UNIX SOCK_SEQPACKET socket (its control socket),
    taken over with pidfd_getfd: what the child sends, the test sends."""
    found = None
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            s = socket.socket(fileno=pidfd_getfd(pid, int(name)))
        except OSError:
            continue
        if s.family == socket.AF_UNIX and s.type == socket.SOCK_SEQPACKET and found is None:
            found = s
        else:
            s.close()
    assert found is not None, f"no control socket in pid {pid}"
    try:
        yield found
    finally:
        found.close()


def forwarded(net, ns_echo) -> int:  # noqa: F811
    port = free_port()
    add_hostfwd(net.api, "tcp", port, ns_echo(net.ns))
    assert host_echo(port)
    return port


def assert_replaced(net, old: int, port: int) -> None:
    """The old forwarder is gone (killed, reaped), a new one serves the
    forward, nsnet is up."""
    wait_until(lambda: info(net.api)["forwarder_pid"] not in (None, old)
               and info(net.api)["forwarder_state"] == "running", 15, what="a new forwarder")
    assert_gone([old])
    wait_until(lambda: host_echo(port), 15, what="the forward through the new forwarder")
    assert net.fwd.alive()


def test_nested_json_from_the_forwarder(connect, ns_echo, user):  # noqa: F811
    net = connect()
    port = forwarded(net, ns_echo)
    old = info(net.api)["forwarder_pid"]
    with steal_seqpacket(old) as ctl:
        ctl.send(NESTED)
        reply = api(net.api, "get_stats", timeout=30)  # the supervisor reads what came
    assert "return" in reply or "error" in reply
    assert_replaced(net, old, port)
    log = net.fwd.log()
    assert "broke the control protocol (message nested deeper" in log, log
    assert "RecursionError" not in log and "internal error" not in log, log


def test_event_flood_while_a_reply_is_awaited(connect, ns_echo, user):  # noqa: F811
    """The forwarder is stopped, so get_stats waits; meanwhile 'it' sends
    large events as fast as the supervisor takes them.  The supervisor
    keeps at most a few, kills the forwarder, and stops reading."""
    net = connect()
    port = forwarded(net, ns_echo)
    old = info(net.api)["forwarder_pid"]
    sup = psutil.Process(net.fwd.pid)
    rss0 = sup.memory_info().rss
    event = json.dumps({"event": "failed", "error": "x" * 1000}).encode()  # each one valid
    sent, peak = 0, rss0
    result: dict = {}
    with steal_seqpacket(old) as ctl:
        os.kill(old, signal.SIGSTOP)
        t = threading.Thread(target=lambda: result.update(api(net.api, "get_stats", timeout=30)))
        t.start()
        # Flood only once the request is pending: take it off the stolen
        # socket (the stopped forwarder would not read it anyway).  A flood
        # that starts first gets the forwarder replaced before get_stats
        # arrives, and the new forwarder answers it.
        ctl.settimeout(10)
        req = json.loads(ctl.recv(65536))
        assert req.get("op") == "stats", req
        ctl.settimeout(2)
        try:
            for i in range(5000):
                ctl.send(event)
                sent += 1
                if i % 50 == 0:
                    peak = max(peak, sup.memory_info().rss)
        except OSError:
            pass  # the supervisor hung up on 'us'
        t.join(30)
    peak = max(peak, sup.memory_info().rss)
    print(f"\n[flood] sent {sent} messages before the supervisor hung up; "
          f"supervisor RSS {rss0 >> 20} -> peak {peak >> 20} MiB")
    assert sent < 5000, "the supervisor kept reading the flood"
    assert peak - rss0 < 32 << 20, (rss0, peak)
    assert "error" in result, result
    assert_replaced(net, old, port)
    assert "more than 8 events" in net.fwd.log()


def test_forged_tap_error_does_not_end_nsnet(connect, ns_echo, user):  # noqa: F811
    """'The TAP failed', says the forwarder, and dies: the supervisor asks
    its own TAP fd, finds it attached, and restarts the forwarder."""
    net = connect()
    port = forwarded(net, ns_echo)
    old = info(net.api)["forwarder_pid"]
    with steal_seqpacket(old) as ctl:
        ctl.send(json.dumps({"event": "tap_error",
                             "error": "EBADFD: File descriptor in bad state"}).encode())
        time.sleep(0.2)  # let the supervisor read it first (either order must work)
        os.kill(old, signal.SIGKILL)
    assert_replaced(net, old, port)
    log = net.fwd.log()
    assert "reported a TAP failure (EBADFD: File descriptor in bad state), but the TAP " \
           "is attached" in log, log
    assert "the interface is gone" not in log
    assert info(net.api)["tap"]["name"] == "tap0"


@pytest.mark.parametrize("forged", [
    {"reply_to": "1", "ok": "yes"},                              # strings for int/bool
    {"event": "ready", "pid": "1", "failed_forwards": {"1": 1}},  # dict for a list
    {"event": "tap_error", "error": ["EBADFD"]},                 # list for a string
    {"reply_to": 999999, "ok": True},                            # answers nothing asked
], ids=["reply-types", "ready-types", "tap-error-list", "unsolicited"])
def test_wrong_field_types(connect, ns_echo, forged):  # noqa: F811
    net = connect()
    port = forwarded(net, ns_echo)
    old = info(net.api)["forwarder_pid"]
    with steal_seqpacket(old) as ctl:
        os.kill(old, signal.SIGSTOP)  # only 'our' messages reach the supervisor
        ctl.send(json.dumps(forged).encode())
        t0 = time.monotonic()
        reply = api(net.api, "get_stats", timeout=30)
    # The supervisor reads the forged message at once (before or while
    # get_stats asks): an error for this request, or the new forwarder's
    # answer; never the 5 s timeout of a hung forwarder.
    assert ("return" in reply or reply["error"]["desc"].startswith(
        "bad request: get_stats: forwarder")), reply
    assert "did not answer" not in json.dumps(reply) and time.monotonic() - t0 < 4.5, reply
    assert_replaced(net, old, port)
    assert "broke the control protocol" in net.fwd.log()


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_requests_to_children_do_not_block_the_loop(connect, ns_echo):  # noqa: F811
    """The forwarder stopped: one get_stats waits for it, while other API
    clients are answered at once and SIGTERM ends nsnet promptly."""
    net = connect()
    forwarded(net, ns_echo)
    old = info(net.api)["forwarder_pid"]
    os.kill(old, signal.SIGSTOP)
    try:
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(
            r=api_call(net.api, {"execute": "get_stats"}, timeout=30)))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.3)  # get_stats is in: the supervisor waits for the forwarder
        entries = api(net.api, "list_hostfwd")["entries"]
        assert len(entries) == 1
        got = info(net.api)
        assert got["forwarder_pid"] == old
        iface = api(net.api, "get_info", interface=True, timeout=15)["return"]["interface"]
        assert iface.get("ifname") == "tap0", iface
        assert t.is_alive(), "get_stats was answered before the others: not concurrent"
        net.fwd.proc.send_signal(signal.SIGTERM)
        t_exit = wait_exit_exact(net.fwd.proc, 10)
        assert t_exit - t0 < 5.0, "SIGTERM waited for the forwarder's request deadline"
        t.join(10)
        assert not t.is_alive()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
    assert f"exiting: received SIGTERM (exit 0)" in net.fwd.log()


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_forged_connector_reply_does_not_crash_the_relay(fnet, guest):  # noqa: F811
    """The connector, inside the namespace, is taken over (pidfd_getfd on
    its socket to the relay) and answers with a list as tag: the relay
    drops that connector and keeps running; a new connector serves."""
    fwd, apipath = fnet
    srv = guest("echo")
    port = free_port()
    fp.added(apipath, port, srv.port)
    fp.echo_check(port, 10_000)
    kids = fp.children(fwd.pid)
    relay, conn = kids["nsnet-relay"], kids["nsnet-connect"]
    with steal_seqpacket(conn) as s:
        s.send(json.dumps({"tag": [1], "ok": True}).encode())
        wait_until(lambda: fp.children(fwd.pid).get("nsnet-connect", conn) != conn, 15,
                   what="a new connector")
    assert fp.children(fwd.pid)["nsnet-relay"] == relay, "the relay died"
    wait_until(lambda: fp._echo_ok(port), 15, what="the forward through the new connector")
    assert fwd.alive()
    assert "the connector broke its protocol" in fwd.log()


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_stopped_relay_does_not_block_the_loop(fnet, guest):  # noqa: F811
    """The fast path's relay stopped: a get_stats waits for its counters
    (5 s, then the relay is killed and replaced) while another client's
    list_hostfwd is answered at once."""
    fwd, apipath = fnet
    srv = guest("echo")
    port = free_port()
    fp.added(apipath, port, srv.port)
    fp.echo_check(port, 10_000)
    relay = fp.children(fwd.pid)["nsnet-relay"]
    os.kill(relay, signal.SIGSTOP)
    try:
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(json.loads(
            api_call(apipath, {"execute": "get_stats"}, timeout=30))))
        t.start()
        time.sleep(0.3)  # get_stats is in: the supervisor waits for the relay
        entries = json.loads(api_call(apipath, {"execute": "list_hostfwd"}))["entries"]
        assert [e["host_port"] for e in entries] == [port]
        assert t.is_alive(), "get_stats was answered before list_hostfwd: not concurrent"
        t.join(30)
        assert "did not answer" in result["return"]["fastpath"]["error"], result
        wait_until(lambda: fp.children(fwd.pid).get("nsnet-relay", relay) != relay, 15,
                   what="a new relay")
        wait_until(lambda: fp._echo_ok(port), 15, what="the forward after the relay's restart")
    finally:
        if fp.alive(relay):
            os.kill(relay, signal.SIGCONT)
    assert fwd.alive()
