"""The API socket under abuse, and its safe defaults.

Every answer must be a valid JSON object (an error, or a real reply) or a
closed connection; nsnet must stay up; traffic through the namespace must
keep flowing meanwhile - the API is served by the supervisor process, the
data path by the forwarder process, so even a supervisor frozen with
SIGSTOP does not stop packets."""
import json
import os
import random
import signal
import socket
import stat
import subprocess
import threading

import pytest

from harness import (add_hostfwd, api_call, free_port, payload, sha256,
                     tcp_send)

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.parametrize("user", ["unpriv"], indirect=True)]
nsnet_only = pytest.mark.parametrize("impl", ["nsnet"], indirect=True)

GW = "10.0.2.2"
MIB = 1 << 20
LIST = {"execute": "list_hostfwd"}


def valid_reply(data: bytes) -> bool:
    """A valid JSON object reply, or nothing (connection closed)."""
    if data == b"":
        return True
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and bool({"error", "return", "entries"} & set(obj))


def try_request(path: str, request: bytes, timeout: float = 10) -> bytes:
    try:
        return api_call(path, request, timeout=timeout)
    except (BrokenPipeError, ConnectionResetError):
        return b""  # the server closed early (e.g. after "too large")


def abusive_requests(seed: int, n: int) -> list[bytes]:
    r = random.Random(seed)
    big = 10 ** r.randrange(20, 400)
    fixed = [
        b"", b"{", b"}", b"[]", b"null", b"0", b'"x"', b"{}", b'{"execute":1}',
        b'{"execute":null}', b'{"execute":["add_hostfwd"]}', b'{"execute":"nope"}',
        b'{"execute":"add_hostfwd"}', b'{"execute":"add_hostfwd","arguments":null}',
        b'{"execute":"add_hostfwd","arguments":[]}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp"}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"sctp","host_port":1,"guest_port":1}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":-1,"guest_port":80}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":70000,"guest_port":80}}',
        f'{{"execute":"add_hostfwd","arguments":{{"proto":"tcp","host_port":{big},'
        f'"guest_port":80}}}}'.encode(),
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1e400,"guest_port":80}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":NaN,"guest_port":80}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":Infinity,"guest_port":1}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":"80","guest_port":80}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":true,"guest_port":80}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"999.1.1.1",'
        b'"host_port":1,"guest_port":1}}',
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1",'
        b'"host_port":1,"guest_addr":{"a":1},"guest_port":1}}',
        b'{"execute":"remove_hostfwd","arguments":{"id":"1"}}',
        b'{"execute":"remove_hostfwd","arguments":{"id":1e30}}',
        b'{"execute":"remove_hostfwd","arguments":{"id":-5}}',
        b'{"execute":"remove_hostfwd"}',
        b'{"execute":"list_hostfwd","execute":"list_hostfwd"}',
        b"[" * 2000 + b"]" * 2000,
        b'{"a":' * 1000 + b"1" + b"}" * 1000,
        "{\"execute\":\"\u202e\udc80\"}".encode("utf-8", "surrogatepass"),
        b"\xff\xfe\x00\x01" * 100,
        b'{"execute":"get_info"}', b'{"execute":"get_stats"}', b'{"execute":"list_hostfwd"}',
        b'{"execute":"get_info","arguments":' + b'"' + b"x" * 4000 + b'"}',
        b"x" * 4096, b"{" + b" " * 5000 + b"}",
    ]
    out = list(fixed)
    words = [b'"execute"', b'"arguments"', b'"add_hostfwd"', b'"remove_hostfwd"',
             b'"list_hostfwd"', b'"proto"', b'"tcp"', b'"udp"', b'"host_port"',
             b'"guest_port"', b'"id"', b"{", b"}", b"[", b"]", b":", b",", b"null",
             b"true", b"-1", b"0", b"65536", b"1e999", b'"\\u0000"', b'"\\ud800"']
    while len(out) < n:
        kind = r.randrange(4)
        if kind == 0:
            out.append(bytes(r.getrandbits(8) for _ in range(r.randrange(0, 300))))
        elif kind == 1:
            out.append(b"".join(r.choice(words) for _ in range(r.randrange(1, 40))))
        elif kind == 2:
            args = {"proto": r.choice(["tcp", "udp", "TCP", "", 5, None]),
                    "host_addr": r.choice(["127.0.0.1", "", "::1", "x", 1, None]),
                    "host_port": r.choice([0, 1, 65535, 65536, -1, 2 ** 64, 1.5, "9", None]),
                    "guest_port": r.choice([80, 0, 70000, -80, 3.0, [], None])}
            for k in list(args):
                if r.random() < 0.2:
                    del args[k]
            out.append(json.dumps({"execute": "add_hostfwd", "arguments": args}).encode())
        else:
            good = json.dumps({"execute": r.choice(["list_hostfwd", "remove_hostfwd",
                                                    "get_info"]),
                               "arguments": {"id": r.randrange(-3, 5)}}).encode()
            cut = r.randrange(0, len(good))
            out.append(good[:cut])
    return out


