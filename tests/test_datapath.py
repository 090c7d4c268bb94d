"""Traffic through the forwarder: namespace <-> host loopback, both directions."""
import pytest

from harness import add_hostfwd, free_port, payload, sha256, tcp_send, unpriv_only

pytestmark = pytest.mark.timeout(120)

GW = "10.0.2.2"  # slirp's alias of the host's 127.0.0.1
MIB = 1 << 20


def test_tcp_echo_via_gateway(connect, host_server):
    srv = host_server("echo")
    net = connect()
    r = net.ns.client("tcp-echo", GW, srv.port, 256 * 1024)
    assert r["received"] == r["sent"] == 256 * 1024
    assert r["sha_received"] == r["sha_sent"]
    assert srv.connections == 1


def test_udp_echo_via_gateway(connect, host_server):
    srv = host_server("echo", "udp")
    net = connect()
    r = net.ns.client("udp-echo", GW, srv.port, 20, 1200)
    assert r == {"sent": 20, "echoed": 20}


def test_ping_gateway(connect):
    net = connect()
    # Unprivileged ICMP sockets need the ns's gid in ping_group_range; only
    # mapped gids are accepted (ns root = gid 0).
    net.ns.sh("echo '0 0' > /proc/sys/net/ipv4/ping_group_range")
    cp = net.ns.run(["ping", "-c1", "-W2", GW], check=False, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "1 received" in cp.stdout


@unpriv_only
@pytest.mark.parametrize("mtu", [1500, 65520])
def test_bulk_ns_to_host(connect, host_server, mtu):
    srv = host_server("sink")
    net = connect("--mtu", mtu)
    assert net.ns.link("tap0")["mtu"] == mtu
    r = net.ns.client("tcp-send", GW, srv.port, 16 * MIB)
    count, digest = r["reply"].split()
    assert int(count) == 16 * MIB
    assert digest == r["sha256"]


@unpriv_only
@pytest.mark.parametrize("mtu", [1500, 65520])
def test_bulk_host_to_ns_via_hostfwd(connect, mtu):
    net = connect("--mtu", mtu)
    server = net.ns.start_server("tcp-serve", "0.0.0.0", 0, "sink", 1)
    try:
        guest_port = server.port
        host_port = free_port()
        assert add_hostfwd(net.api, "tcp", host_port, guest_port) == b'{"return":{"id":1}}'
        data = payload(16 * MIB)
        reply = tcp_send("127.0.0.1", host_port, data)
        assert reply.decode().split() == [str(len(data)), sha256(data)]
        result = server.result()
        assert result["connections"][0]["received"] == len(data)
    finally:
        server.close()


@unpriv_only
@pytest.mark.parametrize("mtu", [1500, 65520])
def test_bulk_download_from_ns_via_hostfwd(connect, mtu):
    """Data flowing namespace -> host over a forwarded connection."""
    net = connect("--mtu", mtu)
    server = net.ns.start_server("tcp-serve", "0.0.0.0", 0, f"source:{16 * MIB}", 1)
    try:
        guest_port = server.port
        host_port = free_port()
        assert add_hostfwd(net.api, "tcp", host_port, guest_port) == b'{"return":{"id":1}}'
        got = tcp_send("127.0.0.1", host_port, b"")
        sent = server.result()["connections"][0]
        assert len(got) == sent["sent"] == 16 * MIB
        assert sha256(got) == sent["sha256"]
    finally:
        server.close()


def test_many_connections(connect, host_server):
    srv = host_server("sink")
    net = connect()
    for _ in range(20):
        r = net.ns.client("tcp-send", GW, srv.port, 1000)
        assert r["reply"].split() == ["1000", r["sha256"]]
    assert srv.connections == 20
