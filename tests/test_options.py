"""Command-line options that change what the namespace sees or how the process behaves."""
import os

import pytest

from harness import api_call, free_port, tcp_send, wait_until

pytestmark = pytest.mark.timeout(120)

GW = "10.0.2.2"


def inet(ns, dev="tap0"):
    return [(a["local"], a["prefixlen"]) for a in ns.addrs(dev, "inet")]


def default_route(ns, family="-4"):
    routes = ns.ip_json(family, "route", "show", "default")
    assert len(routes) == 1, routes
    return routes[0]


def test_configure_defaults(connect):
    net = connect()
    link = net.ns.link("tap0")
    assert link["mtu"] == 1500
    assert "UP" in link["flags"]
    assert inet(net.ns) == [("10.0.2.100", 24)]
    route = default_route(net.ns)
    assert route["gateway"] == GW and route["dev"] == "tap0"
    lo = net.ns.link("lo")
    assert "UP" in lo["flags"]


def test_disable_host_loopback(connect, host_server):
    srv = host_server("sink")
    net = connect("--disable-host-loopback")
    r = net.ns.client("connect", GW, srv.port)
    # libslirp answers the SYN with ICMP net-unreachable.
    assert r["ok"] is False and "Network is unreachable" in r["error"], r
    assert srv.connections == 0


def test_no_host_loopback_alias(connect, host_server):
    srv = host_server("sink")
    net = connect("--no-host-loopback")
    assert net.ns.client("connect", GW, srv.port)["ok"] is False
    assert srv.connections == 0


def test_cidr(connect, host_server):
    srv = host_server("echo")
    net = connect("--cidr", "10.8.0.0/24")
    assert inet(net.ns) == [("10.8.0.100", 24)]
    assert default_route(net.ns)["gateway"] == "10.8.0.2"
    r = net.ns.client("tcp-echo", "10.8.0.2", srv.port, 10_000)
    assert r["sha_received"] == r["sha_sent"]
    # The API's default guest address follows the CIDR.
    port = free_port()
    assert api_call(net.api, {"execute": "add_hostfwd", "arguments": {
        "proto": "tcp", "host_addr": "127.0.0.1", "host_port": port, "guest_port": 80}}) \
        == b'{"return":{"id":1}}'
    listed = api_call(net.api, b'{"execute":"list_hostfwd"}')
    assert b'"guest_addr":"10.8.0.100"' in listed


def test_cidr_wide_prefix(connect):
    net = connect("--cidr=10.64.0.0/10")
    assert inet(net.ns) == [("10.64.0.100", 10)]
    assert default_route(net.ns)["gateway"] == "10.64.0.2"


def test_macaddress(connect):
    net = connect("--macaddress", "02:42:ac:11:00:07")
    assert net.ns.link("tap0")["address"] == "02:42:ac:11:00:07"


@pytest.mark.parametrize("mtu", [68, 9000, 65521])
def test_mtu(connect, mtu):
    net = connect("--mtu", mtu)
    assert net.ns.link("tap0")["mtu"] == mtu


def test_ipv6_slaac_and_gateway(connect, host_server):
    srv = host_server("echo", addr="::1")
    net = connect("--enable-ipv6", "--macaddress", "02:00:00:00:00:42")
    addr = net.ns.wait_slaac()
    # SLAAC: the interface id is derived from the MAC (EUI-64).
    assert addr == "fd00::ff:fe00:42"
    route = default_route(net.ns, "-6")
    assert route["dev"] == "tap0"
    # fd00::2 is the host's ::1, as 10.0.2.2 is its 127.0.0.1.
    r = net.ns.client("tcp-echo", "fd00::2", srv.port, 50_000)
    assert r["sha_received"] == r["sha_sent"] and r["received"] == 50_000


def test_no_ipv6_without_flag(connect, host_server):
    net = connect()
    net.ns.wait_dad()

    def solicits():
        out = net.ns.run(["cat", "/proc/net/snmp6"], text=True).stdout
        return int(dict(ln.split() for ln in out.splitlines())["Icmp6OutRouterSolicits"])

    wait_until(lambda: solicits() >= 1, 20, interval=0.1, what="a router solicitation sent")
    # A round trip through the forwarder after the solicitation: an answer
    # to it would have been on the TAP before this connection's.
    srv = host_server("echo")
    assert net.ns.client("connect", "10.0.2.2", srv.port)["ok"] is True
    assert not [a for a in net.ns.addrs("tap0", "inet6") if a.get("scope") == "global"]


def test_netns_type_path(impl, ns, start_fwd, host_server):
    srv = host_server("echo")
    start_fwd(impl, ["-c", "--netns-type=path", f"--userns-path={ns.user_path}",
                     ns.net_path, "tap0"])
    r = ns.client("tcp-echo", GW, srv.port, 10_000)
    assert r["sha_received"] == r["sha_sent"]


def test_pre_created_tap(impl, ns, start_fwd, host_server):
    """RootlessKit's way: the TAP exists before the forwarder attaches, no -c."""
    srv = host_server("echo")
    ns.sh("ip tuntap add name tap0 mode tap && ip link set tap0 up")
    start_fwd(impl, [ns.pid, "tap0"])
    assert inet(ns) == []  # without -c nothing is configured
    ns.sh("ip link set lo up && ip addr add 10.0.2.100/24 dev tap0 && "
          "ip route add default via 10.0.2.2")
    r = ns.client("tcp-echo", GW, srv.port, 100_000)
    assert r["sha_received"] == r["sha_sent"]


def test_custom_tap_name(connect):
    net = connect(tap="nstap-1")
    assert inet(net.ns, "nstap-1") == [("10.0.2.100", 24)]


