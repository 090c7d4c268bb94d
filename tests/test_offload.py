"""TAP offloads (--offload, the default, and --no-offload): correctness.

With offloads the namespace's kernel hands nsnet TSO super-frames with
partial checksums (completed before libslirp sees them), and nsnet writes
large segments towards the namespace as GSO frames that the namespace's
kernel cuts to the MTU the user set.  These tests move multi-megabyte
streams both ways and verify them by sha256, at MTU 1500 and 65520, over
IPv4 and IPv6, send UDP datagrams larger than the MTU, and route through a
nested namespace behind a veth (GSO frames forwarded on), in both modes.
"""
import json
import os
import socket
import subprocess

import pytest
from nsnet import _slirp_cffi as slirp_cffi

from harness import (HarnessError, api_call, free_port, kill_and_reap, payload,
                     sha256, tcp_send, wait_until)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.parametrize("user", ["unpriv"], indirect=True),
]

GW4 = "10.0.2.2"  # the host's 127.0.0.1
GW6 = "fd00::2"  # the host's ::1
MIB = 1 << 20
BULK = 8 * MIB
OFFLOAD_FLAGS = {"on": "--offload", "off": "--no-offload"}
SLIRP_MSS = slirp_cffi.lib.NSNET_SLIRP_MSS  # nsnet/csrc/datapath.h


@pytest.fixture
def impl(nsnet_impl):
    """Offloads are nsnet's: every test here runs nsnet only."""
    return nsnet_impl


def stats(net) -> dict:
    reply = json.loads(api_call(net.api, {"execute": "get_stats"}))
    return reply["return"]


def start(connect, mode: str, mtu: int, family: int):
    flags = [OFFLOAD_FLAGS[mode], "--mtu", mtu]
    if family == 6:
        flags.append("--enable-ipv6")
    net = connect(*flags)
    assert net.ns.link("tap0")["mtu"] == mtu  # the MTU the user set, offloads or not
    if family == 6:
        net.ns.wait_slaac()
    return net


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mtu", [1500, 65520])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_stream_via_gateway(connect, host_server, mode, mtu, family):
    """A bulk echo through the gateway: both directions on one connection."""
    srv = host_server("echo", addr="127.0.0.1" if family == 4 else "::1")
    net = start(connect, mode, mtu, family)
    r = net.ns.client("tcp-echo", GW4 if family == 4 else GW6, srv.port, BULK)
    assert r["sent"] == r["received"] == BULK
    assert r["sha_received"] == r["sha_sent"]
    st = stats(net)
    assert st["rx_dropped_invalid"] == 0
    if mode == "on" and mtu == 1500:
        # TSO super-frames from the namespace, GSO frames towards it.
        assert st["rx_gso_frames"] > 0 and st["rx_csum_completed"] > 0
        assert st["rx_mss_adjusted"] >= 1 and st["tx_gso_frames"] > 0
    if mtu == 65520:
        assert st["rx_mss_adjusted"] >= 1
    if mtu == 65520 and family == 4:
        # libslirp's MSS is NSNET_SLIRP_MSS (datapath.h) in both modes, on a
        # connection the namespace opened too (libslirp ignores the option
        # of the namespace's SYN, so the SYN rewrite alone left it at
        # 32768): the segments it sends are no larger.  Its SYN-ACK's MSS
        # is raised back to the TAP's, so the namespace still sends larger
        # segments (Linux: at most half of libslirp's 64 KiB window).
        assert st["tx_mss_raised"] >= 1, st
        assert 0 < r["rcv_mss"] <= SLIRP_MSS < r["snd_mss"], r
    else:
        # At MTU 1500, and with IPv6 on, libslirp's if_mtu is not capped
        # (slirp.CAPPED_SLIRP_MTU): its SYNs have nothing to raise.
        assert st["tx_mss_raised"] == 0, st
    if mode == "off":
        assert st["rx_gso_frames"] == st["tx_gso_frames"] == st["rx_csum_completed"] == 0


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mtu", [1500, 65520])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_stream_via_hostfwd(connect, mode, mtu, family):
    """Upload into the namespace through a port forward, then download."""
    net = start(connect, mode, mtu, family)
    host = "127.0.0.1" if family == 4 else "::1"
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    for ns_mode, data in (("sink", payload(BULK)), (f"source:{BULK}", b"")):
        server = net.ns.start_server("tcp-serve", "0.0.0.0" if family == 4 else "::", 0,
                                     ns_mode, 1)
        try:
            port = free_port(family=fam, addr=host)
            req = {"execute": "add_hostfwd",
                   "arguments": {"proto": "tcp", "host_addr": host, "host_port": port,
                                 "guest_port": server.port}}
            reply = json.loads(api_call(net.api, req))
            assert "return" in reply, reply
            got = tcp_send(host, port, data)
            result = server.result()["connections"][0]
            if data:
                assert got.decode().split() == [str(BULK), sha256(data)]
                assert result["received"] == BULK
            else:
                assert len(got) == result["sent"] == BULK
                assert sha256(got) == result["sha256"]
            api_call(net.api, {"execute": "remove_hostfwd",
                               "arguments": {"id": reply["return"]["id"]}})
        finally:
            server.close()


