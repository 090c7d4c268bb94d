"""`nsnet run --bypass`: the command's TCP connects to the host get host
sockets (seccomp user notification; csrc/bypass.c, nsnet/host/bypass.py).
Every scenario runs tests/bypassprobe.py inside the namespace against a
server on the host's loopback (reached as 10.0.2.2 / fd00::2)."""
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import harness
from harness import NS_PYTHON, api_call, read_line

pytestmark = pytest.mark.timeout(180)
HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])


@pytest.fixture(scope="module")
def probe(base_dir):
    path = f"{base_dir}/bypassprobe.py"
    shutil.copy(f"{HERE}/bypassprobe.py", path)
    os.chmod(path, 0o644)
    return path


def run_probe(user, workdir, probe, args, flags=(), timeout=120, prefix=()):
    """The probe's result, with nsnet's bypass counters as "stats" (asked
    from outside: the API refuses the command), read while it waits.
    prefix: argv that runs nsnet (tests/oldkernel.py)."""
    sock = f"{workdir}/api.sock"
    argv = [*prefix, harness.nsnet_bin(), "run", "--bypass", f"--api-socket={sock}", *flags, "--",
            NS_PYTHON, probe, "--wait", *[str(a) for a in args]]
    p = user.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = read_line(p.stdout, timeout)
        stats = filters = None
        if line:
            stats = json.loads(api_call(sock, {"execute": "get_stats"}, timeout=10))
            pid = stats.get("return", {}).get("bypass", {}).get("handler_pid")
            if pid:
                filters = harness.thread_seccomp(pid)
        p.stdin.close()
        rc = p.wait(timeout=30)
        err = p.stderr.read().decode(errors="replace")
    finally:
        harness.kill_and_reap(p)
        for f in (p.stdout, p.stderr):
            f.close()
    assert rc == 0, (rc, line, err)
    r = json.loads(line.strip().splitlines()[0])
    assert r["ok"], r
    r["handler_filters"] = filters
    r["stats"] = stats["return"].get("bypass")
    if "--enable-seccomp" in flags:
        # every thread of the handler (the loop, the byte-tracking one)
        # under its allowlist, and none of them killed by it
        assert r["handler_filters"] == ["2"] * 2, r["handler_filters"]
        assert r["stats"]["restarts"] == 0 and "status -31" not in err, err
    return r


# The cases below that take `sec` run twice: as they are, and with the
# handler under its --enable-seccomp allowlist (run_probe then checks that
# each of its threads has the filter and that none was killed).
SECCOMP = pytest.mark.parametrize("sec", [(), ("--enable-seccomp",)], ids=["", "seccomp"])


@SECCOMP
def test_blocking_connect(user, workdir, probe, host_server, sec):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["blocking", "10.0.2.2", srv.port], flags=sec)
    assert r["rc"] == 0 and r["echo"] and r["nodelay"] and r["cloexec"]
    # the namespace's view: the gateway alias and the command's own address
    assert r["peer"] == ["10.0.2.2", srv.port]
    assert r["local"][0] == "10.0.2.100"
    assert r["stats"]["bypassed"] == 1 and r["stats"]["translated"] >= 2
    assert srv.connections == 1
    # Linux 6.6 and later: the handler runs on the command's CPU
    assert r["stats"]["sync_wakeup"] is (KERNEL >= (6, 6))


@SECCOMP
def test_fd_flags_kept(user, workdir, probe, host_server, sec):
    """close-on-exec and O_NONBLOCK of the command's fd, both ways, on one fd
    number reused with other flags and on two fds the handler's fdinfo
    cache files in one place: each bypassed socket has its own fd's."""
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["flags", "10.0.2.2", srv.port], flags=sec)
    assert r["same_fd"] and r["bad"] == [], r
    assert r["stats"]["bypassed"] == r["n"] == 8


def test_no_sync_wakeup_kernel(user, workdir, base_dir, probe, host_server):
    """A kernel without SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (before 6.6;
    tests/oldkernel.py makes the ioctl fail EINVAL as there): connects are
    bypassed all the same, the wake-ups are ordinary ones."""
    wrapper = f"{base_dir}/oldkernel.py"
    shutil.copy(f"{HERE}/oldkernel.py", wrapper)
    os.chmod(wrapper, 0o644)
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["blocking", "10.0.2.2", srv.port],
                  prefix=[NS_PYTHON, wrapper, "syncwake"])
    assert r["rc"] == 0 and r["echo"] and r["cloexec"]
    assert r["stats"]["bypassed"] == 1 and r["stats"]["errors"] == 0
    assert r["stats"]["sync_wakeup"] is False


@SECCOMP
def test_nonblocking_connect(user, workdir, probe, host_server, sec):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["nonblocking", "10.0.2.2", srv.port], flags=sec)
    assert r["rc"] == errno.EINPROGRESS and r["writable"] and r["so_error"] == 0
    assert r["again"] == errno.EISCONN  # a second connect, as the kernel answers it
    assert r["peer"] == ["10.0.2.2", srv.port] and r["echo"]
    assert r["stats"]["bypassed"] == 1


@SECCOMP
def test_refused(user, workdir, probe, sec):
    port = harness.free_port()
    r = run_probe(user, workdir, probe, ["refused", "10.0.2.2", port], flags=sec)
    assert r["blocking"] == errno.ECONNREFUSED
    assert r["nonblocking"] == errno.ECONNREFUSED
    assert r["stats"]["failed"] == 2 and r["stats"]["bypassed"] == 0


@contextlib.contextmanager
def full_listener():
    """The port of a host listener whose accept queue is full (backlog 0,
    two connects it never accepts): it drops further SYNs."""
    lst = socket.socket()
    fillers = []
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        for _ in range(2):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        time.sleep(0.2)
        yield port
    finally:
        for f in fillers:
            f.close()
        lst.close()


@SECCOMP
def test_connect_timeouts(user, workdir, probe, sec):
    """A host listener whose accept queue is full drops SYNs: Python's
    timeout fires, and a blocking connect with SO_SNDTIMEO says EINPROGRESS."""
    with full_listener() as port:
        r = run_probe(user, workdir, probe, ["timeout", "10.0.2.2", port], flags=sec)
    assert r["py_timeout"] == "timeout"
    assert r["sndtimeo"] == "EINPROGRESS"
    assert r["seconds"] < 30


