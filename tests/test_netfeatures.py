"""Features with a destination of their own, each checked from both sides:
--no-egress against a reachable non-gateway address, --outbound-addr and
--outbound-addr6 by the source address a server sees, the built-in DNS
forwarder (and --disable-dns) against a resolver of the test's own.

Every destination here exists only inside the sealed test namespace
(conftest.py): documentation addresses (192.0.2.0/24, 2001:db8::/32) added
to its loopback for the test, and a DNS resolver on its 127.0.0.1/::1 that
answers names under `.test` only.  The forwarder learns that resolver from
a resolv.conf bind-mounted over /etc/resolv.conf in a private mount
namespace of its own; the host's file is never touched.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading

import pytest

import harness
from harness import NS_PYTHON, User

pytestmark = pytest.mark.timeout(120)

GW, GW6 = "10.0.2.2", "fd00::2"
EGRESS_ADDR = "192.0.2.1"  # TEST-NET-1, bound to the sealed namespace's lo
OUT_ADDR6 = "2001:db8::2"  # documentation prefix, bound likewise
DNS_ANSWER = "192.0.2.53"
DNS_ANSWER6 = "2001:db8::53"


def sealed_addr(addr: str):
    """Add addr to the sealed test namespace's lo for the test; remove it after."""
    plen = 128 if ":" in addr else 32
    subprocess.run(["ip", "addr", "add", f"{addr}/{plen}", "dev", "lo"] +
                   (["nodad"] if ":" in addr else []), check=True, timeout=10)
    return lambda: subprocess.run(["ip", "addr", "del", f"{addr}/{plen}", "dev", "lo"],
                                  check=False, timeout=10)


@pytest.fixture
def egress_server(host_server):
    """An echo server on a non-gateway address that only the sealed namespace has."""
    undo = sealed_addr(EGRESS_ADDR)
    try:
        yield host_server("echo", "tcp", EGRESS_ADDR)
    finally:
        undo()


# --------------------------------------------------------------------------
# --no-egress
# --------------------------------------------------------------------------

@pytest.mark.parametrize("no_egress", [False, True], ids=["egress", "no-egress"])
def test_no_egress_cli(nsnet_impl, ns, attach, egress_server, no_egress):
    """Without the flag the namespace reaches 192.0.2.1 (so the address is a
    real destination); with it, the connection never reaches the server."""
    attach(nsnet_impl, ns, *(["--no-egress"] if no_egress else []))
    r = ns.client("connect", EGRESS_ADDR, egress_server.port)
    if no_egress:
        assert r["ok"] is False, r
        assert egress_server.connections == 0
    else:
        assert r["ok"] is True, r
        assert egress_server.connections == 1


@pytest.mark.parametrize("no_egress", [False, True], ids=["egress", "no-egress"])
def test_no_egress_run(user, base_dir, egress_server, no_egress):
    cp = user.run([harness.nsnet_bin(), "run", *(["--no-egress"] if no_egress else []), "--",
                   NS_PYTHON, f"{base_dir}/nsclient.py", "connect", EGRESS_ADDR,
                   egress_server.port], timeout=60, text=True)
    assert cp.returncode == 0, cp.stderr
    r = json.loads(cp.stdout.strip().splitlines()[-1])
    assert r["ok"] is (not no_egress), r
    assert egress_server.connections == (0 if no_egress else 1)


# --------------------------------------------------------------------------
# --outbound-addr, --outbound-addr6
# --------------------------------------------------------------------------

def test_outbound_addr(impl, ns, attach, host_server):
    """The host loopback server sees connections from the --outbound-addr
    address (127.0.0.2: another address of the sealed namespace's lo), not
    from 127.0.0.1; UDP too."""
    tcp = host_server("echo", "tcp", "127.0.0.1")
    udp = host_server("echo", "udp", "127.0.0.1")
    attach(impl, ns, "--outbound-addr=127.0.0.2")
    assert ns.client("connect", GW, tcp.port)["ok"] is True
    assert ns.client("udp-echo", GW, udp.port, 1, 100)["echoed"] == 1
    assert [p[0] for p in tcp.peers] == ["127.0.0.2"]
    assert {p[0] for p in udp.peers} == {"127.0.0.2"}


def test_outbound_addr_default_source(impl, ns, attach, host_server):
    """The control: without the option the source is the host loopback."""
    tcp = host_server("echo", "tcp", "127.0.0.1")
    attach(impl, ns)
    assert ns.client("connect", GW, tcp.port)["ok"] is True
    assert [p[0] for p in tcp.peers] == ["127.0.0.1"]


