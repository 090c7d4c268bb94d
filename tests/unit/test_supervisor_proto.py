"""The supervisor's side of the forwarder's control protocol, driven over a
real socketpair by a fake forwarder (the test), with a real child process
(`sleep`) standing in for the forwarder's PID: a protocol error kills that
child (as a crash would end it) and never raises in the supervisor; the
supervisor's memory stays bounded under a flood; requests never block."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time

import pytest

from nsnet.forwards import Forward, ForwardError, ForwardTable
from nsnet.proto import forwarder as fwproto
from nsnet.supervisor import api
from nsnet.supervisor.forwarder import ForwarderControl, _Forwarder, tap_state
from nsnet.supervisor.tasks import Future, run_task, wait


class FakeSupervisor(ForwarderControl):
    """ForwarderControl with what it needs of the Supervisor, nothing else."""

    def __init__(self):
        self.log = logging.getLogger("test.supervisor")
        self.forwards = ForwardTable()
        self.forwards.add(Forward("tcp", "127.0.0.1", 8080, "10.0.2.100", 80))
        self.fwd = None
        self.inactive_forwards = set()
        self.outage_since = None


@pytest.fixture
def child():
    """A real process in the forwarder's place: protocol errors kill it."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture
def link(child):
    """(supervisor, forwarder handle, the fake forwarder's socket end)."""
    sup = FakeSupervisor()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fwd = _Forwarder(child.pid, mine, time.monotonic())
    sup.fwd = fwd
    yield sup, fwd, theirs
    theirs.close()
    fwd.close()


def send(sock: socket.socket, obj) -> None:
    sock.send(obj if isinstance(obj, bytes) else json.dumps(obj).encode())


def killed(proc: subprocess.Popen) -> bool:
    try:
        return proc.wait(5) == -9
    except subprocess.TimeoutExpired:
        return False


READY = {"event": "ready", "pid": 4242, "failed_forwards": []}


def become_ready(sup, fwd, theirs):
    send(theirs, READY)
    sup._on_forwarder_readable()
    assert fwd.ready and not fwd.broken


@pytest.mark.parametrize("garbage", [
    b"[" * 30000 + b"]" * 30000,                    # RecursionError in json.loads
    b'{"event":' * 20000 + b"1" + b"}" * 20000,
    b"\xff\xfe garbage",
    b"not json",
    json.dumps({"event": "ready", "pid": "12", "failed_forwards": {}}).encode(),
    json.dumps({"event": "ready", "pid": 12, "failed_forwards": [99]}).encode(),  # not given
    json.dumps({"reply_to": 77, "ok": True}).encode(),  # answers nothing pending
    json.dumps({"reply_to": "1", "ok": "true"}).encode(),
    json.dumps([{"event": "ready"}]).encode(),
])
def test_bad_message_kills_the_child_never_raises(link, child, garbage):
    sup, fwd, theirs = link
    become_ready(sup, fwd, theirs)
    pending = sup._forwarder_request({"op": "stats"})
    send(theirs, garbage)
    sup._on_forwarder_readable()  # must not raise
    assert fwd.broken
    assert killed(child)
    assert pending.done and isinstance(pending.error, ForwardError)
    assert "protocol error" in fwd.error_text()
    # condemned: no more reading, no new request
    with pytest.raises(ForwardError):
        sup._forwarder_request({"op": "stats"})
    assert fwd.receive() is None


def test_event_flood_is_bounded(link, child):
    """A chatty forwarder while a request waits: at most MAX_EVENTS are
    kept, then it is killed; the rest is never read into memory."""
    sup, fwd, theirs = link
    become_ready(sup, fwd, theirs)
    pending = sup._forwarder_request({"op": "stats"})
    theirs.setblocking(False)
    sent = 0
    try:
        for _ in range(10000):
            send(theirs, {"event": "failed", "error": "x" * 1000})
            sent += 1
    except BlockingIOError:
        pass
    for _ in range(10):
        sup._on_forwarder_readable()
    assert sent > fwproto.MAX_EVENTS
    assert fwd.broken and "more than" in fwd.broken
    assert len(fwd.events) <= fwproto.MAX_EVENTS + 1
    assert killed(child)
    assert isinstance(pending.error, ForwardError)


def test_second_ready_is_a_protocol_error(link, child):
    sup, fwd, theirs = link
    become_ready(sup, fwd, theirs)
    send(theirs, READY)
    sup._on_forwarder_readable()
    assert fwd.broken and "second ready" in fwd.broken
    assert killed(child)


def test_replies_settle_requests_in_order(link, child):
    sup, fwd, theirs = link
    # requests made while it starts are sent once it is ready
    first = sup._forwarder_request({"op": "ping"})
    assert not first.done and fwd.pending == {}
    become_ready(sup, fwd, theirs)
    second = sup._forwarder_request({"op": "stats"})
    reqs = [json.loads(theirs.recv(65536)) for _ in range(2)]
    assert [r["op"] for r in reqs] == ["ping", "stats"]
    send(theirs, {"reply_to": reqs[0]["seq"], "ok": True})
    send(theirs, {"reply_to": reqs[1]["seq"], "ok": True, "stats": {"rx_frames": 3},
                  "connections": "", "connections_total": 0})
    sup._on_forwarder_readable()
    assert first.value == {"reply_to": reqs[0]["seq"], "ok": True}
    assert second.value["stats"] == {"rx_frames": 3}
    assert not fwd.broken and child.poll() is None