@SECCOMP
def test_blocking_connect_interrupted(user, workdir, probe, sec):
    """SIGALRM interrupts a blocking connect waiting in the handler: the
    command gets it back at once, and the handler drops the wait."""
    with full_listener() as port:
        r = run_probe(user, workdir, probe, ["interrupted", "10.0.2.2", port], flags=sec)
    assert r["what"] == "interrupted" and r["seconds"] < 5
    assert r["stats"]["pending"] == 0 and r["stats"]["bypassed"] == 0


def test_asyncio(user, workdir, probe, host_server):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["aio", "10.0.2.2", srv.port, 20])
    assert r["good"] == r["n"] == 20 and r["stats"]["bypassed"] == 20


@SECCOMP
def test_threads(user, workdir, probe, host_server, sec):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["threads", "10.0.2.2", srv.port, 8, 25], flags=sec)
    assert r["errors"] == [] and r["good"] == r["n"] == 200
    assert r["stats"]["bypassed"] == 200


def test_fork_exec_after_connect(user, workdir, probe, host_server):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["forkexec", "10.0.2.2", srv.port])
    assert r["child_rc"] == 0 and r["child_peer"] == "10.0.2.2"
    assert r["echoed"] == "from-child" and r["fork_ok"]


@SECCOMP
def test_many_short_connections_fds_stable(user, workdir, probe, host_server, sec):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["many", "10.0.2.2", srv.port, 500], flags=sec)
    assert r["good"] == r["n"] == 500 and r["fds_after"] == r["fds_before"]
    assert r["stats"]["bypassed"] == 500 and r["stats"]["pending"] == 0


@pytest.mark.soak
def test_many_connections_soak(user, workdir, probe, host_server):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["many", "10.0.2.2", srv.port, 10_000], timeout=900)
    assert r["good"] == r["n"] == 10_000 and r["fds_after"] == r["fds_before"]
    assert r["stats"]["bypassed"] == 10_000


def _transfer(user, workdir, probe, host_server, nbytes, timeout=300):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["transfer", "10.0.2.2", srv.port, nbytes],
                  timeout=timeout)
    assert r["sent"] == r["received"] == nbytes
    assert r["sha_sent"] == r["sha_received"]
    assert r["stats"]["bypassed"] == 1


def test_transfer_checksum(user, workdir, probe, host_server):
    _transfer(user, workdir, probe, host_server, 64 << 20)


@pytest.mark.soak
def test_transfer_1gb(user, workdir, probe, host_server):
    _transfer(user, workdir, probe, host_server, 1 << 30, timeout=900)


@SECCOMP
def test_ipv6(user, workdir, probe, host_server, sec):
    srv = host_server("echo", addr="::1")
    r = run_probe(user, workdir, probe, ["blocking", "fd00::2", srv.port], flags=["-6", *sec])
    assert r["rc"] == 0 and r["echo"]
    assert r["peer"] == ["fd00::2", srv.port]
    assert r["local"][0].startswith("fd00::") and r["local"][0] != "::1"
    assert r["stats"]["bypassed6"] == 1


@pytest.mark.parametrize("flag", ["--disable-host-loopback", "--no-egress"])
def test_refusals_stay_refusals(user, workdir, probe, host_server, flag):
    """What the network refuses, the bypass does not open."""
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["refused", "10.0.2.2", srv.port], flags=[flag])
    assert r["blocking"] != 0 and r["nonblocking"] != 0
    assert srv.connections == 0
    assert r["stats"]["bypassed"] == 0 and r["stats"]["scope"]["gateway"] is False


def test_fallback_cases_untouched(user, workdir, probe, host_server):
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["fallback", "10.0.2.2", srv.port, 18099])
    assert r["inner_peer"] == ["127.0.0.1", 18099] and r["inner_local"][0] == "127.0.0.1"
    assert r["bound_echo"] and r["bound_local"] == "10.0.2.100"  # libslirp's path
    assert r["udp_peer"] == ["10.0.2.2", srv.port] and r["unix"]
    assert r["stats"]["bypassed"] == 0 and r["stats"]["fallback"] >= 2
    assert srv.connections == 1


def stats(sock, timeout=15):
    """get_stats' bypass section; get_stats asks the forwarder, so it fails
    while a killed forwarder is being replaced: retry until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = json.loads(api_call(sock, {"execute": "get_stats"}))
            if "return" in reply:
                return reply["return"]["bypass"]
        except OSError:
            reply = None
        if time.monotonic() > deadline:
            raise AssertionError(f"get_stats: {reply}")
        time.sleep(0.1)


HOLDER = """
import socket, sys, json
host, port = sys.argv[1], int(sys.argv[2])
a = socket.create_connection((host, port), timeout=10)
print("READY", flush=True)
sys.stdin.readline()
a.sendall(b"old"); old = a.recv(3)
res = []
for _ in range(5):
    with socket.create_connection((host, port), timeout=10) as b:
        b.sendall(b"new"); res.append(b.recv(3) == b"new")