class Background:
    """A namespace -> host bulk transfer running while the API is abused."""

    def __init__(self, net, host_server, nbytes: int):
        self.srv = host_server("sink")
        self.nbytes = nbytes
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, args=(net,), daemon=True)
        self.t.start()

    def _run(self, net):
        try:
            self.result = net.ns.client("tcp-send", GW, self.srv.port, self.nbytes, timeout=240)
        except BaseException as e:
            self.error = e

    def check(self, timeout: float = 240):
        self.t.join(timeout)
        assert not self.t.is_alive(), "background transfer did not finish"
        assert self.error is None, self.error
        count, digest = self.result["reply"].split()
        assert int(count) == self.nbytes and digest == self.result["sha256"]


@nsnet_only
def test_malformed_requests(connect, host_server, record_property):
    net = connect()
    bg = Background(net, host_server, 64 * MIB)
    requests = abusive_requests(seed=6, n=600)
    bad = []
    for req in requests:
        reply = try_request(net.api, req)
        if not valid_reply(reply):
            bad.append((req[:80], reply[:200]))
        assert net.fwd.alive(), net.fwd.log()
    # 1 MiB requests: refused ("too large") or closed, never read whole.
    for _ in range(3):
        reply = try_request(net.api, b'{"execute":"list_hostfwd","pad":"' + b"a" * MIB + b'"}')
        assert reply in (b"", b'{"error":{"desc":"bad request: too large message"}}'), reply[:200]
    record_property("api_requests", len(requests) + 3)
    assert not bad, bad[:5]
    bg.check()
    assert net.fwd.alive()
    # The table the abuse left is well formed, and the same under both keys.
    listed = json.loads(api_call(net.api, LIST))
    entries = listed["entries"]
    assert isinstance(entries, list) and listed["return"]["entries"] == entries
    assert all(e["proto"] in ("tcp", "udp") and 1 <= e["host_port"] <= 65535 and
               1 <= e["guest_port"] <= 65535 for e in entries), entries
    assert len({e["id"] for e in entries}) == len(entries), entries
    info = json.loads(api_call(net.api, {"execute": "get_info"}))["return"]
    assert info["restarts"] == 0


@nsnet_only
def test_parallel_and_idle_connections(connect, host_server, record_property):
    """300 connections at once: 150 never send anything, 150 send a valid
    request; the valid ones are answered while the idle ones are held,
    the idle ones are closed by the server (per-connection read time)."""
    net = connect()
    srv = host_server("echo")
    idle = []
    try:
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(net.api)
            idle.append(s)
        replies: list[bytes] = []
        errors: list[BaseException] = []

        def worker(i: int):
            try:
                req = LIST if i % 3 else {"execute": "get_info"}
                replies.append(api_call(net.api, req, timeout=30))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(150)]
        for t in threads:
            t.start()
        # Traffic flows while 150 idle API clients are connected.
        r = net.ns.client("tcp-echo", GW, srv.port, 256 * 1024)
        assert r["received"] == 256 * 1024 and r["sha_received"] == r["sha_sent"]
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert len(replies) == 150 and all(valid_reply(x) and x for x in replies)
        # The idle clients are dropped by the server (read deadline), not kept forever.
        closed = 0
        for s in idle:
            try:
                if s.recv(1) == b"":
                    closed += 1
            except (socket.timeout, ConnectionResetError):
                pass
        assert closed == len(idle)
        record_property("parallel_api_connections", 300)
    finally:
        for s in idle:
            s.close()
    assert net.fwd.alive()


