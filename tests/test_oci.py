"""nsnet --bypass-listener: containers that a real OCI runtime (runc)
starts in the target's network namespace, with a seccomp profile whose
listenerPath is nsnet's socket, get the socket bypass of `nsnet run
--bypass` (supervisor/ocilistener.py, proto/oci.py, docs/bypass.md "OCI").

The container's root filesystem is an empty directory with read-only bind
mounts of the host's /usr (so /usr/bin/python3 runs inside) and of the
test's scripts.  runc runs as root, or (rootless) as the unprivileged test
user inside the target's user namespace, where it is root (as
bypass4netns runs it under rootlesskit: runc 1.1 outside a user namespace
of its own cannot take the listener from its init, pidfd_getfd EPERM);
nsnet runs as the same user.  Attacks on the listener socket come from
this process and from the unprivileged test user."""
from __future__ import annotations

import array
import json
import os
import platform
import shutil
import socket
import subprocess
import time

import pytest

import harness
from harness import User, api_call, read_line

pytestmark = pytest.mark.timeout(120)

RUNC = shutil.which("runc")
ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}.get(platform.machine())

# Inside the container: one TCP connect to the host (10.0.2.2:PORT, the
# bypass), a UDP exchange with the host (the fallback), what each socket
# says of itself; then, with "again", wait for a line on stdin and connect
# once more (after the test killed the handler).
PROBE = r"""
import json, socket, sys
port, uport = int(sys.argv[1]), int(sys.argv[2])
def tcp():
    s = socket.create_connection(("10.0.2.2", port), timeout=10)
    out = {"peer": s.getpeername()[0], "sock": s.getsockname()[0]}
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        b = s.recv(100)
        if not b:
            break
        got += b
    out["echo"] = got.decode()
    s.close()
    return out
r = tcp()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(10)
u.connect(("10.0.2.2", uport))
u.send(b"dgram")
r["udp_echo"] = u.recv(100).decode()
r["udp_peer"] = u.getpeername()[0]
print(json.dumps(r), flush=True)
if len(sys.argv) > 3:
    sys.stdin.readline()
    print(json.dumps(tcp()), flush=True)
"""


@pytest.fixture(params=["root"])
def user(request):
    """Who runs nsnet, the namespace and runc: root unless a test asks for
    "unpriv" (rootless)."""
    return User.root() if request.param == "root" else User.unpriv()


@pytest.fixture
def bundle(base_dir, user):
    """An OCI bundle factory: bundle(netns, listener, args) -> bundle dir."""
    if RUNC is None:
        pytest.fail("runc is not installed (scripts/setup.sh installs it)", pytrace=False)
    if ARCH is None:
        pytest.skip(f"no seccomp arch name for {platform.machine()}")
    top = harness.User.root().make_dir(base_dir, "oci.")
    os.chmod(top, 0o755)
    with open(f"{top}/probe.py", "w") as f:
        f.write(PROBE)
    made = []

    def make(netns: str, listener: str, args: list[str], name: str = "b") -> str:
        b = f"{top}/{name}"
        root = f"{b}/rootfs"
        for d in ("usr", "proc", "dev", "t", "tmp", "etc"):
            os.makedirs(f"{root}/{d}", exist_ok=True)
        for link, to in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"),
                         ("sbin", "usr/sbin")):
            if not os.path.lexists(f"{root}/{link}"):
                os.symlink(to, f"{root}/{link}")
        config = {
            "ociVersion": "1.0.2",
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                        "env": ["PATH=/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1"],
                        "cwd": "/", "noNewPrivileges": True},
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "oci",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/usr", "type": "bind", "source": "/usr",
                 "options": ["rbind", "ro"]},
                {"destination": "/t", "type": "bind", "source": top, "options": ["rbind", "ro"]},
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                               {"type": "mount"}, {"type": "network", "path": netns}],
                "seccomp": {
                    "defaultAction": "SCMP_ACT_ALLOW", "architectures": [ARCH],
                    "listenerPath": listener, "listenerMetadata": "nsnet-test",
                    "syscalls": [{"names": ["connect", "getsockname", "getpeername"],
                                  "action": "SCMP_ACT_NOTIFY"}]},
            },
        }
        if user.is_root:
            # A cgroup of its own: runc's default is one named after the
            # container id, which the tests of other workers use too (a
            # rootless runc makes none; given a path it fails to).
            config["linux"]["cgroupsPath"] = f"/nsnet-test-{os.path.basename(top)}-{name}"
        with open(f"{b}/config.json", "w") as f:
            json.dump(config, f)
        made.append(b)
        return b

    yield make
    shutil.rmtree(top, ignore_errors=True)


