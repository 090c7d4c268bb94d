"""The fast path for published ports: add_hostfwd "mode":"splice".

nsnet accepts on the host side, a connector inside the namespace connects
to the guest port on the namespace's TAP address (its loopback only when the
request names it), and a splice(2) relay moves
the bytes (nsnet/supervisor/fastpath.py, csrc/relay.c, docs/fastpath.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
from harness import (HarnessError, api_call, free_port, kill_and_reap, payload, read_line,
                     sha256, tcp_send, wait_until)

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20
UNPRIV = pytest.mark.parametrize("user", ["unpriv"], indirect=True)
TAKEN = b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}'

# A concurrent TCP server run inside the namespace (stdlib only).  One
# thread per connection; one JSON line per finished connection.
#   echo        echo until EOF, then close
#   sink        read to EOF, answer "<count> <sha256>\n", close
#   source:N    send N random bytes, close (without reading)
SERVER = r'''
import hashlib, json, os, socket, sys, threading
addr, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()
def emit(obj):
    with lock:
        print(json.dumps(obj), flush=True)
def serve(conn, peer):
    with conn:
        conn.settimeout(60)
        if mode.startswith("source:"):
            data = os.urandom(int(mode.split(":")[1]))
            conn.sendall(data)
            emit({"peer": peer[0], "sent": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            return
        h, n = hashlib.sha256(), 0
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            n += len(data)
            if mode == "echo":
                conn.sendall(data)
            else:
                h.update(data)
        if mode == "sink":
            conn.sendall(f"{n} {h.hexdigest()}\n".encode())
        emit({"peer": peer[0], "received": n})
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
ls = socket.socket(fam, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, port))
ls.listen(512)
print("READY", ls.getsockname()[1], flush=True)
while True:
    c, p = ls.accept()
    threading.Thread(target=serve, args=(c, p), daemon=True).start()
'''


class GuestServer:
    def __init__(self, ns, base_dir: str, addr: str, mode: str):
        script = Path(base_dir) / "fpserver.py"
        if not script.exists():
            script.write_text(SERVER)
            script.chmod(0o644)
        self.proc = ns.popen([harness.NS_PYTHON, str(script), addr, 0, mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = read_line(self.proc.stdout, 15)
            if not line.startswith(b"READY"):
                raise HarnessError(f"guest server did not start: {line!r}")
        except BaseException:
            self.close()
            raise
        self.port = int(line.split()[1])
        self.buf = line[line.index(b"\n") + 1:]

    def records(self, count: int, timeout: float = 30) -> list[dict]:
        """The first `count` per-connection records."""
        deadline = time.monotonic() + timeout
        while self.buf.count(b"\n") < count:
            chunk = read_line(self.proc.stdout, max(0.1, deadline - time.monotonic()))
            if not chunk:
                raise HarnessError(f"guest server exited: {self.buf!r}")
            self.buf += chunk
        return [json.loads(x) for x in self.buf.splitlines()[:count]]

    def close(self) -> None:
        kill_and_reap(self.proc)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def guest(ns, base_dir):
    servers: list[GuestServer] = []

    def make(mode: str, addr: str = "0.0.0.0", target=None) -> GuestServer:
        srv = GuestServer(target or ns, base_dir, addr, mode)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


@pytest.fixture
def fnet(nsnet_impl, ns, start_fwd, workdir):
    """nsnet attached to ns, with an API socket."""
    api = os.path.join(workdir, "nsnet.sock")
    fwd = start_fwd(nsnet_impl, ["--configure", "--api-socket", api, ns.pid, "tap0"])
    return fwd, api


def add(api: str, host_port: int, guest_port: int, mode: str | None = "splice",
        proto: str = "tcp", host_addr: str = "127.0.0.1", **extra) -> bytes:
    args = {"proto": proto, "host_addr": host_addr, "host_port": host_port,
            "guest_port": guest_port, **extra}
    if mode is not None:
        args["mode"] = mode
    return api_call(api, {"execute": "add_hostfwd", "arguments": args})


def added(api: str, host_port: int, guest_port: int, **kw) -> int:
    reply = json.loads(add(api, host_port, guest_port, **kw))
    assert "return" in reply, reply
    return reply["return"]["id"]


def children(pid: int) -> dict[str, int]:
    """comm -> pid of the live direct children of pid."""
    out = {}
    for kid in harness.child_pids(pid):
        try:
            if alive(kid):
                out[Path(f"/proc/{kid}/comm").read_text().strip()] = kid
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def relay_stats(api: str) -> dict:
    """The relay's counters, from get_stats."""
    return json.loads(api_call(api, {"execute": "get_stats"}))["return"]["fastpath"]