def test_ready_fd_exactly_one_then_eof(connect):
    net = connect()
    assert net.fwd.read_ready_to_eof() == b"1"
    assert net.fwd.alive()
    # Ready means usable: the API socket exists and answers.
    assert api_call(net.api, b'{"execute":"list_hostfwd"}').startswith(b'{"entries":[]')


def test_ready_fd_eof_on_failure(impl, ns, start_fwd):
    """A failing start (MTU 67 is below libslirp's minimum) writes nothing: EOF."""
    fwd = start_fwd(impl, ["-c", "--mtu", "67", ns.pid, "tap0"], wait=False)
    assert fwd.read_ready_to_eof(timeout=15) == b""
    assert fwd.wait_exit(15) == 1


def test_exit_fd(connect):
    net = connect(exit_fd=True)
    assert os.path.exists(net.api)
    net.fwd.close_exit_fd()
    assert net.fwd.wait_exit(5) == 0
    assert not os.path.exists(net.api), "API socket must be removed on exit-fd"


def test_exit_fd_data_does_not_stop(connect):
    net = connect(exit_fd=True)
    os.write(net.fwd.exit_w, b"x")
    # Two API round trips: the second is answered by a later turn of the
    # loop than the one that saw the exit-fd readable.
    for _ in range(2):
        assert b"entries" in api_call(net.api, {"execute": "list_hostfwd"})
    assert net.fwd.alive()
    net.fwd.close_exit_fd()
    assert net.fwd.wait_exit(5) == 0


def test_exit_fd_without_api(connect):
    net = connect(api=False, exit_fd=True)
    net.fwd.close_exit_fd()
    assert net.fwd.wait_exit(5) == 0


def test_two_namespaces_independent(impl, make_ns, connect, host_server):
    srv = host_server("sink")
    a = connect(target=make_ns())
    b = connect(target=make_ns())
    for net in (a, b):
        r = net.ns.client("tcp-send", GW, srv.port, 5000)
        assert r["reply"].split() == ["5000", r["sha256"]]
    assert srv.connections == 2


@pytest.mark.parametrize("flags", [["--enable-sandbox"], ["--enable-seccomp"],
                                   ["--enable-sandbox", "--enable-seccomp"]],
                         ids=["sandbox", "seccomp", "sandbox+seccomp"])
def test_sandbox_and_seccomp(connect, host_server, flags):
    """RootlessKit and Podman pass these; traffic and the API must keep working."""
    srv = host_server("echo")
    net = connect(*flags)
    r = net.ns.client("tcp-echo", GW, srv.port, 100_000)
    assert r["sha_received"] == r["sha_sent"]
    server = net.ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
    try:
        port = free_port()
        assert api_call(net.api, {"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": port,
            "guest_port": 8080}}) == b'{"return":{"id":1}}'
        assert tcp_send("127.0.0.1", port, b"z" * 5000) == b"z" * 5000
    finally:
        server.close()


def test_create_sandbox_alias(connect, host_server):
    srv = host_server("echo")
    net = connect("--create-sandbox")
    r = net.ns.client("tcp-echo", GW, srv.port, 1000)
    assert r["sha_received"] == r["sha_sent"]


def test_podman_style(impl, ns, start_fwd, workdir):
    """Podman 4.3's invocation: launched from inside the rootless user namespace
    (not its netns), netns given as a path, -c -r 3 -e 4, forwards with guest_addr ""."""
    api = f"{workdir}/podman.net"
    fwd = start_fwd(impl, ["--disable-host-loopback", "--mtu=65520", "-c",
                           "--api-socket", api, "--netns-type=path", ns.net_path, "tap0"],
                    exit_fd=True,
                    prefix=["nsenter", f"--target={ns.pid}", "--user", "--preserve-credentials",
                            "--"])
    assert ns.link("tap0")["mtu"] == 65520
    assert inet(ns) == [("10.0.2.100", 24)]
    server = ns.start_server("tcp-serve", "0.0.0.0", 80, "echo", 1)
    try:
        port = free_port()
        request = ('{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"",'
                   f'"host_port":{port},"guest_addr":"","guest_port":80}}}}\n')
        assert api_call(api, request) == b'{"return":{"id":1}}'
        assert tcp_send("127.0.0.1", port, b"p" * 70000) == b"p" * 70000
    finally:
        server.close()
    fwd.close_exit_fd()  # conmon exits
    assert fwd.wait_exit(5) == 0
    assert not os.path.exists(api)


@pytest.mark.parametrize("impl", ["nsnet"], indirect=True)
def test_cidr6(connect, host_server):
    """--cidr6 (nsnet): the IPv6 /64 of the virtual network, fd00::/64 in
    slirp4netns with no way to change it."""
    import json

    srv = host_server("echo", addr="::1")
    net = connect("--enable-ipv6", "--cidr6=fd00:1:2:3::/64", "--macaddress",
                  "02:00:00:00:00:42")
    assert net.ns.wait_slaac(prefix="fd00:1:2:3:") == "fd00:1:2:3:0:ff:fe00:42"
    assert default_route(net.ns, "-6")["dev"] == "tap0"
    r = net.ns.client("tcp-echo", "fd00:1:2:3::2", srv.port, 50_000)
    assert r["sha_received"] == r["sha_sent"]
    info = json.loads(api_call(net.api, b'{"execute":"get_info"}'))["return"]
    assert (info["prefix6"], info["gateway6"], info["guest6"]) == (
        "fd00:1:2:3::/64", "fd00:1:2:3::2", "fd00:1:2:3:0:ff:fe00:42")
