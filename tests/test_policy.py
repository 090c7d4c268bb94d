"""Egress policy (docs/policy.md), end to end: `nsnet run` with --egress,
--allow, --deny; what a program inside can reach, what it sees when it may
not, what the host-side servers saw; bypass attempts from inside; the API
(get_policy, set_policy, get_stats) and a restarted forwarder; DNS names
through a resolver of the test's own on loopback.

Targets: 127.0.0.1/::1 through 10.0.2.2/fd00::2, the built-in DNS at
10.0.2.3, and addresses these tests add to the sealed test namespace's
loopback (10.255.1.0/24)."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading

import pytest

import harness
from harness import NS_PYTHON, HostServer, free_port, kill_and_reap, read_line

pytestmark = pytest.mark.timeout(180)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def probe(base_dir):
    dest = os.path.join(base_dir, "policy_probe.py")
    shutil.copy(os.path.join(HERE, "policy_probe.py"), dest)
    os.chmod(dest, 0o644)
    return dest


@pytest.fixture
def servers():
    made = []

    def make(kind="tcp", addr="127.0.0.1"):
        s = HostServer("echo", kind, addr)  # .connections: TCP connections or UDP datagrams
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def counted(get, want, timeout=10):
    """Assert get() == want once it is: a connect the probe saw succeed
    reaches the host server's accept loop (its count) a moment later.  A
    count above want never comes back down, so a negative part still fails."""
    try:
        harness.wait_until(lambda: get() == want, timeout, what=f"counts {want}")
    except harness.HarnessError:
        pass
    assert get() == want


def run_paused(user, probe, flags, steps, go, at_pause, timeout=90):
    """run_probe with a ["pause", go] step: at_pause() runs (outside: the
    command may not drive nsnet's API) while the command waits."""
    # stderr to a file: nsnet's log (an audit line per denied flow) must
    # not fill a pipe nobody reads while the command waits
    with tempfile.TemporaryFile() as errf:
        p = user.popen([harness.nsnet_bin(), "run", *[str(f) for f in flags], "--", NS_PYTHON,
                        probe, json.dumps(steps)], stdout=subprocess.PIPE, stderr=errf)
        try:
            assert read_line(p.stdout, 60) == b"PAUSED\n"
            got = at_pause()
            open(go, "w").close()
            out, _ = p.communicate(timeout=timeout)
        finally:
            kill_and_reap(p)
        errf.seek(0)
        assert p.returncode == 0, (p.returncode, out, errf.read()[-4000:])
    return json.loads(out.decode().strip().splitlines()[-1]), got


def run_probe(user, probe, flags, steps, timeout=90, argv_prefix=None):
    argv = [harness.nsnet_bin(), "run", *[str(f) for f in flags], "--", NS_PYTHON, probe,
            json.dumps(steps)]
    if argv_prefix is None:
        cp = user.run(argv, timeout=timeout)
    else:
        cp = subprocess.run([*argv_prefix, *user.wrap(argv)], timeout=timeout, cwd="/",
                            env=user.env(), stdin=subprocess.DEVNULL, capture_output=True)
    assert cp.returncode == 0, (cp.returncode, cp.stdout, cp.stderr)
    # the forwarder never died on the way (a restart would hide a bug, and
    # forget the learned names)
    assert b"restarting" not in cp.stderr, cp.stderr
    return json.loads(cp.stdout.decode().strip().splitlines()[-1]), cp.stderr.decode()


# --------------------------------------------------------------------------
# Addresses, ports, protocols
# --------------------------------------------------------------------------

def test_default_deny_allows_one_port(user, probe, servers, workdir):
    a, b, u = servers(), servers(), servers("udp")
    audit = os.path.join(workdir, "audit.log")
    res, err = run_probe(user, probe, ["--egress=deny", f"--allow=tcp:10.0.2.2:{a.port}",
                                       f"--audit-log={audit}"],
                         [["tcp", "10.0.2.2", a.port], ["tcp", "10.0.2.2", b.port],
                          ["udp", "10.0.2.2", u.port, 16], ["ping", "10.0.2.2"]])
    assert res[0]["result"] == "ok"
    assert res[1]["result"] == "ECONNREFUSED" and res[1]["seconds"] < 1.0
    assert res[2]["result"] == "EHOSTUNREACH"  # ICMP administratively prohibited
    assert res[3]["result"] == "prohibited"
    counted(lambda: (a.connections, b.connections, u.connections), (1, 0, 0))
    # every denied flow is an audit record, on the log and in the file
    recs = [json.loads(line) for line in open(audit)]
    denied = {(r["proto"], r.get("dport")) for r in recs if r["action"] == "deny"}
    assert denied == {("tcp", b.port), ("udp", u.port), ("icmp", None)}
    assert all(r["rule_text"] == "default deny" and r["src"] == "10.0.2.100" for r in recs)
    assert f"egress deny: tcp 10.0.2.100 -> 10.0.2.2:{b.port}" in err


def test_default_allow_with_deny_rule(user, probe, servers):
    a, b, u = servers(), servers(), servers("udp")
    res, _ = run_probe(user, probe, [f"--deny=tcp:10.0.2.2:{b.port}"],
                       [["tcp", "10.0.2.2", a.port], ["tcp", "10.0.2.2", b.port],
                        ["udp", "10.0.2.2", u.port, 16], ["ping", "10.0.2.2"]])
    assert [r["result"] for r in res] == ["ok", "ECONNREFUSED", "reply", "reply"]
    counted(lambda: (a.connections, b.connections, u.connections), (1, 0, 1))


def test_first_match_wins_in_command_line_order(user, probe, servers):
    a = servers()
    rule = f"tcp:10.0.2.2:{a.port}"
    res, _ = run_probe(user, probe, ["--egress=allow", f"--deny={rule}", f"--allow={rule}"],
                       [["tcp", "10.0.2.2", a.port]])
    assert res[0]["result"] == "ECONNREFUSED"
    res, _ = run_probe(user, probe, ["--egress=deny", f"--allow={rule}", f"--deny={rule}"],
                       [["tcp", "10.0.2.2", a.port]])
    assert res[0]["result"] == "ok"


def test_policy_file(user, probe, servers, workdir):
    a, b = servers(), servers()
    path = os.path.join(workdir, "policy.json")
    with open(path, "w") as f:
        json.dump({"egress": "deny", "rules": [{"action": "allow", "proto": "tcp",
                                                "dest": "10.0.2.2", "ports": str(a.port)}]}, f)
    os.chmod(path, 0o644)
    res, _ = run_probe(user, probe, [f"--policy={path}"],
                       [["tcp", "10.0.2.2", a.port], ["tcp", "10.0.2.2", b.port]])
    assert [r["result"] for r in res] == ["ok", "ECONNREFUSED"]


@pytest.mark.parametrize("flags,msg", [
    (["--egress=maybe"], "--egress must be allow or deny"),
    (["--allow=10.0.2.2:99999"], "--allow=10.0.2.2:99999: port out of range"),
    (["--deny=10.0.2.1/24"], "host bits set; the network is 10.0.2.0/24"),
    (["--policy=/nonexistent/p.json"], "cannot read it: No such file or directory"),
])
def test_bad_policy_flags(user, flags, msg):
    cp = user.run([harness.nsnet_bin(), "run", *flags, "--", "true"], timeout=30)
    assert cp.returncode == 125
    assert msg in cp.stderr.decode()
    assert b"Traceback" not in cp.stderr
    cp = user.run([harness.nsnet_bin(), *flags, "1", "tap0"], timeout=30)
    assert cp.returncode == 1
    assert msg in cp.stderr.decode()


def test_ipv6(user, probe, servers):
    a, b, u = servers("tcp", "::1"), servers("tcp", "::1"), servers("udp", "::1")
    flags = ["-6", "--egress=deny", f"--allow=tcp:[fd00::2]:{a.port}"]
    res, _ = run_probe(user, probe, flags, [
        ["tcp_until_ok", "fd00::2", a.port, 15],  # the SLAAC address passes DAD first
        ["tcp", "fd00::2", b.port],
        ["tcp_dstopts", "fd00::2", b.port],
        ["udp", "fd00::2", u.port, 16],
        ["udp", "fd00::2", u.port, 4000]])  # IPv6 fragments: judged on the first
    assert res[0]["result"] == "ok"
    assert res[1]["result"] == "ECONNREFUSED" and res[1]["seconds"] < 1.0
    # a destination-options header does not hide the TCP header
    assert res[2]["result"] == "ECONNREFUSED" and res[2]["seconds"] < 1.0
    assert res[3]["result"] == "EACCES"  # ICMPv6 administratively prohibited
    assert res[4]["result"] == "EACCES"
    assert b.connections == 0 and u.connections == 0


# --------------------------------------------------------------------------
# Bypass attempts from inside
# --------------------------------------------------------------------------

def test_bypass_attempts(user, probe, servers, workdir):
    a, b, u = servers(), servers(), servers("udp")
    api_path = os.path.join(workdir, "api.sock")
    go = os.path.join(workdir, "go")
    res, stats = run_paused(user, probe, [
        "--egress=deny", f"--allow=tcp:10.0.2.2:{a.port}", "--mtu=1500", f"--api-socket={api_path}"], [
        ["retry_tcp", "10.0.2.2", b.port, 50],          # a denied flow retried rapidly
        ["syn_flags", "10.0.2.2", b.port, 0x02 | 0x08],  # SYN|PSH: libslirp opens on it
        ["syn_flags", "10.0.2.2", b.port, 0x02 | 0x20],  # SYN|URG
        ["syn_flags", "10.0.2.2", b.port, 0x02 | 0xC0],  # SYN|ECE|CWR
        ["syn_flags", "10.0.2.2", b.port, 0x12],         # SYN|ACK (simultaneous open)
        ["udp", "10.0.2.2", u.port, 4000],               # IPv4 fragments
        ["udp", "10.0.2.2", 53, 40],                     # DNS to another server
        ["rawproto", "10.0.2.2", 47],                    # GRE
        ["rawproto", "10.0.2.2", 132],                   # SCTP
        ["sleep", 0.3],
        ["pause", go],
        ["tcp", "10.0.2.2", a.port],                     # the allowed one still works
    ], go, lambda: api_call(api_path, {"execute": "get_stats"})["return"])
    assert res[0]["result"] == ["ECONNREFUSED"]
    assert [r["result"] for r in res[1:4]] == ["rst"] * 3
    # libslirp resets a SYN|ACK of no connection itself; nothing opens
    assert res[4]["result"] in ("rst", "none")
    assert res[5]["result"] == "EHOSTUNREACH"
    assert res[6]["result"] == "EHOSTUNREACH"
    pstats = stats["policy"]
    assert pstats["unclassified_denied"] >= 2
    assert pstats["flows_denied"] >= 50 + 3
    assert res[11]["result"] == "ok"
    # the allowed connect came last: once it is counted, the denied ones
    # before it have been decided
    counted(lambda: (a.connections, b.connections, u.connections), (1, 0, 0))


@pytest.mark.parametrize("flags,expect", [
    (["--egress=deny"], "ECONNREFUSED"),
    (["--egress=allow"], "ok"),
    (["--egress=allow", "--deny=10.0.2.2"], "ECONNREFUSED"),
    (["--egress=deny", "--allow=10.0.2.0/24"], "ok"),
    # allowed by the policy, refused by libslirp as before (ICMP net unreachable)
    (["--egress=deny", "--allow=10.0.2.2", "--disable-host-loopback"], "ENETUNREACH"),
])
def test_host_loopback_alias(user, probe, servers, flags, expect):
    a = servers()
    res, _ = run_probe(user, probe, flags, [["tcp", "10.0.2.2", a.port]])
    assert res[0]["result"] == expect
    counted(lambda: a.connections, 1 if expect == "ok" else 0)


def test_published_ports_unaffected(user, probe, base_dir):
    """Inbound is not egress: a published port works under --egress=deny,
    both through libslirp and the splice fast path."""
    for mode in ("slirp", "splice"):
        port = free_port()
        p = user.popen([harness.nsnet_bin(), "run", "--egress=deny", f"--publish-mode={mode}",
                        "-p", f"127.0.0.1:{port}:8080", "--", NS_PYTHON,
                        f"{base_dir}/nsclient.py", "tcp-serve", "0.0.0.0", 8080, "echo", 1],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert read_line(p.stdout, 30).startswith(b"READY")
            assert harness.tcp_send("127.0.0.1", port, b"x" * 100_000) == b"x" * 100_000
            assert p.wait(timeout=30) == 0
        finally:
            kill_and_reap(p)
            p.stdout.close()
            p.stderr.close()


# --------------------------------------------------------------------------
# set_policy at run time, and a restarted forwarder
# --------------------------------------------------------------------------

def api_call(path, req):
    return json.loads(harness.api_call(path, req, timeout=10))


@pytest.mark.parametrize("keep", [False, True])
def test_set_policy_cuts_or_keeps_established(user, probe, servers, workdir, keep):
    a = servers()
    api_path = os.path.join(workdir, "api.sock")
    go = os.path.join(workdir, "go")
    # with keep_established, under the forwarder's sandbox and seccomp too:
    # the policy set at run time is parsed where no module can be read
    sandbox = ["--enable-sandbox", "--enable-seccomp"] if keep else []
    p = user.popen([harness.nsnet_bin(), "run", f"--api-socket={api_path}", *sandbox, "--",
                    NS_PYTHON, probe, json.dumps([["hold_tcp", "10.0.2.2", a.port, go],
                                                  ["tcp", "10.0.2.2", a.port]])],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_line(p.stdout, 30) == b"CONNECTED\n"
        assert api_call(api_path, {"execute": "get_policy"}) == \
            {"return": {"egress": "allow", "rules": []}}
        new = {"egress": "deny", "rules": [{"action": "allow", "proto": "udp",
                                            "dest": "10.0.2.3", "ports": "53"}]}
        args = dict(new, keep_established=True) if keep else new
        assert api_call(api_path, {"execute": "set_policy", "arguments": args}) == {"return": {}}
        assert api_call(api_path, {"execute": "get_policy"}) == {"return": new}
        open(go, "w").close()
        out, err = p.communicate(timeout=30)
    finally:
        kill_and_reap(p)
    res = json.loads(out.decode().strip().splitlines()[-1])
    if keep:
        assert res[0]["result"] == "ok"
    else:
        assert res[0]["result"] in ("ECONNRESET", "EPIPE")
    assert res[1]["result"] == "ECONNREFUSED"


def test_set_policy_errors_and_restart_keeps_policy(user, probe, servers, workdir):
    a, b = servers(), servers()
    api_path = os.path.join(workdir, "api.sock")
    go = os.path.join(workdir, "go")
    p = user.popen([harness.nsnet_bin(), "run", f"--api-socket={api_path}", "--", NS_PYTHON,
                    probe, json.dumps([["hold_tcp", "10.0.2.2", a.port, go],
                                       ["tcp", "10.0.2.2", a.port],
                                       ["tcp", "10.0.2.2", b.port]])],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_line(p.stdout, 30) == b"CONNECTED\n"
        bad = api_call(api_path, {"execute": "set_policy",
                                  "arguments": {"egress": "deny", "rules": [{"action": "allow"}]}})
        assert bad["error"]["desc"].startswith("bad request: set_policy: rules[0]: dest must be")
        bad = api_call(api_path, {"execute": "set_policy", "arguments": {
            "egress": "deny", "keep_established": "yes"}})
        assert "keep_established must be true or false" in bad["error"]["desc"]
        # a big policy (over the 4 KiB of other requests): 2,000 rules
        rules = [{"action": "deny", "dest": f"192.0.2.{i % 250}", "ports": str(1000 + i)}
                 for i in range(2000)]
        rules.append({"action": "allow", "proto": "tcp", "dest": "10.0.2.2",
                      "ports": str(a.port)})
        req = {"execute": "set_policy", "arguments": {"egress": "deny", "rules": rules}}
        assert api_call(api_path, req) == {"return": {}}
        info = api_call(api_path, {"execute": "get_info"})["return"]
        os.kill(info["forwarder_pid"], signal.SIGKILL)
        harness.wait_until(lambda: api_call(api_path, {"execute": "get_info"})["return"]
                           ["restarts"] == 1, 15, what="forwarder restart")
        assert len(api_call(api_path, {"execute": "get_policy"})["return"]["rules"]) == 2001
        open(go, "w").close()
        out, err = p.communicate(timeout=30)
    finally:
        kill_and_reap(p)
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert res[1]["result"] == "ok"            # allowed by the new policy
    assert res[2]["result"] == "ECONNREFUSED"  # and the restarted forwarder enforces it
    assert b.connections == 0


# --------------------------------------------------------------------------
# DNS names (a resolver of the test's own on loopback)
# --------------------------------------------------------------------------

ADDRS = ["10.255.1.1", "10.255.1.2", "10.255.1.3", "10.255.1.4"]
ADDRS6 = ["fd10::1", "fd10::2"]


class DnsResolver:
    """A DNS server on 127.0.0.1:53 (UDP and TCP) for names under .test."""

    def __init__(self, records):
        self.records = records  # name -> ("A", addr, ttl) or ("CNAME", target, ttl)
        self.queries = []
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.udp.bind(("127.0.0.1", 53))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", 53))
        self.tcp.listen(8)
        for s in (self.udp, self.tcp):
            s.settimeout(0.2)
        self._stop = False
        self.threads = [threading.Thread(target=self._udp_loop, daemon=True),
                        threading.Thread(target=self._tcp_loop, daemon=True)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _name(msg, off):
        labels = []
        while msg[off]:
            n = msg[off]
            labels.append(msg[off + 1:off + 1 + n].decode())
            off += 1 + n
        return ".".join(labels), off + 1

    def answer(self, q):
        name, off = self._name(q, 12)
        qtype = struct.unpack("!H", q[off:off + 2])[0]
        self.queries.append(name.lower())
        out = q[:2] + b"\x81\x80" + q[4:6] + b"\0\0\0\0\0\0" + q[12:off + 4]
        n, cur, ans = 0, name.lower(), b""
        for _ in range(8):
            rec = self.records.get(cur)
            if rec is None:
                break
            kind, value, ttl = rec
            owner = b"".join(bytes([len(x)]) + x.encode() for x in cur.split(".")) + b"\0"
            if kind == "CNAME":
                target = b"".join(bytes([len(x)]) + x.encode() for x in value.split(".")) + b"\0"
                ans += owner + struct.pack("!HHIH", 5, 1, ttl, len(target)) + target
                n += 1
                cur = value
                continue
            if qtype == 1 and kind == "A":
                ans += owner + struct.pack("!HHIH", 1, 1, ttl, 4) + socket.inet_aton(value)
                n += 1
            elif qtype == 28 and kind == "AAAA":
                ans += owner + struct.pack("!HHIH", 28, 1, ttl, 16) + socket.inet_pton(
                    socket.AF_INET6, value)
                n += 1
            break
        if n == 0 and cur not in self.records:
            out = out[:3] + b"\x83" + out[4:]  # NXDOMAIN
        return out[:6] + struct.pack("!H", n) + out[8:] + ans

    def _udp_loop(self):
        while not self._stop:
            try:
                q, peer = self.udp.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if self._stop:  # close()'s wake-up datagram
                return
            self.udp.sendto(self.answer(q), peer)

    def _tcp_loop(self):
        while not self._stop:
            try:
                c, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with c:
                c.settimeout(3)
                try:
                    hdr = c.recv(2)
                    n = struct.unpack("!H", hdr)[0]
                    q = b""
                    while len(q) < n:
                        q += c.recv(n - len(q))
                    a = self.answer(q)
                    c.sendall(struct.pack("!H", len(a)) + a)
                except (OSError, struct.error):
                    pass

    def close(self):
        self._stop = True
        for s in (self.udp, self.tcp):
            harness.wake_listener(s)
        for t in self.threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def dns_env(workdir):
    """Test addresses on loopback, servers on them, a resolver on
    127.0.0.1:53, and the argv prefix that makes it nsnet's upstream (a
    private mount namespace with a resolv.conf bind-mounted)."""
    for a in ADDRS:
        subprocess.run(["ip", "addr", "add", f"{a}/32", "dev", "lo"], check=True)
    for a in ADDRS6:
        subprocess.run(["ip", "-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad"], check=True)
    port = free_port(addr="127.0.0.1")
    srvs = [HostServer("echo", "tcp", a, port) for a in ADDRS + ADDRS6]
    resolver = DnsResolver({
        "allowed.test": ("A", ADDRS[0], 300),
        "other.test": ("A", ADDRS[1], 300),
        "alias.test": ("CNAME", "cdn.other.test", 300),
        "cdn.other.test": ("A", ADDRS[2], 300),
        "short.test": ("A", ADDRS[3], 1),
        "v6.test": ("AAAA", ADDRS6[0], 300),
        "other6.test": ("AAAA", ADDRS6[1], 300),
    })
    conf = os.path.join(workdir, "resolv.conf")
    with open(conf, "w") as f:
        f.write("nameserver 127.0.0.1\n")
    os.chmod(conf, 0o644)
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount --bind "$0" /etc/resolv.conf && exec "$@"', conf]
    try:
        yield {"port": port, "servers": srvs, "resolver": resolver, "prefix": prefix}
    finally:
        resolver.close()
        for s in srvs:
            s.close()
        for a in ADDRS:
            subprocess.run(["ip", "addr", "del", f"{a}/32", "dev", "lo"], check=False)
        for a in ADDRS6:
            subprocess.run(["ip", "-6", "addr", "del", f"{a}/128", "dev", "lo"], check=False)


def test_dns_names(user, probe, dns_env):
    port, srvs, resolver = dns_env["port"], dns_env["servers"], dns_env["resolver"]
    flags = ["--egress=deny", f"--allow=allowed.test:{port}", f"--allow=alias.test:{port}",
             f"--allow=short.test:{port}", "--audit=all", "--log-level=info"]
    steps = [
        ["tcp", ADDRS[0], port],                              # 0 not learned yet
        ["dns", "10.0.2.3", "allowed.test", "A", "udp"],      # 1
        ["tcp", ADDRS[0], port],                              # 2 now allowed
        ["dns", "10.0.2.3", "other.test", "A", "udp"],        # 3 REFUSED by nsnet
        ["tcp", ADDRS[1], port],                              # 4
        ["spoof_dns", "allowed.test", ADDRS[1]],              # 5 a forged answer from inside
        ["tcp", ADDRS[1], port],                              # 6 teaches nothing
        ["dns", "10.0.2.3", "ALLOWED.Test.", "A", "udp"],     # 7 case, trailing dot
        ["dns", "10.0.2.3", "alias.test", "A", "udp"],        # 8 CNAME to cdn.other.test
        ["tcp", ADDRS[2], port],                              # 9 judged by alias.test's rule
        ["dns", "10.0.2.3", "cdn.other.test", "A", "udp"],    # 10 the target itself: refused
        ["dns", "10.0.2.3", "allowed.test", "A", "tcp"],      # 11 over TCP
        ["dns", "10.0.2.3", "other.test", "A", "tcp"],        # 12 over TCP: cut
        ["dns", "10.0.2.3", "short.test", "A", "udp"],        # 13 TTL 1
        ["tcp", ADDRS[3], port],                              # 14
        ["sleep", 7.5],                                       # TTL + grace (5 s)
        ["tcp", ADDRS[3], port],                              # 16 expired
    ]
    res, err = run_probe(user, probe, flags, steps, argv_prefix=dns_env["prefix"])
    r = [x.get("result") for x in res]
    assert r[0] == "ECONNREFUSED"
    assert res[1]["rcode"] == 0 and res[1]["addrs"] == [ADDRS[0]]
    assert r[2] == "ok"
    assert res[3]["rcode"] == 5 and res[3]["addrs"] == []
    assert r[4] == "ECONNREFUSED"
    assert r[6] == "ECONNREFUSED"
    assert res[7]["rcode"] == 0 and res[7]["addrs"] == [ADDRS[0]]
    assert res[8]["rcode"] == 0 and res[8]["addrs"] == [ADDRS[2]]
    assert r[9] == "ok"
    assert res[10]["rcode"] == 5
    assert res[11]["rcode"] == 0 and res[11]["addrs"] == [ADDRS[0]]
    assert r[12] in ("ECONNRESET", "closed")
    assert r[14] == "ok"
    assert r[16] == "ECONNREFUSED"
    # the refused names never reached the resolver
    assert "other.test" not in resolver.queries
    assert "cdn.other.test" not in resolver.queries
    assert "allowed.test" in resolver.queries
    counted(lambda: [s.connections for s in dns_env["servers"]], [1, 0, 1, 1, 0, 0])
    assert f"-> {ADDRS[0]}:{port} (allowed.test) by allow allowed.test:{port}" in err
    # a refused query is an audit record too, with its name
    assert "-> 10.0.2.3:53 (other.test) by dns: no rule allows this name" in err



def test_dns_names_ipv6(user, probe, dns_env):
    """AAAA answers teach IPv6 addresses; queries to fd00::3 are filtered."""
    port, resolver = dns_env["port"], dns_env["resolver"]
    flags = ["-6", "--egress=deny", f"--allow=tcp:v6.test:{port}"]
    steps = [
        ["tcp", ADDRS6[0], port],                             # 0 not learned yet
        ["dns", "10.0.2.3", "v6.test", "AAAA", "udp"],        # 1
        ["tcp_until_ok", ADDRS6[0], port, 15],                # 2 (after DAD)
        ["dns", "fd00::3", "other6.test", "AAAA", "udp"],     # 3 REFUSED
        ["tcp", ADDRS6[1], port],                             # 4
        ["dns", "10.0.2.3", "V6.Test.", "AAAA", "udp"],       # 5
    ]
    # (libslirp forwards fd00::3's queries only to an IPv6 nameserver of
    # the host; this resolver is on 127.0.0.1: the allowed queries go to
    # 10.0.2.3, the refused one is answered by nsnet at fd00::3 itself)
    res, _ = run_probe(user, probe, flags, steps, argv_prefix=dns_env["prefix"])
    assert res[0]["result"] in ("ECONNREFUSED", "EADDRNOTAVAIL", "ENETUNREACH")
    assert res[1]["rcode"] == 0 and res[1]["addrs"] == [ADDRS6[0]]
    assert res[2]["result"] == "ok"
    assert res[3]["rcode"] == 5
    assert res[4]["result"] == "ECONNREFUSED"
    assert res[5]["rcode"] == 0 and res[5]["addrs"] == [ADDRS6[0]]
    assert "other6.test" not in resolver.queries
    counted(lambda: [s.connections for s in dns_env["servers"]][4:], [1, 0])


# --------------------------------------------------------------------------
# The Python API
# --------------------------------------------------------------------------

def as_user(user):
    if user.is_root:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": [], "env": user.env(),
            "cwd": "/"}


def test_python_api(user, probe, servers, workdir):
    import nsnet
    from nsnet.client import Popen, run  # (nsnet.run is the submodule once imported)

    a, b = servers(), servers()
    steps = [["tcp", "10.0.2.2", a.port], ["tcp", "10.0.2.2", b.port]]
    # two lists: the default's own action (deny) first, so the deny rule
    # carves b out of the allowed /24
    cp = run([NS_PYTHON, probe, json.dumps(steps)], egress="deny",
                   allow=["10.0.2.0/24"], deny=[f"tcp:10.0.2.2:{b.port}"],
                   capture_output=True, timeout=60, **as_user(user))
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout.decode().strip().splitlines()[-1])
    assert [r["result"] for r in res] == ["ok", "ECONNREFUSED"]
    with pytest.raises(TypeError, match="list of rules"):
        run(["true"], allow="10.0.2.2")

    go = os.path.join(workdir, "go")
    with Popen([NS_PYTHON, probe, json.dumps([["hold_tcp", "10.0.2.2", a.port, go],
                                                    ["tcp", "10.0.2.2", b.port]])],
                     stdout=subprocess.PIPE, **as_user(user)) as p:
        p.wait_ready()
        assert read_line(p.stdout, 30) == b"CONNECTED\n"
        assert p.policy() == {"egress": "allow", "rules": []}
        with pytest.raises(nsnet.PolicyError, match="egress must be"):
            p.set_policy({"egress": "sometimes"})
        with pytest.raises(nsnet.PolicyError, match="port out of range"):
            p.set_policy(egress="deny", allow=["10.0.2.2:70000"])
        p.set_policy(egress="deny", allow=[f"tcp:10.0.2.2:{a.port}"], keep_established=True)
        assert p.policy()["rules"] == [{"action": "allow", "proto": "tcp", "dest": "10.0.2.2",
                                        "ports": str(a.port)}]
        stats = p.stats()["policy"]
        open(go, "w").close()
        out = p.stdout.read()
        assert p.wait(timeout=30) == 0
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert [r["result"] for r in res] == ["ok", "ECONNREFUSED"]
    assert stats["flows_cut"] == 0


def test_bypass_obeys_the_policy(user, probe, servers, workdir):
    """--bypass (host sockets for connects, issue 13) under a policy: the
    handler bypasses nothing the policy governs (libslirp's path enforces
    it); without a policy at start, set_policy is refused while it runs."""
    a, b = servers(), servers()
    api_path = os.path.join(workdir, "api.sock")
    go = os.path.join(workdir, "go")
    res, st = run_paused(user, probe, ["--bypass", f"--api-socket={api_path}", "--egress=deny",
                                       f"--allow=tcp:10.0.2.2:{a.port}"],
                         [["tcp", "10.0.2.2", a.port], ["tcp", "10.0.2.2", b.port],
                          ["pause", go]], go,
                         lambda: api_call(api_path, {"execute": "get_stats"})["return"])
    assert [r["result"] for r in res[:2]] == ["ok", "ECONNREFUSED"]
    assert st["bypass"]["bypassed"] == 0 and not any(st["bypass"]["scope"].values())
    assert b.connections == 0
    os.unlink(go)
    res, reply = run_paused(user, probe, ["--bypass", f"--api-socket={api_path}"],
                            [["pause", go], ["tcp", "10.0.2.2", a.port]], go,
                            lambda: api_call(api_path, {"execute": "set_policy", "arguments": {
                                "egress": "deny", "rules": []}}))
    assert "set_policy: --bypass" in reply["error"]["desc"]
    assert res[1]["result"] == "ok"


def test_audit_flood_is_bounded(user, probe, servers, workdir):
    """A namespace that opens denied flows in a loop gets them all refused,
    but at most 500 audit records a second (bursts of 1,024) are written;
    the rest are counted, and the API keeps answering."""
    b = servers()
    api_path = os.path.join(workdir, "api.sock")
    audit = os.path.join(workdir, "audit.log")
    go = os.path.join(workdir, "go")
    res, pol = run_paused(user, probe, ["--egress=deny", f"--api-socket={api_path}",
                                        f"--audit-log={audit}"],
                          [["retry_tcp", "10.0.2.2", b.port, 4000], ["pause", go]], go,
                          lambda: api_call(api_path, {"execute": "get_stats"})["return"]["policy"],
                          timeout=120)
    assert res[0]["result"] == ["ECONNREFUSED"]
    lines = sum(1 for _ in open(audit))
    assert pol["flows_denied"] == 4000
    assert pol["audit_lost"] > 0
    assert lines + pol["audit_lost"] == 4000
    assert b.connections == 0


def test_slirp4netns_style_command_line(user, probe, servers, ns, attach, nsnet_impl, workdir):
    """`nsnet --egress=deny --allow=... PID tap0` (the drop-in's command
    line) enforces the same policy; get_policy answers it."""
    a, b = servers(), servers()
    audit = os.path.join(workdir, "audit.log")
    net = attach(nsnet_impl, ns, "--egress=deny", f"--allow=tcp:10.0.2.2:{a.port}",
                 f"--audit-log={audit}")
    cp = ns.run([NS_PYTHON, probe, json.dumps([["tcp", "10.0.2.2", a.port],
                                               ["tcp", "10.0.2.2", b.port],
                                               ["ping", "10.0.2.2"]])], timeout=60)
    res = json.loads(cp.stdout.decode().strip().splitlines()[-1])
    assert [r["result"] for r in res] == ["ok", "ECONNREFUSED", "prohibited"]
    assert api_call(net.api, {"execute": "get_policy"})["return"] == {
        "egress": "deny", "rules": [{"action": "allow", "proto": "tcp", "dest": "10.0.2.2",
                                     "ports": str(a.port)}]}
    assert api_call(net.api, {"execute": "get_stats"})["return"]["policy"]["flows_denied"] == 2
    counted(lambda: (a.connections, b.connections), (1, 0))