print(json.dumps({"old": old.decode(), "new": res, "peer": a.getpeername()[0]}), flush=True)
sys.stdin.readline()  # stay (and nsnet run with it) until the test has read the stats
"""


@pytest.mark.parametrize("what", ["handler", "handler-seccomp", "forwarder", "stop-supervisor"])
def test_failures(user, workdir, host_server, what):
    """SIGKILL the handler or the forwarder, or SIGSTOP the supervisor: the
    bypassed connection keeps working and new connects are bypassed (a new
    handler is started, under its allowlist again with --enable-seccomp;
    the forwarder and the supervisor are not involved)."""
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    sec = ["--enable-seccomp"] if what.endswith("-seccomp") else []
    what = what.removesuffix("-seccomp")
    p = user.popen([harness.nsnet_bin(), "run", "--bypass", f"--api-socket={sock}", *sec, "--",
                    NS_PYTHON, "-c", HOLDER, "10.0.2.2", str(srv.port)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stopped = False
    try:
        assert read_line(p.stdout, 30).startswith(b"READY")
        st = stats(sock)
        assert st["bypassed"] == 1
        if what == "handler":
            os.kill(st["handler_pid"], signal.SIGKILL)
            harness.wait_until(lambda: stats(sock)["restarts"] == 1, 10,
                               what="a new bypass handler")
        elif what == "forwarder":
            fwd = json.loads(api_call(sock, {"execute": "get_stats"}))["return"]["forwarder_pid"]
            os.kill(fwd, signal.SIGKILL)
        else:
            os.kill(p.pid, signal.SIGSTOP)
            stopped = True
        p.stdin.write(b"go\n")
        p.stdin.flush()
        r = json.loads(read_line(p.stdout, 30))
        assert r == {"old": "old", "new": [True] * 5, "peer": "10.0.2.2"}
        if stopped:
            os.kill(p.pid, signal.SIGCONT)
            stopped = False
        # After a forwarder's death get_stats needs its replacement (it
        # answers an error while a restart is pending): wait for it.
        harness.wait_until(lambda: "return" in json.loads(api_call(
            sock, {"execute": "get_stats"})), 15, what="get_stats answered")
        st = stats(sock)
        assert st["bypassed"] == 6
        assert st["restarts"] == (1 if what == "handler" else 0)
        if sec:
            assert harness.thread_seccomp(st["handler_pid"]) == ["2"] * 2
        p.stdin.write(b"bye\n")
        p.stdin.flush()
        assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        if stopped:
            os.kill(p.pid, signal.SIGCONT)
        harness.kill_and_reap(p)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


@pytest.fixture
def outside():
    """Two addresses on this (sealed) test namespace's lo, standing for
    destinations outside nsnet's network: 198.51.100.1 and .2 (TEST-NET-2)."""
    addrs = ["198.51.100.1/32", "198.51.100.2/32"]
    for a in addrs:
        subprocess.run(["ip", "addr", "add", a, "dev", "lo"], check=True, timeout=10)
    yield
    for a in addrs:
        subprocess.run(["ip", "addr", "del", a, "dev", "lo"], timeout=10)


class PeerServer:
    """Accepts on addr, records each peer address, echoes."""

    def __init__(self, addr):
        self.sock = socket.socket()
        self.sock.bind((addr, 0))
        self.sock.listen(8)
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.peers = []
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        try:
            while True:
                c, peer = self.sock.accept()
                self.peers.append(peer[0])
                with c:
                    c.settimeout(10)
                    d = c.recv(100)
                    if d:
                        c.sendall(d)
        except OSError:
            pass

    def close(self):
        harness.wake_listener(self.sock)  # the accept() waiting for another peer
        self.sock.close()
        self.t.join(5)


@pytest.mark.parametrize("flags", [[], ["--outbound-addr=198.51.100.2"],
                                   ["--outbound-addr=198.51.100.2", "--enable-seccomp"],
                                   ["--disable-host-loopback"]])
def test_egress(user, workdir, probe, outside, flags):
    """Destinations outside the namespace go out as libslirp would send them
    (--outbound-addr honoured); with --disable-host-loopback they are not
    bypassed (SECURITY.md) but still reachable through libslirp."""
    srv = PeerServer("198.51.100.1")
    try:
        r = run_probe(user, workdir, probe, ["blocking", "198.51.100.1", srv.port], flags=flags)
    finally:
        srv.close()
    assert r["rc"] == 0 and r["echo"]
    assert r["peer"] == ["198.51.100.1", srv.port] and r["local"][0] == "10.0.2.100"
    bypassed = "--disable-host-loopback" not in flags
    assert r["stats"]["bypassed"] == (1 if bypassed else 0)
    assert r["stats"]["scope"]["egress"] is bypassed
    want = "198.51.100.2" if "--outbound-addr=198.51.100.2" in flags else "198.51.100.1"
    assert srv.peers == [want]


def test_python_api(user, base_dir, host_server):
    """nsnet.run(..., bypass=True) (the client runs in the test's user)."""
    srv = host_server("echo")
    code = ("import nsnet,sys;"
            f"cp=nsnet.run(['{NS_PYTHON}','-c','import socket;s=socket.create_connection"
            f"((\\'10.0.2.2\\',{srv.port}));print(s.getpeername()[0])'],bypass=True,"
            "capture_output=True,text=True,timeout=60);print(cp.stdout.strip(),cp.returncode)")
    venv_python = os.path.join(os.path.dirname(harness.nsnet_bin()), "python")
    cp = user.run([venv_python, "-c", code], timeout=90, capture_output=True, text=True)
    assert cp.stdout.split() == ["10.0.2.2", "0"], (cp.stdout, cp.stderr)
    assert srv.connections == 1


API_BYTES = """
import os, subprocess, sys
import nsnet
py, port, mode = sys.argv[1], sys.argv[2], sys.argv[3]
cmd = ("import socket, sys; s = socket.create_connection(('10.0.2.2', %s)); "
       "print(s.getpeername()[0], flush=True); sys.stdin.readline()" % port)
mode, _, sec = mode.partition("+")
kw = {} if mode == "default" else {"bypass_bytes": mode}
if sec:
    kw["enable_seccomp"] = True
with nsnet.Popen([py, "-c", cmd], bypass=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 text=True, **kw) as p:
    peer = p.stdout.readline().strip()
    bp = p.stats()["bypass"]
    print(peer, bp["bytes_counted"], flush=True)
    if sec:  # Seccomp: of the handler's threads
        for tid in sorted(os.listdir("/proc/%d/task" % bp["handler_pid"])):
            with open("/proc/%d/task/%s/status" % (bp["handler_pid"], tid)) as f:
                print([ln.split()[1] for ln in f if ln.startswith("Seccomp:")][0])
    p.stdin.close()
    print(p.wait(60))
"""


@pytest.mark.parametrize("mode,counted", [("default", "sampled"), ("at-close", "at close"),
                                          ("at-close+seccomp", "at close 2 2")])
def test_python_api_bypass_bytes(user, base_dir, host_server, mode, counted):
    """nsnet.Popen(..., bypass=True, bypass_bytes=...): the option table's
    keyword reaches the handler; enable_seccomp=True puts both its threads
    under its allowlist."""
    srv = host_server("echo")
    script = f"{base_dir}/api_bytes.py"
    with open(script, "w") as f:
        f.write(API_BYTES)
    os.chmod(script, 0o644)
    venv_python = os.path.join(os.path.dirname(harness.nsnet_bin()), "python")
    cp = user.run([venv_python, script, NS_PYTHON, str(srv.port), mode], timeout=90,
                  capture_output=True, text=True)
    assert cp.stdout.split() == ["10.0.2.2", *counted.split(), "0"], (cp.stdout, cp.stderr)