def assert_relay_idle(api: str, relay: int, base_fds: int, **expect: int) -> None:
    """Once the relay counts no active pair, its counters are as expected,
    no pair was reset or failed, and it holds exactly its baseline fds."""
    wait_until(lambda: relay_stats(api)["active"] == 0, 10, what="no active pair")
    st = relay_stats(api)
    assert {k: st[k] for k in expect} == expect, st
    assert st["reset"] == st["failed"] == st["pending"] == 0, st
    fds = os.listdir(f"/proc/{relay}/fd")
    assert len(fds) == base_fds, (base_fds, sorted(os.readlink(f"/proc/{relay}/fd/{f}")
                                                   for f in fds))


def echo_check(port: int, nbytes: int, host: str = "127.0.0.1") -> None:
    data = payload(nbytes)
    got = tcp_send(host, port, data)
    assert len(got) == len(data) and sha256(got) == sha256(data)


# ---------------------------------------------------------------------------


def test_bulk_both_ways_sha256(fnet, guest):
    """16 MiB host->namespace and 16 MiB namespace->host, verified by sha256;
    the guest server sees the namespace's own address as peer (the
    documented trade-off)."""
    _fwd, api = fnet
    sink, source = guest("sink"), guest(f"source:{16 * MIB}")
    up, down = free_port(), free_port()
    assert add(api, up, sink.port) == b'{"return":{"id":1}}'
    assert add(api, down, source.port) == b'{"return":{"id":2}}'
    data = payload(16 * MIB)
    reply = tcp_send("127.0.0.1", up, data)
    assert reply.decode().split() == [str(len(data)), sha256(data)]
    got = tcp_send("127.0.0.1", down, b"")
    rec = source.records(1)[0]
    assert len(got) == rec["sent"] == 16 * MIB
    assert sha256(got) == rec["sha256"]
    assert sink.records(1)[0]["peer"] == "10.0.2.100"
    entries = json.loads(api_call(api, {"execute": "list_hostfwd"}))["entries"]
    assert entries == [
        {"id": 1, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": up,
         "guest_addr": "10.0.2.100", "guest_port": sink.port, "mode": "splice"},
        {"id": 2, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": down,
         "guest_addr": "10.0.2.100", "guest_port": source.port, "mode": "splice"},
    ]


@UNPRIV
def test_many_concurrent_connections(fnet, guest):
    """200 connections at once, each echoing 64 KiB, all verified; the relay
    holds no fd for any of them afterwards."""
    fwd, api = fnet
    srv = guest("echo")
    port = free_port()
    added(api, port, srv.port)
    echo_check(port, 1000)  # starts the relay
    relay = children(fwd.pid)["nsnet-relay"]
    # The client sees EOF a moment before the relay closes the pair: the
    # baseline is taken once the relay counts no active pair.
    wait_until(lambda: relay_stats(api)["active"] == 0, 10, what="the first pair closed")
    base_fds = fd_count(relay)
    n, size = 200, 64 * 1024
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def one() -> None:
        try:
            start.wait(30)
            echo_check(port, size)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [t for t in threads if t.is_alive()], "clients still running"
    assert not errors, errors[:3]
    assert sum(r["received"] for r in srv.records(n + 1)) == n * size + 1000
    assert_relay_idle(api, relay, base_fds, total=n + 1, closed=n + 1,
                      bytes_in=n * size + 1000, bytes_out=n * size + 1000)


@UNPRIV
def test_half_close_client_still_gets_reply(fnet, guest):
    fwd, api = fnet
    srv = guest("sink")
    port = free_port()
    added(api, port, srv.port)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        data = payload(3 * MIB)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.2)  # stay half-closed for a while: nothing may close early
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.decode().split() == [str(len(data)), sha256(data)]