@pytest.mark.parametrize("outbound", [True, False], ids=["outbound-addr6", "default"])
def test_outbound_addr6(impl, ns, attach, host_server, outbound):
    undo = sealed_addr(OUT_ADDR6)
    try:
        tcp = host_server("echo", "tcp", "::1")
        attach(impl, ns, "--enable-ipv6", *([f"--outbound-addr6={OUT_ADDR6}"] if outbound else []))
        ns.wait_slaac()
        r = ns.client("connect", GW6, tcp.port)
        assert r["ok"] is True, r
        assert [p[0] for p in tcp.peers] == [OUT_ADDR6 if outbound else "::1"]
    finally:
        undo()


# --------------------------------------------------------------------------
# DNS: the forwarder at CIDR+3 / fd00::3, and --disable-dns
# --------------------------------------------------------------------------

def _dns_name(data: bytes, off: int) -> tuple[str, int]:
    labels = []
    while data[off]:
        n = data[off]
        labels.append(data[off + 1:off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    return ".".join(labels), off + 1


class Resolver:
    """A DNS server of the test's own on 127.0.0.1:53 and [::1]:53 of the
    sealed namespace: A/AAAA for names under .test, REFUSED for the rest.
    Records every question it gets."""

    def __init__(self, addrs: tuple[str, ...] = ("127.0.0.1", "::1")):
        self.queries: list[tuple[str, int, str]] = []  # (name, qtype, peer)
        self.socks = []
        for addr in addrs:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((addr, 53))
            s.settimeout(0.2)
            self.socks.append(s)
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(s,), daemon=True)
                        for s in self.socks]
        for t in self.threads:
            t.start()

    def _answer(self, query: bytes) -> bytes:
        qid, _flags, qd = struct.unpack_from("!HHH", query)
        name, off = _dns_name(query, 12)
        qtype, qclass = struct.unpack_from("!HH", query, off)
        question = query[12:off + 4]
        rdata = None
        if name.endswith(".test") and qclass == 1:
            if qtype == 1:
                rdata = socket.inet_pton(socket.AF_INET, DNS_ANSWER)
            elif qtype == 28:
                rdata = socket.inet_pton(socket.AF_INET6, DNS_ANSWER6)
        if rdata is None:
            return struct.pack("!HHHHHH", qid, 0x8185, 1, 0, 0, 0) + question  # REFUSED
        answer = struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata
        return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + answer

    def _loop(self, s):
        while not self._stop.is_set():
            try:
                data, peer = s.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if self._stop.is_set():  # close()'s wake-up datagram
                return
            try:
                name, off = _dns_name(data, 12)
                self.queries.append((name, struct.unpack_from("!H", data, off)[0], peer[0]))
                s.sendto(self._answer(data), peer)
            except (IndexError, struct.error):
                continue

    def close(self):
        self._stop.set()
        for s in self.socks:
            harness.wake_listener(s)
            s.close()
        for t in self.threads:
            t.join(timeout=5)


# Run inside the target namespace: one DNS question to SERVER, sent by hand
# (never through the system resolver); prints {"answer": addr|None, "rcode": n}.
DNS_CLIENT = r"""
import json, os, socket, struct, sys
server, name, qtype, tries = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
qid = int.from_bytes(os.urandom(2), "big")
q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
q += struct.pack("!HH", qtype, 1)
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
out = {"answer": None, "rcode": None}
with socket.socket(fam, socket.SOCK_DGRAM) as s:
    s.settimeout(2)
    for _ in range(tries):
        s.sendto(q, (server, 53))
        try:
            data = s.recv(4096)
        except socket.timeout:
            continue
        if data[:2] != q[:2]:
            continue
        out["rcode"] = data[3] & 15
        if struct.unpack_from("!H", data, 6)[0]:
            rdlen = struct.unpack_from("!H", data, len(q) + 10)[0]
            rdata = data[len(q) + 12:len(q) + 12 + rdlen]
            out["answer"] = socket.inet_ntop(socket.AF_INET6 if rdlen == 16 else socket.AF_INET, rdata)
        break
print(json.dumps(out))
"""


@pytest.fixture
def resolver(base_dir):
    """The resolver, and the resolv.conf that names it (for the forwarder's
    private mount namespace)."""
    res = Resolver()
    conf = os.path.join(base_dir, "resolv.conf.test")
    with open(conf, "w") as f:
        f.write("nameserver 127.0.0.1\nnameserver ::1\n")
    os.chmod(conf, 0o644)
    res.conf = conf
    yield res
    res.close()


def with_resolv_conf(conf: str, user: User) -> list[str]:
    """A prefix that runs the forwarder (in place, same PID, fds kept) in a
    private mount namespace where /etc/resolv.conf is `conf`, as `user`."""
    prefix = ["unshare", "--mount", "--propagation", "private", "--",
              "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', conf]
    if not user.is_root:
        prefix += ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                   "--"]
    return prefix