def reassembled(net, family: int) -> int:
    """Datagrams the namespace's kernel put back together from fragments."""
    if family == 4:
        lines = net.ns.run(["cat", "/proc/net/snmp"], text=True).stdout.splitlines()
        names, values = [ln.split()[1:] for ln in lines if ln.startswith("Ip:")][:2]
        return int(dict(zip(names, values))["ReasmOKs"])
    for line in net.ns.run(["cat", "/proc/net/snmp6"], text=True).stdout.splitlines():
        name, value = line.split()
        if name == "Ip6ReasmOKs":
            return int(value)
    raise AssertionError("no Ip6ReasmOKs in /proc/net/snmp6")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_large_udp(connect, host_server, mode, family):
    """UDP datagrams larger than the MTU sent from the host into the
    namespace (through a UDP port forward) reach it as fragments that fit
    its MTU; over IPv4 the namespace's own large datagrams are echoed back
    through the gateway too.  (libslirp does not reassemble IPv6 fragments,
    so from the namespace IPv6 datagrams must fit the MTU.)"""
    net = start(connect, mode, 1500, family)
    host = "127.0.0.1" if family == 4 else "::1"
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    sizes = (4000, 30000, 60000)
    before = reassembled(net, family)
    server = net.ns.start_server("udp-serve", "0.0.0.0" if family == 4 else "::", 0,
                                 len(sizes))
    try:
        port = free_port(socket.SOCK_DGRAM, fam, host)
        req = {"execute": "add_hostfwd",
               "arguments": {"proto": "udp", "host_addr": host, "host_port": port,
                             "guest_port": server.port}}
        assert "return" in json.loads(api_call(net.api, req))
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            for size in sizes:
                s.sendto(payload(size), (host, port))
        assert len(server.result(timeout=30)["peers"]) == len(sizes)
    finally:
        server.close()
    assert reassembled(net, family) - before >= len(sizes)
    if mode == "on":
        assert stats(net)["tx_fragmented"] >= len(sizes)
    srv = host_server("echo", "udp", addr=host)
    gw = GW4 if family == 4 else GW6
    for size in (1000, 1452) + (sizes if family == 4 else ()):
        r = net.ns.client("udp-echo", gw, srv.port, 3, size)
        assert r == {"sent": 3, "echoed": 3}, size


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_large_udp_at_large_mtu(connect, host_server, mode, family):
    """At MTU 65520 the namespace's UDP datagrams of up to 60000 bytes,
    which fit its MTU, go out whole through the gateway and come back, over
    IPv6 too (libslirp answers an IPv6 payload over its if_mtu with "packet
    too big" and cannot reassemble IPv6 fragments: its if_mtu must not be
    capped when IPv6 is on)."""
    net = start(connect, mode, 65520, family)
    srv = host_server("echo", "udp", addr="127.0.0.1" if family == 4 else "::1")
    for size in (30000, 60000):
        r = net.ns.client("udp-echo", GW4 if family == 4 else GW6, srv.port, 3, size)
        assert r == {"sent": 3, "echoed": 3}, size