@UNPRIV
def test_server_side_close(fnet, guest):
    """The guest server sends and closes first: the client reads everything,
    then EOF, without having shut down its side; then the pair is gone."""
    fwd, api = fnet
    srv = guest(f"source:{MIB}")
    port = free_port()
    added(api, port, srv.port)
    relay = children(fwd.pid)["nsnet-relay"]
    base_fds = fd_count(relay)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        got = b""
        while chunk := s.recv(1 << 16):
            got += chunk
        assert hashlib.sha256(got).hexdigest() == srv.records(1)[0]["sha256"]
        assert len(got) == MIB
    assert_relay_idle(api, relay, base_fds, total=1, closed=1, bytes_in=0, bytes_out=MIB)


def test_no_listener_on_guest_port(fnet, guest):
    """Nothing listens on the guest port: the client sees the connection
    closed (reset), nsnet stays up, and other forwards keep working."""
    fwd, api = fnet
    dead_port = free_port()  # a port of this netns: nothing listens on it in ns either
    port = free_port()
    added(api, port, dead_port)
    for _ in range(3):
        try:  # the reset can come before connect() returns (a race on loopback)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"hello")
                assert s.recv(10) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert fwd.alive()
    srv = guest("echo")
    good = free_port()
    added(api, good, srv.port)
    echo_check(good, 100_000)


def test_refused_connections_logged_at_debug(nsnet_impl, ns, start_fwd, workdir):
    """Issue 14: at debug level, one line per connection the guest refused
    (nothing listens on the guest port), with the errno and the client;
    counted in get_stats' fastpath.refused; none at the default level.  The
    debug run has the relay sandboxed and under its seccomp list, which the
    logging must fit (a killed relay would be restarted with its count at 0)."""
    lines = {}
    for level in ("debug", "info"):
        api = os.path.join(workdir, f"{level}.sock")
        confine = ["--enable-sandbox", "--enable-seccomp"] if level == "debug" else []
        fwd = start_fwd(nsnet_impl, ["--configure", f"--log-level={level}", "--log-format=json",
                                     *confine, "--api-socket", api, ns.pid, "tap0"])
        port, dead_port = free_port(), free_port()
        added(api, port, dead_port)
        for _ in range(3):
            assert harness.refused_through(port)
        wait_until(lambda: relay_stats(api)["refused"] == 3, 10, what="3 refusals counted")
        if level == "debug":
            wait_until(lambda: fwd.log().count('"fastpath_refused"') == 3, 10,
                       what="3 debug lines")
        log = [json.loads(ln) for ln in fwd.log().splitlines() if ln.startswith("{")]
        lines[level] = (port, dead_port, [e for e in log if e.get("event") == "fastpath_refused"],
                        [e for e in log if e.get("level") in ("warning", "error")])
        fwd.stop()
    assert lines["info"][2] == []
    port, dead_port, debug, trouble = lines["debug"]
    assert trouble == []  # no relay killed by seccomp, nothing restarted
    for e in debug:
        assert (e["level"], e["errno"], e["host_port"], e["guest_port"]) == \
            ("debug", "ECONNREFUSED", port, dead_port), e
        assert e["client"].startswith("127.0.0.1:"), e
        assert e["msg"].startswith(f"fast path: the guest refused 10.0.2.100:{dead_port} "
                                   f"(forward 127.0.0.1:{port}/tcp): Connection refused "
                                   "(ECONNREFUSED)"), e
    assert len({e["client"] for e in debug}) == 3  # one line per connection


def test_loopback_only_server_stays_private(fnet, guest, ns):
    """Issue 11 item 3: a default splice forward connects to the guest's
    TAP address, as libslirp's forwards do: a server bound only to the
    namespace's 127.0.0.1 is NOT reachable through it, one bound to the TAP
    address is; naming the loopback in guest_addr reaches the former."""
    _fwd, api = fnet
    private = guest("echo", addr="127.0.0.1")
    public = guest("echo", addr="10.0.2.100")
    p_private, p_public, p_named = free_port(), free_port(), free_port()
    added(api, p_private, private.port)
    added(api, p_public, public.port)
    for _ in range(3):
        assert harness.refused_through(p_private)
    echo_check(p_public, 10_000)
    added(api, p_named, private.port, guest_addr="127.0.0.1")
    echo_check(p_named, 10_000)
    entries = json.loads(api_call(api, {"execute": "list_hostfwd"}))["entries"]
    assert [e["guest_addr"] for e in entries] == ["10.0.2.100", "10.0.2.100", "127.0.0.1"]
    assert public.records(1)[0]["peer"] == "10.0.2.100"
    assert private.records(1)[0]["peer"] == "127.0.0.1"


