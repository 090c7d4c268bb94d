"""`nsnet run -- CMD`: namespaces, a network configured before CMD starts,
exit status, signals, stdio and the terminal, --publish, --no-egress, --dns,
and nothing left behind."""
import hashlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import time

import pytest

import harness
from harness import (NS_PYTHON, HarnessError, api_call, free_port, kill_and_reap, read_line,
                     tcp_send, udp_roundtrip, wait_until)

pytestmark = pytest.mark.timeout(120)

unpriv_only = pytest.mark.parametrize("user", ["unpriv"], indirect=True)

EXIT_SETUP = 125

# Run inside the namespace: report each of HUP, INT, QUIT, TERM it receives,
# then exit 40+N for the first signal N.  The pause after the first signal
# would catch a second, duplicate delivery.
SIGNAL_PROBE = """
import signal, sys, time
got = []
for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(n))
print("READY", flush=True)
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.3)
print("GOT", *got, flush=True)
sys.exit(40 + got[0] if got else 1)
"""


def nsnet_run(user, args, timeout=60, **kw):
    return user.run([harness.nsnet_bin(), "run", *[str(a) for a in args]], timeout=timeout, **kw)


def nsnet_popen(user, args, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return user.popen([harness.nsnet_bin(), "run", *[str(a) for a in args]], **kw)


def client(base_dir, *args):
    return [NS_PYTHON, f"{base_dir}/nsclient.py", *[str(a) for a in args]]


def last_json(out: bytes | str) -> dict:
    text = out.decode() if isinstance(out, bytes) else out
    return json.loads(text.strip().splitlines()[-1])


def assert_nothing_left():
    """No process of ours is left: the harness made pytest a subreaper, so an
    orphaned helper, forwarder or COMMAND would be re-parented to it."""
    left = harness.child_pids()
    assert left == [], f"processes left behind: {[(p, harness.cmdline(p)) for p in left]}"


@pytest.fixture
def procs():
    """Popen objects killed (by PID) and reaped at teardown."""
    started = []
    yield started
    for p in started:
        kill_and_reap(p)
        for f in (p.stdout, p.stderr, p.stdin):
            if f:
                f.close()


# --------------------------------------------------------------------------
# Namespaces and the network, before CMD's first instruction
# --------------------------------------------------------------------------

def test_network_configured_before_exec(user):
    # CMD is `cat`: it does nothing before reading; the interface, address
    # and route are already there.
    cp = nsnet_run(user, ["--", "cat", "/proc/net/route", "/proc/self/uid_map",
                          "/proc/self/gid_map", "/proc/net/if_inet6"], check=True, text=True)
    lines = cp.stdout.splitlines()
    route = [ln.split() for ln in lines if ln.startswith("tap0")]
    default = [r for r in route if r[1] == "00000000"]
    assert default, cp.stdout
    assert default[0][2] == "0202000A"  # gateway 10.0.2.2, little-endian hex
    maps = [ln.split() for ln in lines if len(ln.split()) == 3 and ln.split()[0] == "0"]
    assert maps == [["0", str(user.uid), "1"], ["0", str(user.gid), "1"]]
    cp = nsnet_run(user, ["--", "ip", "-j", "addr"], check=True, text=True)
    links = {link["ifname"]: link for link in json.loads(cp.stdout)}
    assert sorted(links) == ["lo", "tap0"]
    assert "UP" in links["lo"]["flags"] and "UP" in links["tap0"]["flags"]
    inet = [(a["local"], a["prefixlen"], a.get("broadcast")) for a in links["tap0"]["addr_info"]
            if a["family"] == "inet"]
    assert inet == [("10.0.2.100", 24, "10.0.2.255")]
    assert links["tap0"]["mtu"] == 1500
    assert_nothing_left()


def test_mtu_and_cidr(user):
    cp = nsnet_run(user, ["--mtu", "9000", "--cidr", "10.8.0.0/24", "--",
                          "sh", "-c", "ip -j addr show tap0; ip -j route show default"],
                   check=True, text=True)
    link_json, route_json = cp.stdout.splitlines()
    link = json.loads(link_json)[0]
    assert link["mtu"] == 9000
    assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == ["10.8.0.100"]
    assert json.loads(route_json)[0]["gateway"] == "10.8.0.2"


def test_host_network_untouched(user):
    """CMD gets new namespaces; nsnet and the host keep theirs."""
    cp = nsnet_run(user, ["--", "readlink", "/proc/self/ns/net", "/proc/self/ns/mnt",
                          "/proc/self/ns/user"], check=True, text=True)
    inside = cp.stdout.split()
    outside = [os.readlink(f"/proc/self/ns/{k}") for k in ("net", "mnt", "user")]
    assert len(inside) == 3
    assert all(i != o for i, o in zip(inside, outside)), (inside, outside)


@unpriv_only
def test_map_current_user(user):
    cp = nsnet_run(user, ["--map-current-user", "--", "sh", "-c",
                          "id -u; id -g; cat /proc/self/uid_map; ip -br link show tap0"],
                   check=True, text=True)
    out = cp.stdout.split()
    assert out[:2] == [str(user.uid), str(user.gid)]
    assert out[2:5] == [str(user.uid), str(user.uid), "1"]
    assert "tap0" in cp.stdout  # the network is configured all the same


@unpriv_only
def test_map_subids(user):
    cp = nsnet_run(user, ["--map-subids", "--", "cat", "/proc/self/uid_map",
                          "/proc/self/gid_map"], check=True, text=True)
    rows = [ln.split() for ln in cp.stdout.splitlines()]
    start, count = _subids("/etc/subuid")
    gstart, gcount = _subids("/etc/subgid")
    assert rows == [["0", str(user.uid), "1"], ["1", str(start), str(count)],
                    ["0", str(user.gid), "1"], ["1", str(gstart), str(gcount)]]


@pytest.mark.parametrize("user", ["root"], indirect=True)
def test_map_subids_without_a_range(user):
    cp = nsnet_run(user, ["--map-subids", "--", "true"], text=True)
    assert cp.returncode == EXIT_SETUP
    assert "--map-subids: no range for root in /etc/subuid" in cp.stderr
    assert_nothing_left()


def _subids(path):
    with open(path) as f:
        for line in f:
            name, start, count = line.strip().split(":")
            if name == harness.TEST_USER:
                return int(start), int(count)
    raise HarnessError(f"{harness.TEST_USER} has no range in {path}")


# --------------------------------------------------------------------------
# Exit status, signals, stdio, terminal
# --------------------------------------------------------------------------

@pytest.mark.parametrize("script,expected", [
    ("exit 0", 0),
    ("exit 3", 3),
    ("kill -TERM $$", 128 + signal.SIGTERM),
    ("kill -KILL $$", 128 + signal.SIGKILL),
])
def test_exit_status(user, script, expected):
    cp = nsnet_run(user, ["--", "sh", "-c", script])
    assert cp.returncode == expected, cp.stderr
    assert cp.stderr == b""  # nsnet run is quiet when all goes well
    assert_nothing_left()


def test_command_not_found_or_not_executable(user, base_dir):
    cp = nsnet_run(user, ["--", "no-such-command-nsnet"], text=True)
    assert cp.returncode == 127
    assert "no-such-command-nsnet: command not found" in cp.stderr
    cp = nsnet_run(user, ["--", f"{base_dir}/nsclient.py"], text=True)  # mode 0644
    assert cp.returncode == 126
    assert "Permission denied" in cp.stderr
    assert_nothing_left()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_forwarded_once(user, procs, sig):
    p = nsnet_popen(user, ["--", NS_PYTHON, "-c", SIGNAL_PROBE])
    procs.append(p)
    assert read_line(p.stdout, 30).strip() == b"READY"
    os.kill(p.pid, sig)
    assert p.wait(timeout=30) == 40 + sig, p.stderr.read()
    assert p.stdout.read().split() == [b"GOT", str(int(sig)).encode()]
    assert_nothing_left()


def test_signal_kills_command(user, procs):
    p = nsnet_popen(user, ["--", "sleep", "60"])
    procs.append(p)
    wait_until(lambda: any(harness.cmdline(c)[:1] == ["sleep"]
                           for c in harness.descendants(p.pid)), 30, what="COMMAND started")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert_nothing_left()


def test_stdin_stdout_passthrough(user):
    data = os.urandom(1 << 20)
    cp = nsnet_run(user, ["--", "sh", "-c", "sha256sum; echo to-stderr >&2"], input=data,
                   stdin=None)
    assert cp.returncode == 0
    assert cp.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert cp.stderr == b"to-stderr\n"


def test_sigpipe_default_in_command(user):
    # Python ignores SIGPIPE; COMMAND must get the default back.
    cp = nsnet_run(user, ["--", "sh", "-c", "grep SigIgn /proc/self/status"], text=True)
    assert int(cp.stdout.split()[1], 16) & (1 << (signal.SIGPIPE - 1)) == 0


class Pty:
    """A terminal: `setsid -c` makes it the controlling terminal of ARGV."""

    def __init__(self, argv, env):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(["setsid", "-c", *argv], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, cwd="/")
        os.close(slave)
        self.buf = b""

    def expect(self, token: bytes, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while token not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"no {token!r} on the terminal; got {self.buf!r}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: every slave fd closed
                    chunk = b""
                if not chunk:
                    raise HarnessError(f"terminal closed before {token!r}; got {self.buf!r}")
                self.buf += chunk
        i = self.buf.index(token) + len(token)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait_foreground(self, comm: str, timeout: float = 20) -> int:
        """Wait until a process named comm, started under this terminal,
        runs (or sleeps) as the terminal's foreground process group; its PID."""
        def found():
            fg = os.tcgetpgrp(self.master)
            for pid in harness.descendants(self.proc.pid):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
                if name == comm and int(pgrp) == fg and state in "RS":
                    return pid
            return None
        return wait_until(found, timeout, what=f"{comm} in the terminal's foreground")

    def close(self):
        kill_and_reap(self.proc)
        os.close(self.master)


@pytest.fixture
def terminal(user):
    made = []

    def make(args):
        t = Pty(user.wrap([harness.nsnet_bin(), "run", *args]),
                user.env(PS1="PROMPT$ ", TERM="dumb"))
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def test_interactive_shell_on_a_terminal(user, terminal):
    t = terminal(["--", "bash", "--norc", "--noprofile", "-i"])
    t.expect(b"PROMPT$ ")
    t.send(b"echo $((6*7)); ip -br -4 addr show tap0\n")
    out = t.expect(b"PROMPT$ ")
    assert b"42" in out and b"10.0.2.100/24" in out
    # Ctrl-C interrupts the foreground job, not the shell nor nsnet.
    t.send(b"sleep 60\n")
    t.expect(b"sleep 60")
    t.wait_foreground("sleep")
    t.send(b"\x03")
    t.expect(b"PROMPT$ ")
    # Job control: Ctrl-Z stops the job, fg resumes it.
    t.send(b"sleep 60\n")
    t.expect(b"sleep 60")
    t.wait_foreground("sleep")
    t.send(b"\x1a")
    assert b"Stopped" in t.expect(b"PROMPT$ ")
    t.send(b"fg\n")
    t.expect(b"sleep 60")
    t.wait_foreground("sleep")  # running again (not T), in the foreground
    t.send(b"\x03")
    t.expect(b"PROMPT$ ")
    t.send(b"exit 5\n")
    assert t.proc.wait(timeout=20) == 5


def _forwarders(nsnet_pid):
    out = []
    for pid in harness.child_pids(nsnet_pid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "nsnet-forwarder":
                    out.append(pid)
        except OSError:
            pass
    return out


def test_nsnet_in_background_group_keeps_working(user, terminal):
    """The shell takes the terminal's foreground; with `stty tostop`, a
    warning nsnet writes from the background must not stop it."""
    t = terminal(["--", "bash", "--norc", "--noprofile", "-i"])
    t.expect(b"PROMPT$ ")
    t.send(b"stty tostop; echo tostop-set\n")
    t.expect(b"tostop-set\r\n")
    t.expect(b"PROMPT$ ")
    old = harness.wait_until(lambda: _forwarders(t.proc.pid), 10, what="the forwarder")
    os.kill(old[0], signal.SIGKILL)  # nsnet logs a warning and restarts it
    harness.wait_until(lambda: [p for p in _forwarders(t.proc.pid) if p != old[0]], 30,
                       what="a new forwarder")
    t.expect(b"restarting")
    t.send(b"exit 7\n")
    assert t.proc.wait(timeout=20) == 7


def test_ctrl_c_reaches_command_once(user, terminal):
    t = terminal(["--", NS_PYTHON, "-c", SIGNAL_PROBE])
    t.expect(b"READY")
    t.send(b"\x03")
    out = t.expect(b"\n", timeout=30)
    while b"GOT" not in out:
        out += t.expect(b"\n", timeout=30)
    assert out.split(b"GOT")[1].split() == [str(int(signal.SIGINT)).encode()]
    assert t.proc.wait(timeout=20) == 40 + signal.SIGINT


# --------------------------------------------------------------------------
# Traffic: publish, host loopback, no egress
# --------------------------------------------------------------------------

def test_publish_tcp_server_inside(user, base_dir, procs):
    port = free_port()
    r, w = os.pipe()
    p = nsnet_popen(user, ["-p", f"127.0.0.1:{port}:8080", f"--ready-fd={w}", "--",
                           *client(base_dir, "tcp-serve", "0.0.0.0", 8080, "echo", 1)],
                    pass_fds=[w])
    os.close(w)
    procs.append(p)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
    assert read_line(p.stdout, 30).startswith(b"READY 8080")
    data = os.urandom(200_000)
    assert tcp_send("127.0.0.1", port, data) == data
    assert p.wait(timeout=30) == 0, p.stderr.read()
    result = last_json(p.stdout.read())
    assert result["connections"][0]["echoed"] == len(data)
    assert_nothing_left()


@pytest.mark.parametrize("mode,peer", [(None, "10.0.2.100"), ("splice", "10.0.2.100"),
                                       ("slirp", "10.0.2.2")])
def test_publish_modes(user, base_dir, procs, mode, peer):
    """splice (the default): the fast path, to the namespace's address, which
    the server sees as peer; slirp: libslirp's forward, the server sees the
    gateway."""
    port = free_port()
    flags = [f"--publish-mode={mode}"] if mode else []
    p = nsnet_popen(user, [*flags, "-p", f"127.0.0.1:{port}:8080", "--",
                           *client(base_dir, "tcp-serve", "0.0.0.0", 8080, "sink", 1)])
    procs.append(p)
    assert read_line(p.stdout, 30).startswith(b"READY")
    data = os.urandom(500_000)
    reply = tcp_send("127.0.0.1", port, data).decode().split()
    assert reply == [str(len(data)), hashlib.sha256(data).hexdigest()]
    assert p.wait(timeout=30) == 0, p.stderr.read()
    assert last_json(p.stdout.read())["connections"][0]["peer"] == peer
    assert_nothing_left()


@pytest.mark.parametrize("mode", [None, "slirp"])
def test_publish_does_not_reach_a_loopback_only_server(user, base_dir, procs, mode):
    """Issue 11 item 3: a server that listens on the namespace's 127.0.0.1
    only stays private in both publish modes (the fast path used to connect
    to the namespace's loopback and exposed it)."""
    port = free_port()
    flags = [f"--publish-mode={mode}"] if mode else []
    p = nsnet_popen(user, [*flags, "-p", f"127.0.0.1:{port}:8080", "--",
                           *client(base_dir, "tcp-serve", "127.0.0.1", 8080, "echo", 1)])
    procs.append(p)
    assert read_line(p.stdout, 30).startswith(b"READY")
    for _ in range(3):
        assert harness.refused_through(port)
    assert p.poll() is None  # the server never got a connection


def test_publish_udp(user, base_dir, procs):
    port = free_port(kind=socket.SOCK_DGRAM)
    p = nsnet_popen(user, ["--publish", f"127.0.0.1:{port}:5353/udp", "--",
                           *client(base_dir, "udp-serve", "0.0.0.0", 5353, 1)])
    procs.append(p)
    assert read_line(p.stdout, 30).startswith(b"READY")
    assert udp_roundtrip("127.0.0.1", port, b"ping") == b"ping"
    assert p.wait(timeout=30) == 0


def test_publish_ipv6(user, base_dir, procs):
    port = free_port(family=socket.AF_INET6, addr="::1")
    p = nsnet_popen(user, ["-6", "-p", f"[::1]:{port}:8080", "--",
                           *client(base_dir, "tcp-serve", "::", 8080, "echo", 1)])
    procs.append(p)
    assert read_line(p.stdout, 30).startswith(b"READY")
    # The namespace's IPv6 address comes from SLAAC: retry until it is there.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert tcp_send("::1", port, b"hello6", timeout=5) == b"hello6"
            break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert p.wait(timeout=30) == 0


def test_client_inside_reaches_host_loopback(user, base_dir, host_server):
    srv = host_server("echo")
    cp = nsnet_run(user, ["--", *client(base_dir, "tcp-echo", "10.0.2.2", srv.port, 300_000)],
                   text=True)
    assert cp.returncode == 0, cp.stderr
    r = last_json(cp.stdout)
    assert r["received"] == r["sent"] == 300_000 and r["sha_received"] == r["sha_sent"]
    assert srv.connections == 1


def test_disable_host_loopback(user, base_dir, host_server):
    srv = host_server("sink")
    cp = nsnet_run(user, ["--disable-host-loopback", "--",
                          *client(base_dir, "connect", "10.0.2.2", srv.port)], text=True)
    assert last_json(cp.stdout)["ok"] is False
    assert srv.connections == 0


def test_no_egress_blocks_outbound_but_publish_works(user, base_dir, host_server, procs):
    srv = host_server("sink")
    port = free_port()
    script = (f"{NS_PYTHON} {base_dir}/nsclient.py connect 10.0.2.2 {srv.port}; "
              f"exec {NS_PYTHON} {base_dir}/nsclient.py tcp-serve 0.0.0.0 8080 echo 1")
    p = nsnet_popen(user, ["--no-egress", "-p", f"127.0.0.1:{port}:8080", "--",
                           "sh", "-c", script])
    procs.append(p)
    first = json.loads(read_line(p.stdout, 30))
    assert first["ok"] is False, first
    assert read_line(p.stdout, 30).startswith(b"READY")
    assert tcp_send("127.0.0.1", port, b"still published") == b"still published"
    assert p.wait(timeout=30) == 0
    assert srv.connections == 0


# --------------------------------------------------------------------------
# --dns, -a, set-up errors, nothing left behind
# --------------------------------------------------------------------------

def _host_state():
    with open("/etc/resolv.conf", "rb") as f:
        content = f.read()
    with open("/proc/self/mountinfo") as f:
        mounts = [ln for ln in f if "resolv.conf" in ln]
    leftovers = [n for n in os.listdir("/tmp") if n.startswith("nsnet-run.")]
    return content, mounts, leftovers


@pytest.mark.parametrize("flags,servers", [
    ([], ["10.0.2.3"]),
    (["--cidr", "10.9.0.0/24", "-6"], ["10.9.0.3", "fd00::3"]),
])
def test_dns_resolv_conf_inside_only(user, flags, servers):
    """Only the file's contents are checked: no DNS query is ever sent
    (test_run_dns.py resolves through it)."""
    before = _host_state()
    for dns in ([], ["--dns"]):  # the default, and asked for
        cp = nsnet_run(user, [*dns, *flags, "--", "cat", "/etc/resolv.conf"], text=True)
        assert cp.returncode == 0, cp.stderr
        names = [ln.split()[1] for ln in cp.stdout.splitlines() if ln.startswith("nameserver")]
        assert names == servers
        assert _host_state() == before  # host file, host mounts, no temp files left
    # With --no-dns, COMMAND sees the host's file.
    cp = nsnet_run(user, ["--no-dns", "--", "cat", "/etc/resolv.conf"])
    assert cp.stdout == before[0]


def test_api_socket_and_ready_fd(user, workdir, procs):
    api = os.path.join(workdir, "run.sock")
    port = free_port()
    r, w = os.pipe()
    p = nsnet_popen(user, ["-a", api, "-r", w, "-p", f"127.0.0.1:{port}:80", "--",
                           "sleep", "60"], pass_fds=[w])
    os.close(w)
    procs.append(p)
    try:
        assert os.read(r, 16) == b"1"
        assert os.read(r, 16) == b""  # closed after the byte, also by COMMAND
    finally:
        os.close(r)
    entries = json.loads(api_call(api, {"execute": "list_hostfwd"}))["entries"]
    assert [(e["host_addr"], e["host_port"], e["guest_port"]) for e in entries] == \
        [("127.0.0.1", port, 80)]
    info = json.loads(api_call(api, {"execute": "get_info"}))["return"]
    assert info["supervisor_pid"] == p.pid  # setpriv execs: the PID is nsnet's
    assert info["tap"]["name"] == "tap0" and info["guest"] == "10.0.2.100"
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert not os.path.exists(api)
    assert_nothing_left()


@pytest.mark.parametrize("args,pattern", [
    (["-p", "nonsense"], "--publish 'nonsense'"),
    (["-p", "80:70000"], "guest port must be from 1 to 65535"),
    (["-p", "[::1]:8080:80"], "needs -6"),
    (["--cidr", "10.0.2.1/24"], "network address"),
    (["--mtu", "20"], "MTU"),
    (["--publish-mode", "nope"], "--publish-mode must be one of splice, slirp"),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["--ready-fd", "999"], "not open"),
    (["--bypass-bytes=at-close"], "nsnet run: --bypass-bytes needs --bypass "),
    (["--bypass", "--bypass-bytes=exact"], "--bypass-bytes must be sampled or at-close"),
])
def test_bad_options(user, args, pattern):
    cp = nsnet_run(user, [*args, "--", "true"], text=True)
    assert cp.returncode == EXIT_SETUP
    assert pattern in cp.stderr, cp.stderr
    assert_nothing_left()


def test_publish_port_in_use(user):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cp = nsnet_run(user, ["-p", f"127.0.0.1:{port}:80", "--", "echo", "never"], text=True)
    assert cp.returncode == EXIT_SETUP
    assert f"cannot publish 127.0.0.1:{port}:80/tcp: address already in use" in cp.stderr
    assert "never" not in cp.stdout  # COMMAND never started
    assert_nothing_left()


def test_help():
    cp = subprocess.run([harness.nsnet_bin(), "run", "--help"], capture_output=True, text=True,
                        timeout=30)
    assert cp.returncode == 0
    for flag in ("--publish", "--no-egress", "--dns", "--api-socket", "--ready-fd", "--mtu",
                 "--cidr", "--enable-ipv6", "--disable-host-loopback", "--map-current-user",
                 "--map-subids"):
        assert flag in cp.stdout


def test_command_options_are_its_own(user):
    # Options after COMMAND belong to COMMAND, even without "--".
    cp = nsnet_run(user, ["sh", "-c", "echo $0 $1", "-p", "x"], text=True)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["-p", "x"]


# --------------------------------------------------------------------------
# The supervisor underneath: forwarder crashes
# --------------------------------------------------------------------------

def _forwarder_pid(api, old=None, proc=None):
    """The forwarder's PID (one other than old); None if proc exits first."""
    def new_pid():
        if proc is not None and proc.poll() is not None:
            return -1
        try:
            info = json.loads(api_call(api, {"execute": "get_info"}, timeout=10))["return"]
        except (OSError, ValueError):
            return None
        pid = info.get("forwarder_pid")
        if info.get("forwarder_state", "running") != "running":
            return None  # (re)starting: forwards not re-added yet
        return pid if pid and pid != old else None
    pid = harness.wait_until(new_pid, 30, interval=0.05, what="a (new) forwarder")
    return None if pid == -1 else pid


def test_forwarder_crash_is_survived(user, workdir, base_dir, procs):
    api = os.path.join(workdir, "run.sock")
    port = free_port()
    p = nsnet_popen(user, ["-a", api, "--publish-mode=slirp", "-p", f"127.0.0.1:{port}:8080",
                           "--", *client(base_dir, "tcp-serve", "0.0.0.0", 8080, "echo", 2)])
    procs.append(p)
    assert read_line(p.stdout, 30).startswith(b"READY")
    assert tcp_send("127.0.0.1", port, b"before") == b"before"
    first = _forwarder_pid(api)
    os.kill(first, signal.SIGKILL)
    _forwarder_pid(api, old=first)
    # COMMAND never noticed; the published port is back.
    assert tcp_send("127.0.0.1", port, b"after") == b"after"
    assert p.wait(timeout=30) == 0, p.stderr.read()
    assert_nothing_left()


def test_network_lost_stops_command(user, workdir, procs):
    """When the supervisor gives up (more than 5 forwarder deaths in 60 s),
    COMMAND is stopped and nsnet exits 125 saying why."""
    api = os.path.join(workdir, "run.sock")
    p = nsnet_popen(user, ["-a", api, "--", "sleep", "60"])
    procs.append(p)
    pid = _forwarder_pid(api, proc=p)
    for _ in range(6):
        os.kill(pid, signal.SIGKILL)
        pid = _forwarder_pid(api, old=pid, proc=p)
        if pid is None:
            break  # nsnet gave up
    assert p.wait(timeout=60) == EXIT_SETUP
    err = p.stderr.read().decode()
    assert "network lost" in err and "stopping sleep" in err, err
    assert_nothing_left()


def test_ipv6_address_usable_when_command_starts(user, host_server):
    """-6: COMMAND starts once tap0's SLAAC address is usable (it used to
    start ~3 s before duplicate-address detection ended, and its first IPv6
    connection failed)."""
    srv = host_server("echo", addr="::1")
    probe = ("import socket, sys\n"
             "lines = open('/proc/net/if_inet6').read().split('\\n')\n"
             "ok = [l for l in lines if l.endswith('tap0') and l.split()[3] == '00'"
             " and not int(l.split()[4], 16) & 0x48]\n"
             "s = socket.create_connection(('fd00::2', int(sys.argv[1])), timeout=10)\n"
             "s.sendall(b'v6'); print(len(ok), s.recv(2).decode())\n")
    cp = nsnet_run(user, ["-6", "--", NS_PYTHON, "-c", probe, srv.port], text=True)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["1", "v6"]


def test_cidr6(user, host_server):
    """--cidr6: another IPv6 /64 (slirp4netns has fd00::/64 fixed)."""
    srv = host_server("echo", addr="::1")
    probe = ("import socket, sys\n"
             "addrs = [l.split()[0] for l in open('/proc/net/if_inet6') if l.split()[5] == 'tap0'"
             " and l.split()[3] == '00']\n"
             "s = socket.create_connection(('fd00:1:2:3::2', int(sys.argv[1])), timeout=10)\n"
             "s.sendall(b'v6'); print(addrs[0][:16], s.recv(2).decode())\n")
    cp = nsnet_run(user, ["-6", "--cidr6=fd00:1:2:3::/64", "--", NS_PYTHON, "-c", probe,
                          srv.port], text=True)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["fd00000100020003", "v6"]