def test_out_of_order_reply_is_a_protocol_error(link, child):
    sup, fwd, theirs = link
    become_ready(sup, fwd, theirs)
    sup._forwarder_request({"op": "ping"})
    sup._forwarder_request({"op": "ping"})
    seqs = [json.loads(theirs.recv(65536))["seq"] for _ in range(2)]
    send(theirs, {"reply_to": seqs[1], "ok": True})
    sup._on_forwarder_readable()
    assert fwd.broken and "earlier request" in fwd.broken
    assert killed(child)


def test_stats_reply_without_stats_is_a_protocol_error(link, child):
    sup, fwd, theirs = link
    become_ready(sup, fwd, theirs)
    fut = sup._forwarder_request({"op": "stats"})
    seq = json.loads(theirs.recv(65536))["seq"]
    send(theirs, {"reply_to": seq, "ok": True})
    sup._on_forwarder_readable()
    assert fwd.broken and isinstance(fut.error, ForwardError)


def test_a_request_never_waits_in_the_caller(link, child):
    """The forwarder does not answer (stopped): the request returns a
    Future at once; its deadline, checked by the loop, kills the child."""
    sup, fwd, theirs = link
    become_ready(sup, fwd, theirs)
    t0 = time.monotonic()
    fut = sup._forwarder_request({"op": "stats"})
    assert time.monotonic() - t0 < 1.0 and not fut.done
    deadline = fwd.next_deadline()
    assert deadline is not None
    sup._check_start_timeout(deadline - 0.001)
    assert not fut.done
    sup._check_start_timeout(deadline)
    assert isinstance(fut.error, ForwardError) and "did not answer" in str(fut.error)
    assert killed(child)


def test_tap_state_uses_the_fd_itself(tmp_path):
    """Not a TAP (here: a plain file): the supervisor's own ioctl says so."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert tap_state(fd) is not None
    finally:
        os.close(fd)
    assert "EBADF" in tap_state(fd)


# -- the API as a task: other clients are served while one waits -----------------------

class AsyncBackend:
    default_guest_addr = "10.0.2.100"
    default_guest_addr6 = None

    def __init__(self):
        self.stats_reply = Future()
        self.table = ForwardTable()

    def api_list_forwards(self):
        return self.table.items()

    def api_info(self, interface=False):
        return {"version": "x"}

    def api_stats(self):
        reply = yield self.stats_reply
        return reply

    def api_add_forward(self, fwd):
        yield from wait(None)
        raise ForwardError("refused")


def test_api_task_waits_for_the_child_and_others_are_answered():
    be = AsyncBackend()
    out = []
    run_task(api.handle_task(b'{"execute":"get_stats"}', be), lambda v, e: out.append((v, e)))
    assert out == []  # waiting for the child
    assert api.handle(b'{"execute":"list_hostfwd"}', be) == (
        b'{"entries":[],"return":{"entries":[]}}')
    be.stats_reply.resolve({"rx": 1})
    assert out == [(b'{"return":{"rx":1}}', None)]


def test_api_task_child_error_becomes_an_error_reply():
    be = AsyncBackend()
    out = []
    run_task(api.handle_task(b'{"execute":"get_stats"}', be), lambda v, e: out.append((v, e)))
    be.stats_reply.fail(api.ApiError("get_stats: forwarder: did not answer"))
    assert out == [(b'{"error":{"desc":"bad request: get_stats: forwarder: did not answer"}}',
                    None)]
    reply = api.handle(json.dumps({"execute": "add_hostfwd", "arguments": {
        "proto": "tcp", "host_port": 8080, "guest_port": 80}}).encode(), be)
    assert reply == b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}'


def test_audit_events_are_a_stream_not_counted(link, child):
    """Egress-policy audit events: handed on as they come, never kept, so
    many of them are no flood; a malformed one is a protocol error."""
    sup, fwd, theirs = link
    become_ready(sup, fwd, theirs)
    seen = []
    fwd.on_audit = seen.append
    record = {"time": 1.5, "proto": "udp", "src": "10.0.2.100", "dst": "10.0.2.3",
              "action": "allow", "rule": None, "sport": 5353, "dport": 53}
    for _ in range(3 * fwproto.MAX_EVENTS):
        send(theirs, {"event": "audit", "records": [record]})
        sup._on_forwarder_readable()
    assert len(seen) == 3 * fwproto.MAX_EVENTS and not fwd.broken
    assert len(fwd.events) == 1  # ready
    send(theirs, {"event": "audit", "records": [dict(record, dport="53")]})
    sup._on_forwarder_readable()
    assert fwd.broken and killed(child)