def test_remove_closes_listener_ids_shared(fnet, guest):
    fwd, api = fnet
    srv = guest("echo", addr="0.0.0.0")
    slirp_port, splice_port = free_port(), free_port()
    assert add(api, slirp_port, srv.port, mode=None) == b'{"return":{"id":1}}'
    assert add(api, splice_port, srv.port) == b'{"return":{"id":2}}'
    echo_check(slirp_port, 10_000)
    echo_check(splice_port, 10_000)
    remove = {"execute": "remove_hostfwd", "arguments": {"id": 2}}
    assert api_call(api, remove) == b'{"return":{}}'
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", splice_port), timeout=5).close()
    assert api_call(api, remove) == b'{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}'
    entries = json.loads(api_call(api, {"execute": "list_hostfwd"}))["entries"]
    assert [e["id"] for e in entries] == [1] and "mode" not in entries[0]
    assert add(api, splice_port, srv.port) == b'{"return":{"id":3}}'
    echo_check(splice_port, 10_000)
    echo_check(slirp_port, 10_000)


def test_port_taken_same_error_as_libslirp(fnet, guest):
    fwd, api = fnet
    srv = guest("echo")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        assert add(api, taken, srv.port) == TAKEN
        assert add(api, taken, srv.port, mode=None) == TAKEN
    # the same host port as an existing forward of either kind
    p1, p2 = free_port(), free_port()
    assert add(api, p1, srv.port, mode=None) == b'{"return":{"id":1}}'
    assert add(api, p1, srv.port) == TAKEN
    assert add(api, p2, srv.port) == b'{"return":{"id":2}}'
    assert add(api, p2, srv.port) == TAKEN
    assert add(api, p2, srv.port, mode=None) == TAKEN
    assert fwd.alive()
    echo_check(p2, 1000)


def test_mode_argument_errors(fnet):
    fwd, api = fnet
    port = free_port()
    assert add(api, port, 80, proto="udp") == (
        b'{"error":{"desc":"bad request: add_hostfwd: bad arguments.mode: '
        b'splice is for tcp only"}}')
    for bad in ("fast", 1, True, ["splice"]):
        assert add(api, port, 80, mode=bad) == (
            b'{"error":{"desc":"bad request: add_hostfwd: bad arguments.mode"}}')
    assert add(api, port, 80, mode="slirp") == b'{"return":{"id":1}}'
    assert json.loads(api_call(api, {"execute": "list_hostfwd"}))["entries"][0]["guest_addr"] \
        == "10.0.2.100"
    assert fwd.alive()


@UNPRIV
def test_survives_forwarder_kill(fnet, guest):
    """kill -9 of the libslirp forwarder: the supervisor restarts it; the fast
    path (listener and a connection open across the kill) does not notice."""
    fwd, api = fnet
    srv = guest("echo")
    port = free_port()
    added(api, port, srv.port)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        first = payload(256 * 1024)
        s.sendall(first)
        got = b""
        while len(got) < len(first):
            got += s.recv(1 << 16)
        old = children(fwd.pid)
        os.kill(old["nsnet-forwarder"], signal.SIGKILL)
        wait_until(lambda: children(fwd.pid).get("nsnet-forwarder", old["nsnet-forwarder"])
                   != old["nsnet-forwarder"], 15, what="a new forwarder")
        now = children(fwd.pid)
        assert now["nsnet-relay"] == old["nsnet-relay"]
        assert now["nsnet-connect"] == old["nsnet-connect"]
        second = payload(256 * 1024)
        s.sendall(second)
        s.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := s.recv(1 << 16):
            rest += chunk
        assert got == first and rest == second
    echo_check(port, MIB)
    assert fwd.alive()


@UNPRIV
def test_relay_and_connector_restart(fnet, guest):
    """A killed relay or connector is restarted, the listener re-created."""
    fwd, api = fnet
    srv = guest("echo")
    port = free_port()
    added(api, port, srv.port)
    echo_check(port, 10_000)
    for name in ("nsnet-connect", "nsnet-relay"):
        old = children(fwd.pid)[name]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: children(fwd.pid).get(name, old) != old, 15,
                   what=f"a new {name}")
        wait_until(lambda: _echo_ok(port), 15, what=f"the forward after {name} restart")
    assert fwd.alive()