@pytest.fixture
def dns_fwd(request, user, workdir, resolver):
    """dns_fwd(impl, ns, *flags): the forwarder on ns with -c, the test's
    resolver as its upstream."""
    started = []
    request.node._forwarders = started

    def start(impl, target, *flags):
        fwd = harness.start_forwarder(impl, User.root(), ["--configure", *flags, target.pid,
                                                          "tap0"], workdir,
                                      prefix=with_resolv_conf(resolver.conf, user))
        started.append(fwd)
        return fwd

    yield start
    for fwd in started:
        fwd.stop()


def dns_query(ns, server: str, name: str, qtype: int = 1, tries: int = 3) -> dict:
    """One question, up to `tries` times 2 s."""
    cp = ns.run([NS_PYTHON, "-c", DNS_CLIENT, server, name, qtype, tries], timeout=30, text=True)
    return json.loads(cp.stdout.strip().splitlines()[-1])


def test_dns_forwarder(impl, ns, dns_fwd, resolver):
    """A question to 10.0.2.3 reaches the test's resolver through the
    forwarder, and its answer comes back."""
    dns_fwd(impl, ns)
    r = dns_query(ns, "10.0.2.3", "probe.nsnet.test")
    assert r == {"answer": DNS_ANSWER, "rcode": 0}
    assert ("probe.nsnet.test", 1, "127.0.0.1") in resolver.queries


def test_dns_forwarder_cidr_and_ipv6(impl, ns, dns_fwd, resolver):
    """With --cidr the forwarder is at CIDR+3; with -6 also at fd00::3,
    which forwards to the resolver's IPv6 address."""
    dns_fwd(impl, ns, "--cidr=10.9.0.0/24", "--enable-ipv6")
    assert dns_query(ns, "10.9.0.3", "a.nsnet.test")["answer"] == DNS_ANSWER
    ns.wait_slaac()
    assert dns_query(ns, "fd00::3", "b.nsnet.test", 28) == {"answer": DNS_ANSWER6, "rcode": 0}
    assert ("b.nsnet.test", 28, "::1") in resolver.queries


def test_disable_dns(impl, ns, dns_fwd, resolver):
    """--disable-dns: no answer at 10.0.2.3, and the resolver gets nothing
    (test_dns_forwarder is the control: the same question is answered
    within the same 2 s without the flag)."""
    dns_fwd(impl, ns, "--disable-dns")
    assert dns_query(ns, "10.0.2.3", "probe.nsnet.test", tries=1) == \
        {"answer": None, "rcode": None}
    assert resolver.queries == []


# --------------------------------------------------------------------------
# Forwards re-added after a forwarder restart: UDP, IPv6, a large stream
# --------------------------------------------------------------------------

def _api(path, execute, **arguments):
    req = {"execute": execute, **({"arguments": arguments} if arguments else {})}
    return json.loads(harness.api_call(path, req))


def _kill_forwarder(net) -> None:
    """kill -9 the forwarder (not the supervisor); wait for its replacement."""
    before = _api(net.api, "get_info")["return"]
    os.kill(before["forwarder_pid"], 9)
    harness.wait_until(lambda: _api(net.api, "get_info")["return"]["restarts"]
                       == before["restarts"] + 1, 20, interval=0.05, what="forwarder restarted")


@harness.unpriv_only
def test_udp_and_ipv6_forwards_survive_restart(nsnet_impl, ns, attach):
    net = attach(nsnet_impl, ns, "--enable-ipv6")
    guest6 = ns.wait_slaac()
    udp_srv = ns.start_server("udp-serve", "0.0.0.0", 0, 2)
    tcp6_srv = ns.start_server("tcp-serve", "::", 0, "sink", 2)
    try:
        udp_port = harness.free_port(socket.SOCK_DGRAM)
        tcp6_port = harness.free_port(family=socket.AF_INET6, addr="::1")
        assert b'"id"' in harness.add_hostfwd(net.api, "udp", udp_port, udp_srv.port)
        assert b'"id"' in harness.add_hostfwd(net.api, "tcp", tcp6_port, tcp6_srv.port,
                                              host_addr="::1")
        data = harness.payload(4 << 20)

        def check(tag: bytes):
            assert harness.udp_roundtrip("127.0.0.1", udp_port, tag) == tag
            reply = harness.tcp_send("::1", tcp6_port, data)
            assert reply.decode().split() == [str(len(data)), harness.sha256(data)]

        check(b"before")
        _kill_forwarder(net)
        entries = _api(net.api, "list_hostfwd")["entries"]
        assert [(e["proto"], e["host_addr"], e["guest_addr"]) for e in entries] == \
            [("udp", "127.0.0.1", "10.0.2.100"), ("tcp", "::1", guest6)]
        check(b"after")
        assert [c["received"] for c in tcp6_srv.result()["connections"]] == [len(data)] * 2
        assert udp_srv.result()["peers"] == ["10.0.2.2"] * 2
    finally:
        udp_srv.close()
        tcp6_srv.close()