def nested_run(net, pid: int, argv, **kw):
    """Run argv in the nested namespace `pid` (inside the attached one)."""
    argv = ["nsenter", f"--target={pid}", "--user", "--net", "--preserve-credentials",
            "--", *[str(a) for a in argv]]
    return net.ns.user.run(argv, check=True, **kw)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_nested_namespace_behind_veth(connect, host_server, mode):
    """A namespace behind a veth inside the attached one reaches the host
    through 10.0.2.2: the attached namespace forwards nsnet's frames (GSO
    frames, with offloads) on at its MTU."""
    srv = host_server("echo")
    net = start(connect, mode, 1500, 4)
    nested = net.ns.popen(["unshare", "--net", "--", "sleep", "infinity"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def in_new_netns():
            try:
                return (open(f"/proc/{nested.pid}/comm").read().strip() == "sleep" and
                        subprocess.run(["readlink", f"/proc/{nested.pid}/ns/net"],
                                       capture_output=True, text=True).stdout
                        != subprocess.run(["readlink", f"/proc/{net.ns.pid}/ns/net"],
                                          capture_output=True, text=True).stdout)
            except OSError:
                return False
        wait_until(in_new_netns, 10, what="nested namespace")
        net.ns.sh(
            "set -e\n"
            "ip link add veth0 type veth peer name veth1\n"
            f"ip link set veth1 netns {nested.pid}\n"
            "ip addr add 10.0.3.1/24 dev veth0\n"
            "ip link set veth0 up\n"
            "echo 1 > /proc/sys/net/ipv4/ip_forward\n"
            # libslirp asks by ARP for the nested address: answer for it.
            "echo 1 > /proc/sys/net/ipv4/conf/tap0/proxy_arp\n")
        nested_run(net, nested.pid, ["sh", "-c",
                                     "set -e; ip link set lo up; ip link set veth1 up; "
                                     "ip addr add 10.0.3.2/24 dev veth1; "
                                     "ip route add default via 10.0.3.1"])
        assert net.ns.link("veth0")["mtu"] == 1500
        cp = nested_run(net, nested.pid, net.ns.client_argv("tcp-echo", GW4, srv.port, BULK),
                        timeout=120, text=True)
        r = json.loads(cp.stdout.strip().splitlines()[-1])
        assert r["sent"] == r["received"] == BULK
        assert r["sha_received"] == r["sha_sent"]
        if mode == "on":
            assert stats(net)["tx_gso_frames"] > 0
    finally:
        kill_and_reap(nested)
        if nested.stderr:
            nested.stderr.close()


def test_tso_superframes_accepted_by_libslirp(connect, host_server):
    """Pins what the speed rests on: libslirp takes 64 KiB TSO super-frames
    (checksums completed by nsnet) from a namespace at MTU 1500."""
    srv = host_server("sink")
    net = start(connect, "on", 1500, 4)
    r = net.ns.client("tcp-send", GW4, srv.port, BULK)
    assert r["reply"].split() == [str(BULK), r["sha256"]]
    st = stats(net)
    assert st["rx_gso_frames"] > 0


@pytest.mark.skipif(os.environ.get("NSNET_TEST_OFFLOAD") == "0",
                    reason="NSNET_TEST_OFFLOAD=0 adds --no-offload")
def test_offload_is_default(connect, host_server):
    """Without a flag nsnet runs with offloads."""
    srv = host_server("sink")
    net = connect()
    r = net.ns.client("tcp-send", GW4, srv.port, 2 * MIB)
    assert r["reply"].split() == [str(2 * MIB), r["sha256"]]
    st = stats(net)
    if st["rx_gso_frames"] == 0:
        raise HarnessError(f"no TSO frames without --no-offload: {st}")


def test_large_mtu_without_tso(connect):
    """Between 32768 (linux.TSO_MTU_LIMIT) and 65520 the namespace sends
    plain frames (no TSO to complete); libslirp runs with its if_mtu capped
    (slirp.CAPPED_SLIRP_MTU) and the MSS of the namespace's SYN-ACK
    lowered to match, and an upload through a port forward arrives intact."""
    net = start(connect, "on", 40000, 4)
    server = net.ns.start_server("tcp-serve", "0.0.0.0", 0, "sink", 1)
    try:
        port = free_port()
        req = {"execute": "add_hostfwd",
               "arguments": {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": port,
                             "guest_port": server.port}}
        assert "return" in json.loads(api_call(net.api, req))
        data = payload(BULK)
        assert tcp_send("127.0.0.1", port, data).decode().split() == [str(BULK), sha256(data)]
        assert server.result()["connections"][0]["received"] == BULK
    finally:
        server.close()
    st = stats(net)
    assert st["rx_gso_frames"] == 0 and st["rx_csum_completed"] == 0
    assert st["rx_mss_adjusted"] >= 1, st