@nsnet_only
def test_stuck_api_never_stalls_forwarding(connect, host_server):
    """A half-sent request, a client that never reads, and finally the
    whole supervisor frozen with SIGSTOP: traffic through the namespace
    and through a port forward keeps flowing (the forwarder is another
    process)."""
    net = connect()
    srv = host_server("echo")
    server = net.ns.start_server("tcp-serve", "0.0.0.0", 0, "sink", 1)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stopped = False
    try:
        host_port = free_port()
        assert add_hostfwd(net.api, "tcp", host_port, server.port) == b'{"return":{"id":1}}'
        stuck.connect(net.api)
        stuck.sendall(b'{"execute":"list_hos')  # and never more
        # Other API clients are still served meanwhile.
        assert json.loads(api_call(net.api, LIST))["entries"][0]["id"] == 1
        os.kill(net.fwd.pid, signal.SIGSTOP)
        stopped = True
        with pytest.raises(OSError):  # the API does not answer now...
            api_call(net.api, LIST, timeout=1)
        # ...but the data path does, both directions.
        r = net.ns.client("tcp-echo", GW, srv.port, 4 * MIB)
        assert r["received"] == 4 * MIB and r["sha_received"] == r["sha_sent"]
        data = payload(4 * MIB)
        assert tcp_send("127.0.0.1", host_port, data).decode().split() == \
            [str(len(data)), sha256(data)]
    finally:
        if stopped:
            os.kill(net.fwd.pid, signal.SIGCONT)
        stuck.close()
        server.close()
    assert json.loads(api_call(net.api, LIST))["entries"][0]["id"] == 1
    assert net.fwd.alive()


@nsnet_only
def test_socket_mode_0600_and_other_users_refused(connect):
    net = connect()
    st = os.lstat(net.api)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    # Another local user (nobody) cannot talk to it.
    cp = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         "/usr/bin/python3", "-c",
         "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
         net.api], capture_output=True, text=True, timeout=30)
    assert cp.returncode != 0 and "PermissionError" in cp.stderr, cp.stderr


@pytest.mark.parametrize("planted", ["symlink-to-file", "dangling-symlink", "regular-file"])
def test_planted_path_is_refused(ns, nsnet_impl, workdir, user, planted):
    """A symlink (or any non-socket) at the API socket path is never
    followed or replaced: nsnet refuses to start and the target is
    untouched."""
    victim = os.path.join(workdir, "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    os.chown(victim, user.uid, user.gid)
    path = os.path.join(workdir, "api.sock")
    if planted == "symlink-to-file":
        os.symlink(victim, path)
    elif planted == "dangling-symlink":
        os.symlink(os.path.join(workdir, "nowhere"), path)
    else:
        with open(path, "w") as f:
            f.write("not a socket\n")
    cp = nsnet_impl.run(["--configure", "--api-socket", path, ns.pid, "tap0"], user=user,
                        timeout=30, text=True)
    assert cp.returncode == 1 and "not a socket" in cp.stderr, (cp.returncode, cp.stderr)
    with open(victim) as f:
        assert f.read() == "precious\n"
    assert not os.path.exists(os.path.join(workdir, "nowhere"))
    assert not stat.S_ISSOCK(os.lstat(path).st_mode)


def test_stale_socket_replaced(ns, start_fwd, nsnet_impl, workdir, user):
    """A socket file left by a dead process is replaced; a live one is not."""
    path = os.path.join(workdir, "api.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    os.chown(path, user.uid, user.gid)
    try:
        cp = nsnet_impl.run(["--configure", "--api-socket", path, ns.pid, "tap0"], user=user,
                            timeout=30, text=True)
        assert cp.returncode == 1 and "in use" in cp.stderr, (cp.returncode, cp.stderr)
    finally:
        s.close()  # now stale: the file stays, nobody listens
    assert os.path.exists(path)
    start_fwd(nsnet_impl, ["--configure", "--api-socket", path, ns.pid, "tap0"])
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert json.loads(api_call(path, LIST))["entries"] == []