class Container:
    """`runc run` of a bundle in the foreground (its stdin/stdout are the
    container's); killed and deleted by id at the end, whatever happened.
    Rootless: runc runs as `user` inside the namespace's user namespace."""

    def __init__(self, bundle: str, state: str, cid: str, user: User, ns):
        self.state, self.cid, self.user = state, cid, user
        self.prefix = [] if user.is_root else [
            "nsenter", f"--target={ns.pid}", "--user", "--preserve-credentials", "--"]
        self.p = user.popen([*self.prefix, RUNC, "--root", state, "run", "--bundle", bundle, cid],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def line(self, timeout: float = 20) -> dict:
        raw = read_line(self.p.stdout, timeout)
        assert raw, f"no output from the container: {self.stop()}"
        return json.loads(raw.splitlines()[0])

    def stop(self) -> str:
        self.user.run([*self.prefix, RUNC, "--root", self.state, "kill", self.cid, "KILL"],
                      timeout=10)
        harness.kill_and_reap(self.p)
        self.user.run([*self.prefix, RUNC, "--root", self.state, "delete", "--force", self.cid],
                      timeout=10)
        err = self.p.stderr.read().decode(errors="replace")
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()
        return err


@pytest.fixture
def run_container(workdir, user, ns):
    started: list[Container] = []

    def run(bundle: str, cid: str = "c1") -> Container:
        c = Container(bundle, f"{workdir}/runc", cid, user, ns)
        started.append(c)
        return c

    yield run
    for c in started:
        if c.p.returncode is None or not c.p.stdout.closed:
            c.stop()


def stats(net) -> dict:
    return json.loads(api_call(net.api, {"execute": "get_stats"}, timeout=10))["return"]["bypass"]


def start_nsnet(attach, nsnet_impl, ns, workdir, *flags) -> tuple:
    listener = f"{workdir}/oci.sock"
    net = attach(nsnet_impl, ns, f"--bypass-listener={listener}", *flags)
    return net, listener


@pytest.mark.parametrize("user, flags", [("root", ()), ("unpriv", ()),
                                         ("root", ("--enable-sandbox", "--enable-seccomp"))],
                         indirect=["user"], ids=["root", "unpriv", "root-sandbox"])
def test_container_connects_are_bypassed(nsnet_impl, ns, attach, workdir, bundle,
                                         run_container, host_server, flags):
    tcp, udp = host_server("echo"), host_server("echo", "udp")
    audit = f"{workdir}/audit.jsonl"
    net, listener = start_nsnet(attach, nsnet_impl, ns, workdir, "--audit=all",
                                f"--audit-log={audit}", *flags)
    b = bundle(ns.net_path, listener, ["python3", "/t/probe.py", str(tcp.port), str(udp.port)])
    c = run_container(b)
    r = c.line()
    assert r["echo"] == "ping" and r["peer"] == "10.0.2.2", r  # the namespace's view
    assert r["sock"] == "10.0.2.100", r
    assert tcp.peers and tcp.peers[0][0] == "127.0.0.1", tcp.peers  # a host loopback socket
    assert r["udp_echo"] == "dgram" and r["udp_peer"] == "10.0.2.2", r
    assert c.p.wait(timeout=20) == 0, c.stop()
    st = stats(net)
    assert st["accepted"] == 1 and st["refused"] == 0, st
    assert st["bypassed"] == 1, st     # the TCP connect
    assert st["fallback"] >= 1, st     # the UDP connect: libslirp's path
    assert st["translated"] >= 2, st   # getpeername/getsockname of the bypassed socket
    # the container is gone: its listener hung up, its handler ended
    harness.wait_until(lambda: stats(net)["containers"] == [], 10, what="handler gone")
    assert "container 'c1' ended" in net.fwd.log()
    # the egress policy's audit log has the bypassed connect, as with nsnet run --bypass
    with open(audit) as f:
        recs = [json.loads(line) for line in f if '"bypass"' in line]
    assert [(x["action"], x["dst"], x["dport"], x["bypass"]) for x in recs] == [
        ("allow", "10.0.2.2", tcp.port, True)], recs


def test_handler_restart_keeps_the_container_bypassed(nsnet_impl, ns, attach, workdir, bundle,
                                                      run_container, host_server):
    """The runtime sends a listener once; the supervisor keeps it, so a
    killed handler is replaced on the same listener."""
    tcp, udp = host_server("echo"), host_server("echo", "udp")
    net, listener = start_nsnet(attach, nsnet_impl, ns, workdir)
    b = bundle(ns.net_path, listener,
               ["python3", "/t/probe.py", str(tcp.port), str(udp.port), "again"])
    c = run_container(b)
    assert c.line()["peer"] == "10.0.2.2"
    first = stats(net)["containers"][0]["handler_pid"]
    os.kill(first, 9)
    harness.wait_until(lambda: stats(net)["containers"][0]["handler_pid"] not in (None, first),
                       10, what="a new handler")
    # Read while the container waits on its stdin: once it has printed its
    # second line it may end, and an ended container leaves the list.
    st = stats(net)
    assert st["containers"][0]["restarts"] == 1, st
    c.p.stdin.write(b"go\n")
    c.p.stdin.flush()
    r = c.line()
    assert r["peer"] == "10.0.2.2" and r["echo"] == "ping", r
    st = stats(net)  # the totals keep an ended container's counts
    assert st["bypassed"] == 2, st
    assert [p[0] for p in tcp.peers] == ["127.0.0.1", "127.0.0.1"], tcp.peers
    assert c.p.wait(timeout=20) == 0, c.stop()


AT_CLOSE = "--bypass-bytes=at-close"


@pytest.mark.parametrize("user, flags", [
    ("root", ()), ("unpriv", ()), ("root", (AT_CLOSE,)), ("unpriv", (AT_CLOSE,)),
    ("root", (AT_CLOSE, "--enable-sandbox", "--enable-seccomp"))], indirect=["user"],
    ids=["root-default", "unpriv-default", "root-at-close", "unpriv-at-close",
         "root-sandbox-at-close"])
def test_bypass_bytes_subscription(nsnet_impl, ns, attach, workdir, bundle, run_container,
                                   host_server, flags):
    """--bypass-bytes reaches the containers' handlers: by default none
    subscribes to the kernel's TCP destroy notifications (/proc/net/netlink
    of the namespace nsnet runs in); with at-close, the handler does (the
    supervisor subscribes it: confined too)."""
    tcp, udp = host_server("echo"), host_server("echo", "udp")
    net, listener = start_nsnet(attach, nsnet_impl, ns, workdir, *flags)
    c = run_container(bundle(ns.net_path, listener,
                             ["python3", "/t/probe.py", str(tcp.port), str(udp.port), "again"]))
    assert c.line()["peer"] == "10.0.2.2"
    subs = harness.destroy_subscribers()
    if flags:
        handler = stats(net)["containers"][0]["handler_pid"]
        assert len(subs) == 1 and subs <= harness.sock_inodes(handler), subs
    else:
        assert subs == set()
    if "--enable-seccomp" in flags:  # each container's handler under its own allowlist
        handler = stats(net)["containers"][0]["handler_pid"]
        assert harness.thread_seccomp(handler) == ["2"] * 2
    c.p.stdin.write(b"go\n")
    c.p.stdin.flush()
    assert c.line()["peer"] == "10.0.2.2"
    assert c.p.wait(timeout=20) == 0, c.stop()


# -- the attacker's side: what reaches the listener socket ----------------------

def _send(path: str, data: bytes, fds=()) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        try:
            if fds:
                s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", fds).tobytes())])
            elif data:
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""  # until nsnet closes its end: the message was judged
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed with our bytes unread: judged too


def _foreign_listener() -> tuple[int, int, socket.socket]:
    """A real seccomp listener of a child of ours (in the test's own
    network namespace, not the target's): (pid, listener fd here, the
    socket whose closing lets the child go)."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            from nsnet import bypassfilter

            fd = bypassfilter.install()
            socket.send_fds(b, [b"l"], [fd])
            b.recv(1)  # until the test is done
        finally:
            os._exit(0)
    b.close()
    a.settimeout(10)
    _, fds, _, _ = socket.recv_fds(a, 1, 1)
    return pid, fds[0], a


def test_forged_messages_are_refused(nsnet_impl, ns, attach, workdir, bundle, run_container,
                                     host_server):
    net, listener = start_nsnet(attach, nsnet_impl, ns, workdir)
    good = {"ociVersion": "1.0.2", "fds": ["seccompFd"], "pid": ns.pid,
            "state": {"ociVersion": "1.0.2", "id": "x", "status": "creating", "pid": ns.pid,
                      "bundle": "/"}}
    r, w = os.pipe()
    cpid, seccomp_fd, hold = _foreign_listener()
    try:
        cases = [
            (b"x" * 70000, (), "larger than"),                             # oversized
            (b"{", (), "nested|JSON"),                                     # not whole, then EOF
            (json.dumps({**good, "extra": 1}).encode(), (r,), "unexpected field"),
            (json.dumps(good).encode(), (r, w), "with 2 fds"),              # two fds
            (json.dumps(good).encode(), (), "with 0 fds"),                 # no fd
            (json.dumps(good).encode(), (r,), "not a seccomp listener"),   # a pipe
            # a real listener, but of a process outside the target's namespace
            (json.dumps({**good, "pid": cpid, "state": {**good["state"], "pid": cpid}}).encode(),
             (seccomp_fd,), "not the one this nsnet serves"),
        ]
        for data, fds, _ in cases:
            _send(listener, data, fds)
        # another user (the socket made reachable to it: the uid check holds)
        os.chmod(listener, 0o666)
        hostile = User.unpriv()
        out = hostile.run([harness.NS_PYTHON, "-c", (
            "import socket,os,sys;s=socket.socket(socket.AF_UNIX);s.settimeout(5);"
            "s.connect(sys.argv[1]);r,w=os.pipe()\n"
            "try:\n s.sendmsg([sys.argv[2].encode()],[(1,1,r.to_bytes(4,'little'))])\n"
            " print(s.recv(1))\n"
            "except OSError as e: print(e.errno)"), listener, json.dumps(good)], timeout=20)
        assert out.returncode == 0 and out.stdout.strip() in (b"b''", b"32", b"104"), out
    finally:
        os.close(r)
        os.close(w)
        os.close(seccomp_fd)
        hold.close()
        os.kill(cpid, 9)
        os.waitpid(cpid, 0)
    st = stats(net)
    assert st["refused"] == len(cases) + 1 and st["accepted"] == 0, st
    assert st["containers"] == []
    log = net.fwd.log()
    for _, _, why in cases:
        assert any(w in log for w in why.split("|")), (why, log[-3000:])
    assert f"uid {hostile.uid}: only root may send" in log, log[-2000:]
    assert net.fwd.alive()
    # the supervisor still serves a real container
    tcp, udp = host_server("echo"), host_server("echo", "udp")
    b = bundle(ns.net_path, listener, ["python3", "/t/probe.py", str(tcp.port), str(udp.port)])
    c = run_container(b)
    assert c.line()["peer"] == "10.0.2.2"
    assert c.p.wait(timeout=20) == 0, c.stop()
    assert stats(net)["bypassed"] == 1


def test_slow_sender_is_cut_at_the_deadline(nsnet_impl, ns, attach, workdir):
    """A peer that connects and says nothing holds a slot for at most
    CONN_TIMEOUT seconds; meanwhile the supervisor answers the API."""
    net, listener = start_nsnet(attach, nsnet_impl, ns, workdir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(listener)
        s.sendall(b'{"ociVersion":')
        t0 = time.monotonic()
        assert stats(net)["refused"] == 0
        assert s.recv(1) == b""  # nsnet closed it
        assert time.monotonic() - t0 < 14
    st = stats(net)
    assert st["refused"] == 1, st
    assert "no whole message in 5 s" in net.fwd.log()


def test_bad_listener_path_is_an_error_at_start(nsnet_impl, ns, start_fwd, workdir):
    """A path nsnet cannot bind, or one a live process listens on: exit 1
    with what failed."""
    busy = f"{workdir}/busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(busy)
        live.listen()
        for path, why in ((f"{workdir}/no/such/dir/x.sock",
                           "cannot bind --bypass-listener socket"),
                          (busy, "is in use by another process")):
            fwd = start_fwd(nsnet_impl, ["--configure", f"--bypass-listener={path}", ns.pid,
                                         "tap0"], wait=False)
            assert fwd.wait_exit(15) == 1, fwd.log()
            assert why in fwd.log(), fwd.log()


def test_set_policy_narrows_the_containers_bypass(nsnet_impl, ns, attach, workdir, bundle,
                                                  run_container, host_server):
    """The egress policy rules a running container's connects as nsnet run
    --bypass's: once a connect was bypassed, a set_policy that cannot cut it
    is refused unless keep_established; with it, a policy that allows the
    gateway on one port only takes the gateway out of the bypass (libslirp's
    path, which applies the policy per flow, carries the next connect)."""
    tcp, udp = host_server("echo"), host_server("echo", "udp")
    net, listener = start_nsnet(attach, nsnet_impl, ns, workdir)
    b = bundle(ns.net_path, listener,
               ["python3", "/t/probe.py", str(tcp.port), str(udp.port), "again"])
    c = run_container(b)
    assert c.line()["peer"] == "10.0.2.2"
    assert stats(net)["bypassed"] == 1
    pol = {"egress": "deny", "rules": [
        {"action": "allow", "proto": "tcp", "dest": "10.0.2.2", "ports": tcp.port},
        {"action": "allow", "proto": "udp", "dest": "10.0.2.2", "ports": udp.port}]}
    r = json.loads(api_call(net.api, {"execute": "set_policy", "arguments": pol}))
    assert "--bypass-listener" in r["error"]["desc"], r
    r = json.loads(api_call(net.api, {"execute": "set_policy",
                                      "arguments": {**pol, "keep_established": True}}))
    assert r == {"return": {}}, r
    fallback = stats(net)["fallback"]
    c.p.stdin.write(b"go\n")
    c.p.stdin.flush()
    r = c.line()
    assert r["echo"] == "ping" and r["peer"] == "10.0.2.2", r
    assert c.p.wait(timeout=20) == 0, c.stop()
    st = stats(net)
    assert st["bypassed"] == 1 and st["fallback"] == fallback + 1, st
    assert st["scope"] == {"gateway": False, "egress": False}, st


def test_two_containers_in_one_namespace(nsnet_impl, ns, attach, workdir, bundle,
                                         run_container, host_server):
    """A pod: two containers share the namespace, each with its listener
    and handler; one ending leaves the other served, and its counts stay
    in the totals."""
    tcp, udp = host_server("echo"), host_server("echo", "udp")
    net, listener = start_nsnet(attach, nsnet_impl, ns, workdir)
    args = ["python3", "/t/probe.py", str(tcp.port), str(udp.port)]
    a = run_container(bundle(ns.net_path, listener, [*args, "again"], name="a"), cid="a")
    assert a.line()["peer"] == "10.0.2.2"
    b = run_container(bundle(ns.net_path, listener, args, name="b"), cid="b")
    assert b.line()["peer"] == "10.0.2.2"
    assert b.p.wait(timeout=20) == 0, b.stop()
    harness.wait_until(lambda: [c["id"] for c in stats(net)["containers"]] == ["a"], 10,
                       what="b's handler gone, a's kept")
    a.p.stdin.write(b"go\n")
    a.p.stdin.flush()
    assert a.line()["peer"] == "10.0.2.2"
    assert a.p.wait(timeout=20) == 0, a.stop()
    st = stats(net)
    assert st["accepted"] == 2 and st["bypassed"] == 3, st
    assert len({p[1] for p in tcp.peers}) == 3 and {p[0] for p in tcp.peers} == {"127.0.0.1"}