# --------------------------------------------------------------------------
# IPv6 ping to the gateway; DHCP without -c; --log-level; --target-type=bess
# --------------------------------------------------------------------------

def test_ping6_gateway(impl, ns, attach):
    attach(impl, ns, "--enable-ipv6")
    ns.wait_slaac()
    # ns root (gid 0) may open ICMP sockets (the range covers ICMPv6 too)
    ns.sh("echo '0 0' > /proc/sys/net/ipv4/ping_group_range")
    cp = ns.run(["ping", "-6", "-c1", "-W2", GW6], check=False, text=True)
    assert cp.returncode == 0 and "1 received" in cp.stdout, cp.stdout + cp.stderr


# Run inside the namespace on an unconfigured, up TAP: a DHCPDISCOVER from
# 0.0.0.0:68 to 255.255.255.255:67; prints the offer's yiaddr, router, DNS.
DHCP_CLIENT = r"""
import json, os, socket, struct, sys
dev, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
xid = os.urandom(4)
pkt = struct.pack("!BBBB4sHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4,
                  b"\0" * 4, b"\0" * 4, b"\0" * 4, mac + b"\0" * 10, b"", b"")
pkt += b"\x63\x82\x53\x63" + bytes([53, 1, 1, 55, 2, 3, 6, 255])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
s.bind(("0.0.0.0", 68))
s.settimeout(2)
out = {"offer": None}
for _ in range(3):
    s.sendto(pkt, ("255.255.255.255", 67))
    try:
        data = s.recv(2048)
    except socket.timeout:
        continue
    if data[4:8] != xid:
        continue
    opts, i = {}, 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        opts[data[i]] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    out = {"offer": socket.inet_ntoa(data[16:20]), "type": opts.get(53, b"?")[0],
           "router": socket.inet_ntoa(opts[3][:4]) if 3 in opts else None,
           "dns": socket.inet_ntoa(opts[6][:4]) if 6 in opts else None}
    break
print(json.dumps(out))
"""


def test_dhcp_without_configure(impl, ns, attach):
    """Without -c the namespace configures itself: libslirp's DHCP server
    offers CIDR+15 with the gateway and the DNS forwarder."""
    attach(impl, ns, "--cidr=10.8.0.0/24", configure=False)
    ns.run(["ip", "link", "set", "tap0", "up"])
    assert not ns.addrs("tap0", "inet")
    mac = ns.link("tap0")["address"]
    cp = ns.run([NS_PYTHON, "-c", DHCP_CLIENT, "tap0", mac], timeout=30, text=True)
    r = json.loads(cp.stdout.strip().splitlines()[-1])
    assert r == {"offer": "10.8.0.15", "type": 2, "router": "10.8.0.2", "dns": "10.8.0.3"}


@harness.unpriv_only
@pytest.mark.parametrize("level,shown", [
    ("debug", {"debug", "info", "warning"}),
    ("info", {"info", "warning"}),
    ("warning", {"warning"}),
    ("error", set()),
])
def test_log_level(nsnet_impl, ns, attach, level, shown):
    """One message of each level: a forward added (debug), the forwarder
    killed (warning: restarting) and restarted (info)."""
    net = attach(nsnet_impl, ns, f"--log-level={level}")
    port = harness.free_port()
    assert b'"id"' in harness.add_hostfwd(net.api, "tcp", port, 80)
    _kill_forwarder(net)
    _api(net.api, "get_info")  # a later loop turn: the lines are written
    log = net.fwd.log()
    got = {name for name, text in (("debug", "forward 1 added"),
                                   ("info", "forwarder restarted"),
                                   ("warning", "restarting")) if text in log}
    assert got == shown, log


def test_target_type_bess_refused(nsnet_impl, ns, user):
    cp = user.run([nsnet_impl.bin, "--target-type=bess", ns.pid, "tap0"], timeout=30, text=True)
    assert cp.returncode == 1
    assert cp.stderr.strip() == "nsnet: --target-type=bess is not supported by nsnet"
    assert cp.stdout == ""
    assert ns.run(["ip", "link", "show", "tap0"], check=False).returncode != 0  # no TAP made