@pytest.mark.parametrize("mode,what", [
    ("addfd", "--bypass needs SECCOMP_ADDFD_FLAG_SEND (Linux 5.14 or later)"),
    ("cookie", "--bypass needs SO_NETNS_COOKIE (Linux 5.14 or later)"),
    ("listener", "--bypass needs seccomp user notification"),
])
def test_old_kernel_refused_at_start(user, workdir, base_dir, mode, what):
    """A kernel without what --bypass needs (tests/oldkernel.py makes the
    feature fail with the errno an older kernel gives): a clear error at
    start and exit 125; the command never runs (no silent fallback)."""
    wrapper = f"{base_dir}/oldkernel.py"
    shutil.copy(f"{HERE}/oldkernel.py", wrapper)
    os.chmod(wrapper, 0o644)
    marker = f"{workdir}/ran"
    cp = user.run([NS_PYTHON, wrapper, mode, harness.nsnet_bin(), "run", "--bypass", "--",
                   "sh", "-c", f"touch {marker}"], timeout=60, text=True)
    assert cp.returncode == 125, (cp.returncode, cp.stderr)
    assert what in cp.stderr and "run without --bypass" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr
    assert not os.path.exists(marker)
    # the same filter, without --bypass: the command runs (the filter
    # touches nothing else nsnet run needs)
    cp = user.run([NS_PYTHON, wrapper, mode, harness.nsnet_bin(), "run", "--",
                   "sh", "-c", f"touch {marker}"], timeout=60, text=True)
    assert cp.returncode == 0 and os.path.exists(marker), cp.stderr


def test_usage_lists_bypass(user):
    cp = user.run([harness.nsnet_bin(), "run", "--help"], timeout=30, capture_output=True,
                  text=True)
    assert "--bypass" in cp.stdout


# --------------------------------------------------------------------------
# The egress policy (docs/policy.md): bypassed only what it grants whole
# --------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["all-gateway-ports", "one-port", "deny-one-port"])
def test_policy_scope(user, workdir, probe, host_server, case):
    srv = host_server("echo")
    other = harness.free_port()
    flags = {"all-gateway-ports": ["--egress=deny", "--allow=tcp:10.0.2.2"],
             "one-port": ["--egress=deny", f"--allow=tcp:10.0.2.2:{srv.port}"],
             "deny-one-port": [f"--deny=tcp:10.0.2.2:{other}"]}[case]
    r = run_probe(user, workdir, probe, ["blocking", "10.0.2.2", srv.port], flags=flags)
    assert r["rc"] == 0 and r["echo"] and r["peer"] == ["10.0.2.2", srv.port]
    assert r["stats"]["scope"] == {"gateway": case == "all-gateway-ports", "egress": False}
    assert r["stats"]["bypassed"] == (1 if case == "all-gateway-ports" else 0)


def test_policy_denied_port_stays_denied(user, workdir, probe, host_server):
    """A port the policy denies on the gateway is refused (libslirp's path
    enforces it: nothing on the gateway is bypassed)."""
    srv = host_server("echo")
    r = run_probe(user, workdir, probe, ["refused", "10.0.2.2", srv.port],
                  flags=[f"--deny=tcp:10.0.2.2:{srv.port}"])
    assert r["blocking"] != 0 and r["nonblocking"] != 0
    assert srv.connections == 0 and r["stats"]["bypassed"] == 0


def _reconnect(user, workdir, probe, flags=()):
    """bypassprobe's reconnect under --egress=deny --allow=tcp:10.0.2.2: its
    result, and the server on the outside address it tried (closed)."""
    lst = socket.socket()  # the kernel accepts; the reset of the disconnect is fine
    target = PeerServer("198.51.100.1")
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        r = run_probe(user, workdir, probe,
                      ["reconnect", "10.0.2.2", lst.getsockname()[1], target.port],
                      flags=["--egress=deny", "--allow=tcp:10.0.2.2", *flags])
    finally:
        target.close()
        lst.close()
    return r, target


@SECCOMP
def test_attack_reconnect_bypassed_socket(user, workdir, probe, outside, sec):
    """Attacker's side: the command disconnects its bypassed host socket
    (AF_UNSPEC) and connects it to an outside address the policy denies.
    The handler decides that connect on its own copy (never CONTINUE for a
    host socket): refused, and the socket is bound to lo anyway."""
    r, target = _reconnect(user, workdir, probe, sec)
    assert r["stats"]["bypassed"] == 1 and r["bound"] == "lo"
    assert r["unspec"] == 0
    assert r["reconnect"] != 0 and target.peers == []


SETPOL = """
import socket, sys, json
host, port = sys.argv[1], int(sys.argv[2])
a = socket.create_connection((host, port), timeout=10)
print("READY", flush=True)
sys.stdin.readline()
a.sendall(b"old"); old = a.recv(3)
try:
    b = socket.create_connection((host, port), timeout=3)
    b.sendall(b"new"); new = b.recv(3).decode()
except OSError as e:
    new = type(e).__name__
print(json.dumps({"old": old.decode(), "new": new}), flush=True)
sys.stdin.readline()
"""