def test_relay_and_connector_die_in_one_turn(fnet, guest):
    """The relay dies and its connector exits with it (its peer hung up)
    while nsnet is stopped, so that both deaths wake the same poll: nsnet
    replaces both once and stays responsive (it used to reap the new
    connector for the old one's event, blocking for good)."""
    fwd, api = fnet
    srv = guest("echo")
    port = free_port()
    added(api, port, srv.port)
    echo_check(port, 10_000)
    old = children(fwd.pid)
    os.kill(fwd.pid, signal.SIGSTOP)
    try:
        os.kill(old["nsnet-relay"], signal.SIGKILL)
        wait_until(lambda: not alive(old["nsnet-connect"]), 15,
                   what="the connector's exit after the relay's")
    finally:
        os.kill(fwd.pid, signal.SIGCONT)
    wait_until(lambda: all(children(fwd.pid).get(k, old[k]) != old[k]
                           for k in ("nsnet-relay", "nsnet-connect")), 15,
               what="a new relay and connector")
    wait_until(lambda: _echo_ok(port), 15, what="the forward after the restart")
    assert relay_stats(api)["listeners"] == 1
    assert fwd.alive()


@UNPRIV  # one user is enough: it waits out two request timeouts
def test_hung_relay_is_replaced(fnet, guest):
    """A relay that does not answer (stopped here) costs one get_stats its
    fast-path counters, after the request timeout; it is then killed and
    replaced, and the forward works again."""
    fwd, api = fnet
    srv = guest("echo")
    port = free_port()
    fid = added(api, port, srv.port)
    echo_check(port, 10_000)
    old = children(fwd.pid)["nsnet-relay"]
    os.kill(old, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        reply = json.loads(api_call(api, {"execute": "get_stats"}, timeout=30))["return"]
        waited = time.monotonic() - t0
        assert "did not answer" in reply["fastpath"]["error"], reply["fastpath"]
        assert reply["rx_frames"] > 0  # the forwarder's counters are still there
        assert waited >= 4, waited  # REQUEST_TIMEOUT (5 s), not an instant failure
        wait_until(lambda: children(fwd.pid).get("nsnet-relay", old) != old, 15,
                   what="a new relay")
        assert not alive(old)
        wait_until(lambda: _echo_ok(port), 15, what="the forward after the relay's restart")
        st = relay_stats(api)
        assert st["active"] == 0 and st["total"] >= 1, st
        # A remove that meets a hung relay still removes: the forward is
        # gone from the table and the next relay does not listen on it.
        old = children(fwd.pid)["nsnet-relay"]
        os.kill(old, signal.SIGSTOP)
        assert api_call(api, {"execute": "remove_hostfwd", "arguments": {"id": fid}},
                        timeout=30) == b'{"return":{}}'
        assert json.loads(api_call(api, {"execute": "list_hostfwd"}))["entries"] == []
        wait_until(lambda: children(fwd.pid).get("nsnet-relay", old) != old, 15,
                   what="a new relay after the remove")
        wait_until(lambda: not _echo_ok(port), 15, what="the removed port closed")
        assert fwd.alive()
    finally:
        if old in children(fwd.pid).values():  # the test failed before nsnet killed it
            os.kill(old, signal.SIGCONT)


def _echo_ok(port: int) -> bool:
    try:
        echo_check(port, 10_000)
    except OSError:
        return False
    return True


@UNPRIV
def test_children_die_with_supervisor(fnet, guest):
    """kill -9 of nsnet itself: the relay and the connector go too
    (PR_SET_PDEATHSIG), and the published port is closed."""
    fwd, api = fnet
    srv = guest("echo")
    port = free_port()
    added(api, port, srv.port)
    kids = children(fwd.pid)
    fwd.stop()
    for name in ("nsnet-relay", "nsnet-connect"):
        wait_until(lambda: not alive(kids[name]), 10, what=f"{name} to exit")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@UNPRIV
def test_ipv6_splice_forward(fnet, guest):
    fwd, api = fnet
    srv = guest("sink", addr="::1")
    port = free_port(family=socket.AF_INET6, addr="::1")
    assert add(api, port, srv.port, host_addr="::1", guest_addr="::1") == \
        b'{"return":{"id":1}}'
    data = payload(2 * MIB)
    assert tcp_send("::1", port, data).decode().split() == [str(len(data)), sha256(data)]
    entry = json.loads(api_call(api, {"execute": "list_hostfwd"}))["entries"][0]
    assert entry["guest_addr"] == "::1" and entry["mode"] == "splice"