def test_set_policy_narrows_bypass(user, workdir, host_server):
    """set_policy at run time: new connects follow it (the gateway port it
    denies is refused, nothing is bypassed any more); the connection
    bypassed before stays (the command's own socket)."""
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    p = user.popen([harness.nsnet_bin(), "run", "--bypass", f"--api-socket={sock}", "--",
                    NS_PYTHON, "-c", SETPOL, "10.0.2.2", str(srv.port)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_line(p.stdout, 30).startswith(b"READY")
        assert stats(sock)["scope"]["gateway"] is True
        # without keep_established it is refused: the bypassed connection
        # could not be cut
        reply = json.loads(api_call(sock, {"execute": "set_policy", "arguments": {
            "egress": "deny", "rules": []}}))
        assert "--bypass" in reply["error"]["desc"]
        assert stats(sock)["scope"]["gateway"] is True
        reply = json.loads(api_call(sock, {"execute": "set_policy", "arguments": {
            "keep_established": True, "egress": "allow",
            "rules": [{"action": "deny", "proto": "tcp", "dest": "10.0.2.2",
                       "ports": str(srv.port)}]}}))
        assert "error" not in reply, reply
        assert stats(sock)["scope"] == {"gateway": False, "egress": False}
        p.stdin.write(b"go\n")
        p.stdin.flush()
        r = json.loads(read_line(p.stdout, 30))
        assert r["old"] == "old" and r["new"] != "new"
        assert stats(sock)["bypassed"] == 1
        p.stdin.write(b"end\n")
        p.stdin.flush()
        assert srv.connections == 1
        assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        harness.kill_and_reap(p)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


PHASES = """
import socket, sys, os
host, port = sys.argv[1], int(sys.argv[2])
for n in map(int, sys.argv[3:]):
    for _ in range(n):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"x"); assert s.recv(1) == b"x"
    print(len(os.listdir("/proc/self/fd")), flush=True)
    sys.stdin.readline()
"""


def _handler_usage(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss


def _no_leak(user, workdir, host_server, warm, n):
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    p = user.popen([harness.nsnet_bin(), "run", "--bypass", f"--api-socket={sock}", "--",
                    NS_PYTHON, "-c", PHASES, "10.0.2.2", str(srv.port), str(warm), str(n)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fds1 = int(read_line(p.stdout, 120))
        pid = stats(sock)["handler_pid"]
        h1 = _handler_usage(pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        fds2 = int(read_line(p.stdout, 900))
        st = stats(sock)
        h2 = _handler_usage(pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        harness.kill_and_reap(p)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()
    assert st["bypassed"] == warm + n and st["pending"] == 0
    assert fds2 == fds1, "the command's fds grew"
    assert h2[0] == h1[0], f"the handler's fds grew: {h1[0]} -> {h2[0]}"
    assert h2[1] - h1[1] < 1024, f"the handler's RSS grew: {h1[1]} -> {h2[1]} kB"


def test_no_leak(user, workdir, host_server):
    """fds of the command and of the handler, and the handler's RSS, are
    the same after 200 and after 1,200 more connections."""
    _no_leak(user, workdir, host_server, 200, 1200)


@pytest.mark.soak
def test_no_leak_soak(user, workdir, host_server):
    _no_leak(user, workdir, host_server, 200, 10_000)


@contextlib.contextmanager
def bypass_run(user, sock, script, args, flags=(), wrap=()):
    """nsnet run --bypass [flags] -- python3 -c script args, pipes to the
    test (say() writes a line); killed and reaped however the test ends."""
    p = user.popen([*wrap, harness.nsnet_bin(), "run", "--bypass", f"--api-socket={sock}",
                    *flags, "--", NS_PYTHON, "-c", script, *map(str, args)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield p
    finally:
        harness.kill_and_reap(p)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


def say(p, line=b"go\n"):
    p.stdin.write(line)
    p.stdin.flush()


def finish(p):
    """The script's last line; nsnet run exits 0 with it.  Its stderr."""
    say(p, b"end\n")
    assert p.wait(timeout=30) == 0, p.stderr.read()
    return p.stderr.read().decode(errors="replace")


# --------------------------------------------------------------------------
# The egress policy's audit log (docs/policy.md "Audit") records the
# handler's decisions: bypassed connects (--audit=all) and the connects of
# host sockets it refuses, with "bypass": true
# --------------------------------------------------------------------------

def _bypass_records(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if r.get("bypass")]


@pytest.mark.parametrize("case", ["no-policy", "policy", "policy-seccomp", "ipv6"])
def test_audit_log_records_bypassed_connects(user, workdir, probe, host_server, case):
    log = f"{workdir}/audit.jsonl"
    flags = ["--audit=all", f"--audit-log={log}"]
    host, addr = "10.0.2.2", "127.0.0.1"
    if case.endswith("-seccomp"):  # the handler's audit records under its allowlist
        flags.append("--enable-seccomp")
    if case.startswith("policy"):
        flags += ["--egress=deny", "--allow=tcp:10.0.2.2"]
    elif case == "ipv6":
        flags += ["-6"]
        host, addr = "fd00::2", "::1"
    srv = host_server("echo", addr=addr)
    r = run_probe(user, workdir, probe, ["blocking", host, srv.port], flags=flags)
    assert r["rc"] == 0 and r["stats"]["bypassed"] == 1
    recs = _bypass_records(log)
    assert len(recs) == 1, recs
    rec = recs[0]
    assert abs(rec.pop("time") - time.time()) < 300
    want = {"action": "allow", "proto": "tcp", "src": r["local"][0], "sport": r["local"][1],
            "dst": host, "dport": srv.port, "bypass": True, "rule": None,
            "rule_text": "default allow"}
    if case.startswith("policy"):
        want.update(rule=0, rule_text="allow tcp:10.0.2.2")
    assert rec == want
    assert r["stats"]["audit_lost"] == 0


def test_audit_log_every_bypassed_connect(user, workdir, probe, host_server):
    """300 connects in a row: 300 records (within the burst), one per
    connection (the namespace's source ports), none lost."""
    srv = host_server("echo")
    log = f"{workdir}/audit.jsonl"
    r = run_probe(user, workdir, probe, ["many", "10.0.2.2", srv.port, 300],
                  flags=["--audit=all", f"--audit-log={log}"])
    assert r["good"] == 300 and r["stats"]["bypassed"] == 300
    recs = _bypass_records(log)
    assert len(recs) == 300
    assert len({rec["sport"] for rec in recs}) == 300
    assert {(rec["action"], rec["dst"], rec["dport"]) for rec in recs} == {
        ("allow", "10.0.2.2", srv.port)}


@SECCOMP
def test_audit_log_records_refused_reconnect(user, workdir, probe, outside, sec):
    """The handler's own refusal (a host socket reconnected to an address
    the policy denies) is a deny record; the allowed, bypassed connect
    before it is not recorded without --audit=all."""
    log = f"{workdir}/audit.jsonl"
    r, target = _reconnect(user, workdir, probe, [f"--audit-log={log}", *sec])
    assert r["stats"]["bypassed"] == 1 and r["reconnect"] != 0
    recs = _bypass_records(log)
    assert len(recs) == 1, recs
    rec = recs[0]
    del rec["time"]
    assert rec == {"action": "deny", "proto": "tcp", "src": "10.0.2.100", "sport": 0,
                   "dst": "198.51.100.1", "dport": target.port, "bypass": True,
                   "rule": None, "rule_text": "default deny"}


def test_audit_never_waits_for_a_stopped_supervisor(user, workdir, host_server):
    """SIGSTOP the supervisor, then 1,500 bypassed connects with --audit=all:
    none waits for it (the handler's writes never block; the records that
    do not fit are counted), and every connect is either a record in the
    log or counted in audit_lost (get_stats' policy.audit_lost too)."""
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    log = f"{workdir}/audit.jsonl"
    stopped = False
    with bypass_run(user, sock, PHASES, ["10.0.2.2", srv.port, 1, 1500],
                    flags=["--audit=all", f"--audit-log={log}"]) as p:
        try:
            int(read_line(p.stdout, 60))
            os.kill(p.pid, signal.SIGSTOP)
            stopped = True
            say(p)
            assert read_line(p.stdout, 120), "the connects waited for the stopped supervisor"
        finally:
            if stopped:
                os.kill(p.pid, signal.SIGCONT)
        reply = json.loads(api_call(sock, {"execute": "get_stats"}))["return"]
        st = reply["bypass"]
        assert st["bypassed"] == 1501 and st["audit_lost"] > 0
        assert reply["policy"]["audit_lost"] >= st["audit_lost"]
        finish(p)
    assert len(_bypass_records(log)) + st["audit_lost"] == 1501


def test_audit_stream_protocol_break_replaces_handler(user, workdir, host_server):
    """Attacker's side: whoever holds the handler's audit socket writes a
    record that breaks nsnet/proto/bypass.py: the supervisor kills and
    replaces the handler, logs nothing of it, and the command's connects
    are still bypassed."""
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    log = f"{workdir}/audit.jsonl"
    with bypass_run(user, sock, HOLDER, ["10.0.2.2", srv.port],
                    flags=["--audit=all", f"--audit-log={log}"]) as p:
        assert read_line(p.stdout, 30).startswith(b"READY")
        harness.wait_until(lambda: len(_bypass_records(log)) == 1, 15,
                           what="the first connect's record")
        pid = stats(sock)["handler_pid"]
        from nsnet.proto import bypass as pb
        from test_proto_attack import pidfd_getfd
        stolen = None
        for name in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                s = socket.socket(fileno=pidfd_getfd(pid, int(name)))
                if s.family == socket.AF_UNIX and stolen is None:
                    stolen = s  # the audit stream (the other: sock_diag)
                else:
                    s.close()
        assert stolen is not None
        with stolen:
            stolen.sendall(pb.pack(int(time.time() * 1000), 7, 0, 1, 80, bytes(4), bytes(4)))
        harness.wait_until(lambda: stats(sock)["restarts"] == 1, 15,
                           what="the handler replaced")
        st = stats(sock)
        assert st["protocol_errors"] == 1 and st["handler_pid"] != pid
        say(p)
        r = json.loads(read_line(p.stdout, 30))
        assert r == {"old": "old", "new": [True] * 5, "peer": "10.0.2.2"}
        assert stats(sock)["bypassed"] == 6
        err = finish(p)
        assert "broke its protocol" in err, err
    recs = _bypass_records(log)
    assert len(recs) == 6 and all(rec["dst"] == "10.0.2.2" for rec in recs)


# --------------------------------------------------------------------------
# get_stats counts the bytes of bypassed connections (sock_diag by socket
# cookie, csrc/bypassdiag.c): live ones at get_stats, closed ones at close
# --------------------------------------------------------------------------

# one connection open with 100,000 bytes each way; then what a test adds
OPEN_100K = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])

def echo(s, n):
    s.sendall(b"x" * n)
    got = 0
    while got < n:
        d = s.recv(65536)
        assert d
        got += len(d)

a = socket.create_connection((host, port), timeout=10)
echo(a, 100000)
print("OPEN", flush=True)
sys.stdin.readline()
"""
BYTES = OPEN_100K + """
a.close()
for _ in range(20):  # short connections: closed long before any sample
    with socket.create_connection((host, port), timeout=10) as b:
        echo(b, 1000)
print("CLOSED", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("dest", ["gateway", "egress", "gateway-seccomp"])
def test_stats_count_bypassed_bytes(user, workdir, host_server, request, dest):
    """--bypass-bytes=at-close: exact final counts from the kernel's TCP
    destroy notifications, to which the handler subscribes.  The gateway's
    sockets (bound to lo) and an outside address's."""
    host = "10.0.2.2"
    if dest == "egress":
        request.getfixturevalue("outside")
        host = "198.51.100.1"
    srv = host_server("echo", addr="127.0.0.1" if dest != "egress" else host)
    sock = f"{workdir}/api.sock"
    flags = ["--bypass-bytes=at-close"]
    if dest.endswith("-seccomp"):  # the thread's recvmmsg and dumps under the allowlist
        flags.append("--enable-seccomp")
    with bypass_run(user, sock, BYTES, [host, srv.port], flags=flags) as p:
        assert read_line(p.stdout, 30).startswith(b"OPEN")
        st = stats(sock)
        assert st["bytes_counted"] == "at close" and "bytes_error" not in st
        if dest.endswith("-seccomp"):
            assert harness.thread_seccomp(st["handler_pid"]) == ["2"] * 2
        # the handler, and only it, listens to the destroy notifications
        subs = harness.destroy_subscribers()
        assert len(subs) == 1 and subs <= harness.sock_inodes(st["handler_pid"]), subs
        # open: what the peer acknowledged and what came in order, no FIN yet
        assert st["bytes_live"] == 1 and st["bypassed"] == 1
        assert st["bytes_sent"] == 100000 and st["bytes_received"] == 100000
        say(p)
        assert read_line(p.stdout, 60).startswith(b"CLOSED")
        # each closed connection adds at most 1 per direction (its FINs)
        want = 100000 + 20 * 1000
        harness.wait_until(lambda: stats(sock)["bytes_live"] == 0, 30,
                           what="every connection's destruction seen")
        st = stats(sock)
        assert want <= st["bytes_sent"] <= want + 21, st
        assert want <= st["bytes_received"] <= want + 21, st
        assert st["bytes_inexact"] == 0 and st["bytes_untracked"] == 0
        assert st["bypassed"] == 21 and st["restarts"] == 0
        finish(p)


LONG = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
a = socket.create_connection((host, port), timeout=10)
a.sendall(b"x" * 100000)
got = 0
while got < 100000:
    got += len(a.recv(65536))
print("OPEN", flush=True)
sys.stdin.readline()
a.close()
print("CLOSED", flush=True)
sys.stdin.readline()
"""


SHORT_AFTER = OPEN_100K + """
with socket.create_connection((host, port), timeout=10) as b:  # between two samples
    echo(b, 1000)
print("SHORT", flush=True)
sys.stdin.readline()
"""


def _sampled_open(p, sock, k):
    """The script printed OPEN, its connection open with 100,000 bytes each
    way: get_stats counts them exactly, sampled; then k samples of the
    handler's.  The stats of then."""
    assert read_line(p.stdout, 30).startswith(b"OPEN")
    st = stats(sock)
    assert st["bytes_counted"] == "sampled" and "bytes_error" not in st
    assert st["bytes_sent"] == st["bytes_received"] == 100000 and st["bytes_live"] == 1
    n = st["bytes_samples"]
    harness.wait_until(lambda: stats(sock)["bytes_samples"] >= n + k, 30,
                       what=f"{k} samples of the handler's")
    return st


@SECCOMP
def test_stats_bytes_sampled_by_default(user, workdir, host_server, sec):
    """Without --bypass-bytes nothing subscribes to the kernel's TCP
    destroy notifications (/proc/net/netlink of the namespace the handler
    runs in: no sock_diag socket in a multicast group, where at-close has
    one, test_stats_count_bypassed_bytes): get_stats says "sampled", an
    open connection's bytes are exact (read at get_stats), a short one
    closed between two of the handler's samples is settled by the next
    one with its last sample (at most its bytes) and counted in
    bytes_inexact."""
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    with bypass_run(user, sock, SHORT_AFTER, ["10.0.2.2", srv.port], flags=sec) as p:
        st = _sampled_open(p, sock, 1)
        assert st["bytes_inexact"] == 0
        assert harness.destroy_subscribers() == set()
        assert harness.sock_inodes(st["handler_pid"])  # the handler is there to hold one
        say(p)
        assert read_line(p.stdout, 30).startswith(b"SHORT")
        harness.wait_until(lambda: stats(sock)["bytes_inexact"] == 1, 30,
                           what="the short connection settled by a sample")
        st = stats(sock)
        assert st["bytes_live"] == 1 and st["bypassed"] == 2
        # the open one exact; the short one's last sample: 0 to its 1000 (+1 FIN)
        assert 100000 <= st["bytes_sent"] <= 101001 and 100000 <= st["bytes_received"] <= 101001
        assert harness.destroy_subscribers() == set()
        if sec:  # the thread's sock_diag dumps under the allowlist, nobody killed
            assert harness.thread_seccomp(st["handler_pid"]) == ["2"] * 2
            assert st["restarts"] == 0
        finish(p)


def test_stats_bytes_sampled_without_destroy_events(user, workdir, base_dir, host_server):
    """--bypass-bytes=at-close where the kernel's TCP destroy notifications
    are refused (the subscription fails EPERM under tests/oldkernel.py):
    one warning says so, get_stats says the bytes are sampled: a closed
    connection counts with its last sample and is counted in
    bytes_inexact."""
    wrapper = f"{base_dir}/oldkernel.py"
    shutil.copy(f"{HERE}/oldkernel.py", wrapper)
    os.chmod(wrapper, 0o644)
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    with bypass_run(user, sock, LONG, ["10.0.2.2", srv.port], flags=["--bypass-bytes=at-close"],
                    wrap=[NS_PYTHON, wrapper, "nodestroy"]) as p:
        _sampled_open(p, sock, 2)  # a whole sample of the handler's after the transfer
        say(p)
        assert read_line(p.stdout, 30).startswith(b"CLOSED")
        harness.wait_until(lambda: stats(sock)["bytes_live"] == 0, 30,
                           what="the closed connection settled by a sample")
        st = stats(sock)
        assert st["bytes_sent"] == st["bytes_received"] == 100000
        assert st["bytes_inexact"] == 1
        err = finish(p)
    assert err.count("--bypass-bytes=at-close: the kernel refused the TCP destroy "
                     "notifications (sock_diag: Operation not permitted (EPERM)); the bytes of "
                     "bypassed connections are sampled instead") == 1, err


def test_stats_bytes_across_handler_restart(user, workdir, host_server):
    """--bypass-bytes=at-close: the handler is killed while a bypassed
    connection is open: its replacement (subscribed anew) takes over the
    table (the connection is still there) and sees its end: exact counts."""
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    with bypass_run(user, sock, LONG, ["10.0.2.2", srv.port],
                    flags=["--bypass-bytes=at-close"]) as p:
        assert read_line(p.stdout, 30).startswith(b"OPEN")
        os.kill(stats(sock)["handler_pid"], signal.SIGKILL)
        harness.wait_until(lambda: stats(sock)["restarts"] == 1, 15, what="a new handler")
        # its first sample settles what the dead one tracked
        harness.wait_until(lambda: stats(sock)["bytes_samples"] >= 1, 15,
                           what="the new handler's first sample")
        st = stats(sock)
        assert st["bytes_live"] == 1 and st["bytes_sent"] == 100000
        say(p)
        assert read_line(p.stdout, 30).startswith(b"CLOSED")
        harness.wait_until(lambda: stats(sock)["bytes_live"] == 0, 30,
                           what="the connection's end seen by the new handler")
        st = stats(sock)
        assert 100000 <= st["bytes_sent"] <= 100001 and 100000 <= st["bytes_received"] <= 100001
        assert st["bytes_inexact"] == 0
        subs = harness.destroy_subscribers()  # the new handler's; the dead one's went with it
        assert len(subs) == 1 and subs <= harness.sock_inodes(st["handler_pid"]), subs
        finish(p)


# --------------------------------------------------------------------------
# --enable-seccomp: the handler under its own allowlist (nsnet/seccomp.py,
# profile "bypass"), from the attacker's side
# --------------------------------------------------------------------------

# Stands for a handler that a hostile sockaddr has taken over (the handler
# reads sockaddrs from the command's memory): preloaded into nsnet, it
# wraps process_vm_readv, and when the sockaddr just read asks for port 9
# it does what an attacker in the handler would, create a file of the
# user's.  Nothing else changes.
HIJACK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

static ssize_t (*real)(pid_t, const struct iovec *, unsigned long, const struct iovec *,
                       unsigned long, unsigned long);
static const char *victim;

__attribute__((constructor)) static void init(void)
{
    real = (ssize_t (*)(pid_t, const struct iovec *, unsigned long, const struct iovec *,
                        unsigned long, unsigned long))dlsym(RTLD_NEXT, "process_vm_readv");
    victim = getenv("NSNET_TEST_HIJACK");
}

ssize_t process_vm_readv(pid_t pid, const struct iovec *l, unsigned long ln,
                         const struct iovec *r, unsigned long rn, unsigned long flags)
{
    ssize_t n = real(pid, l, ln, r, rn, flags);
    const struct sockaddr_in *a = l[0].iov_base;
    if (victim && n >= 4 && a->sin_family == AF_INET && ntohs(a->sin_port) == 9) {
        int fd = open(victim, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) {
            (void)write(fd, "hijacked\n", 9);
            close(fd);
        }
    }
    return n;
}
"""

HIJACK = """
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
out = {}
try:
    socket.create_connection((host, 9), timeout=10).close()
    out["hijack"] = 0
except OSError as e:
    out["hijack"] = e.errno
with socket.create_connection((host, port), timeout=10) as s:
    s.sendall(b"after")
    out["after"] = s.recv(5).decode()
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def hijack_shim(base_dir):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the test's preloaded library")
    src, lib = f"{base_dir}/hijack.c", f"{base_dir}/hijack.so"
    with open(src, "w") as f:
        f.write(HIJACK_SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", lib, src, "-ldl"], check=True,
                   timeout=120, capture_output=True)
    os.chmod(lib, 0o755)
    return lib


def test_attack_hijacked_handler_killed(user, workdir, host_server, hijack_shim):
    """Attacker's side: a taken-over handler (HIJACK_SHIM) opens a file of
    the user's for writing.  With --enable-seccomp that openat is outside
    its allowlist: the handler is killed by SIGSYS before the file exists;
    the supervisor starts another, as for any dead handler, which answers
    the connect the dead one held ECONNABORTED, runs under the filter again
    and bypasses the next connect.  (Without the filter the file is
    written and the handler goes on.)"""
    srv = host_server("echo")
    sock = f"{workdir}/api.sock"
    victim = f"{workdir}/hijacked"
    env = user.env(LD_PRELOAD=hijack_shim, NSNET_TEST_HIJACK=victim)
    p = user.popen([harness.nsnet_bin(), "run", "--bypass", f"--api-socket={sock}",
                    "--enable-seccomp", "--", NS_PYTHON, "-c", HIJACK, "10.0.2.2", str(srv.port)],
                   env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        r = json.loads(read_line(p.stdout, 60))
        assert not os.path.exists(victim)
        st = stats(sock)
        assert r == {"hijack": errno.ECONNABORTED, "after": "after"}, (r, st)
        assert st["restarts"] == 1 and st["aborted"] == 1 and st["bypassed"] == 1, st
        assert harness.thread_seccomp(st["handler_pid"]) == ["2"] * 2
        err = finish(p)
        assert f"the bypass handler exited (status -{int(signal.SIGSYS)})" in err, err
    finally:
        harness.kill_and_reap(p)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()
    assert not os.path.exists(victim)


MANY_OPEN = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for _ in range(n):
    a = socket.create_connection((host, port), timeout=10)
    a.sendall(b"x" * 1000)
    got = 0
    while got < 1000:
        got += len(a.recv(65536))
    conns.append(a)
print("OPEN", flush=True)
sys.stdin.readline()
for a in conns:
    a.close()
print("CLOSED", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("dest,n,seccomp", [
    ("gateway", 1, False), ("gateway6", 1, False), ("egress", 1, False), ("gateway", 100, False),
    ("gateway", 513, False), ("gateway", 1, True), ("gateway", 513, True)])
def test_stats_bytes_sampled_by_lookup(user, workdir, host_server, request, dest, n, seccomp):
    """The default (sampled) samples up to 512 open connections by looking
    each one up by its addresses and cookie (64 requests a send): no walk
    of the host's TCP sockets (bytes_dumps stays 0), for the gateway's
    sockets (bound to lo), IPv6 ones and an outside address's (unbound),
    100 at once (two sends); 513 open: a walk.  Either
    way every connection's last sample holds its bytes: closed, each
    counts them (+1 for the FINs at most), in bytes_inexact.  Both also
    under --enable-seccomp (the handler's allowlist): never a restart."""
    host, addr, flags = "10.0.2.2", "127.0.0.1", []
    if dest == "gateway6":
        host, addr, flags = "fd00::2", "::1", ["-6"]
    elif dest == "egress":
        request.getfixturevalue("outside")
        host = addr = "198.51.100.1"
    if seccomp:
        flags.append("--enable-seccomp")
    srv = host_server("echo", addr=addr)
    sock = f"{workdir}/api.sock"
    with bypass_run(user, sock, MANY_OPEN, [host, srv.port, n], flags=flags) as p:
        assert read_line(p.stdout, 60).startswith(b"OPEN")
        st = stats(sock)
        assert st["bytes_counted"] == "sampled" and st["bytes_live"] == n, st
        k = st["bytes_samples"]
        harness.wait_until(lambda: stats(sock)["bytes_samples"] >= k + 2, 30,
                           what="two samples of the handler's")
        st = stats(sock)
        assert (st["bytes_dumps"] > 0) == (n > 512), st
        say(p)
        assert read_line(p.stdout, 30).startswith(b"CLOSED")
        harness.wait_until(lambda: stats(sock)["bytes_live"] == 0, 30,
                           what="the closed connections settled by a sample")
        st = stats(sock)
        assert 1000 * n <= st["bytes_sent"] <= 1001 * n, st
        assert 1000 * n <= st["bytes_received"] <= 1001 * n, st
        assert st["bytes_inexact"] == n and st["restarts"] == 0, st
        finish(p)
