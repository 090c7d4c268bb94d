"""The API socket (-a): replies byte for byte, and forwarding that really works."""
import json
import os
import re
import socket
import threading

import pytest

from api_cases import (ADD_FAILED, BAD_HOST_PORT, BAD_GUEST_PORT, BAD_ID, BAD_PROTO, LIST,
                       LIST_VARIANTS, SLIRP4NETNS_ONLY, STATELESS_ERRORS, add, entry, list_reply,
                       remove)
from harness import (api_call, free_port, free_ports, nsnet_only, payload, sha256, tcp_send,
                     udp_roundtrip, unpriv_only)

pytestmark = pytest.mark.timeout(120)

OK1 = b'{"return":{"id":1}}'
REMOVED = b'{"return":{}}'




def assert_alive(net):
    assert net.fwd.alive(), f"{net.impl.name} died (exit {net.fwd.proc.returncode})"
    assert api_call(net.api, LIST).startswith(b'{"entries":')


@unpriv_only
def test_add_list_remove_ids(connect):
    net = connect()
    name = net.impl.name
    assert api_call(net.api, LIST) == list_reply(name, [])
    p1, p2, p3, p4 = free_ports(4)
    assert api_call(net.api, add("tcp", "127.0.0.1", p1, 80)) == OK1
    # "" and missing addresses take the defaults: 0.0.0.0 and CIDR+100.
    assert api_call(net.api, add("udp", "", p2, 81, guest_addr="")) == b'{"return":{"id":2}}'
    assert api_call(net.api, add("tcp", None, p3, 82, guest_addr="10.0.2.100")) == \
        b'{"return":{"id":3}}'
    expected = [
        entry(1, "tcp", "127.0.0.1", p1, "10.0.2.100", 80),
        entry(2, "udp", "0.0.0.0", p2, "10.0.2.100", 81),
        entry(3, "tcp", "0.0.0.0", p3, "10.0.2.100", 82),
    ]
    assert api_call(net.api, LIST) == list_reply(name, expected)
    assert api_call(net.api, remove(1)) == REMOVED
    assert api_call(net.api, remove(1)) == BAD_ID
    # Ids are never reused.
    assert api_call(net.api, add("tcp", "127.0.0.1", p4, 83)) == b'{"return":{"id":4}}'
    expected = expected[1:] + [entry(4, "tcp", "127.0.0.1", p4, "10.0.2.100", 83)]
    assert api_call(net.api, LIST) == list_reply(name, expected)
    for id_ in (2, 3, 4):
        assert api_call(net.api, remove(id_)) == REMOVED
    assert api_call(net.api, LIST) == list_reply(name, [])


@unpriv_only
def test_error_replies_byte_exact(connect):
    net = connect()
    mismatches = []
    for what, request, expected in STATELESS_ERRORS:
        try:
            got = api_call(net.api, request)
        except OSError as e:
            got = repr(e)
        if got != expected:
            mismatches.append(f"{what}: sent {request[:120]!r}\n   want {expected!r}\n   got  {got!r}")
        if not net.fwd.alive():
            mismatches.append(f"{what}: process died ({net.fwd.proc.returncode})")
            break
    assert not mismatches, "\n".join(mismatches)
    assert_alive(net)


@unpriv_only
def test_host_port_0(connect):
    """slirp4netns refuses host_port 0; nsnet lets the kernel pick the port,
    replies with it and lists it, and the forward works."""
    net = connect()
    if net.impl.name == "slirp4netns":
        for what, request, expected in SLIRP4NETNS_ONLY:
            assert api_call(net.api, request) == expected, what
        return
    reply = json.loads(api_call(net.api, add("tcp", "127.0.0.1", 0, 8080)))
    port = reply["return"]["host_port"]
    assert reply == {"return": {"id": 1, "host_port": port}} and 1 <= port <= 65535
    assert json.loads(api_call(net.api, LIST))["entries"][0]["host_port"] == port
    srv = net.ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
    assert tcp_send("127.0.0.1", port, b"picked") == b"picked"
    srv.result()
    reply = json.loads(api_call(net.api, add("udp", "127.0.0.1", 0, 5353)))
    assert reply["return"]["id"] == 2 and reply["return"]["host_port"] > 0


@unpriv_only
def test_list_variants_accepted(connect):
    net = connect()
    for what, request in LIST_VARIANTS:
        assert api_call(net.api, request) == list_reply(net.impl.name, []), what


@unpriv_only
def test_port_already_taken(connect):
    net = connect()
    port = free_port()
    assert api_call(net.api, add("tcp", "127.0.0.1", port, 80)) == OK1
    assert api_call(net.api, add("tcp", "127.0.0.1", port, 81)) == ADD_FAILED
    # Taken by an ordinary host socket.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert api_call(net.api, add("tcp", "127.0.0.1", s.getsockname()[1], 82)) == ADD_FAILED
    assert api_call(net.api, LIST) == list_reply(
        net.impl.name, [entry(1, "tcp", "127.0.0.1", port, "10.0.2.100", 80)])


@unpriv_only
def test_request_without_shutdown(connect):
    """A client that writes one request and waits (no half-close) gets its answer."""
    net = connect()
    assert api_call(net.api, LIST, shutdown=False) == list_reply(net.impl.name, [])


@unpriv_only
def test_api_socket_owner(connect, user):
    net = connect()
    st = os.stat(net.api)
    assert st.st_uid == user.uid


def test_hostfwd_tcp(connect):
    net = connect()
    server = net.ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
    try:
        port = free_port()
        assert api_call(net.api, add("tcp", "127.0.0.1", port, 8080)) == OK1
        data = payload(100_000)
        assert sha256(tcp_send("127.0.0.1", port, data)) == sha256(data)
        conn = server.result()["connections"][0]
        assert conn["echoed"] == len(data)
    finally:
        server.close()


def test_hostfwd_udp(connect):
    net = connect()
    server = net.ns.start_server("udp-serve", "0.0.0.0", 5353, 3)
    try:
        port = free_port(socket.SOCK_DGRAM)
        assert api_call(net.api, add("udp", "127.0.0.1", port, 5353)) == OK1
        for _ in range(3):
            data = payload(512)
            assert udp_roundtrip("127.0.0.1", port, data) == data
        assert len(server.result()["peers"]) == 3
    finally:
        server.close()


@unpriv_only
def test_remove_stops_forwarding(connect):
    net = connect()
    server = net.ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
    try:
        port = free_port()
        assert api_call(net.api, add("tcp", "127.0.0.1", port, 8080)) == OK1
        assert tcp_send("127.0.0.1", port, b"hello") == b"hello"
        assert api_call(net.api, remove(1)) == REMOVED
        with pytest.raises(ConnectionRefusedError):
            tcp_send("127.0.0.1", port, b"again", timeout=5)
    finally:
        server.close()


@unpriv_only
def test_guest_addr_explicit(connect):
    net = connect()
    server = net.ns.start_server("tcp-serve", "10.0.2.100", 8081, "echo", 1)
    try:
        port = free_port()
        assert api_call(net.api, add("tcp", "127.0.0.1", port, 8081,
                                     guest_addr="10.0.2.100")) == OK1
        assert tcp_send("127.0.0.1", port, b"x" * 1000) == b"x" * 1000
    finally:
        server.close()


# ---- nsnet only: where slirp4netns 1.2.0 is buggy, nsnet differs on purpose ----

@nsnet_only
@unpriv_only
@pytest.mark.parametrize("request_bytes", [
    b'{"execute":"add_hostfwd","arguments":{"host_addr":"127.0.0.1","host_port":18093,"guest_port":93}}',
    b'{"execute":"add_hostfwd","arguments":{"proto":1,"host_addr":"127.0.0.1","host_port":18094,"guest_port":80}}',
    b'{"execute":"add_hostfwd","arguments":{"proto":null,"host_addr":"127.0.0.1","host_port":18094,"guest_port":80}}',
], ids=["proto missing", "proto a number", "proto null"])
def test_nsnet_bad_proto_does_not_crash(connect, request_bytes):
    """slirp4netns segfaults on these."""
    net = connect()
    assert api_call(net.api, request_bytes) == BAD_PROTO
    assert_alive(net)


@nsnet_only
@unpriv_only
@pytest.mark.parametrize("request_bytes", [
    b'{"execute":"add_hostfwd"}',
    b'{"execute":"add_hostfwd","arguments":"x"}',
    b'{"execute":"add_hostfwd","arguments":[]}',
], ids=["no arguments", "arguments a string", "arguments an array"])
def test_nsnet_bad_arguments_do_not_crash(connect, request_bytes):
    """slirp4netns segfaults (or wedges its API socket) on these."""
    net = connect()
    reply = api_call(net.api, request_bytes)
    assert re.fullmatch(rb'\{"error":\{"desc":"bad request: add_hostfwd: bad arguments'
                        rb'\.(proto|host_addr|host_port|guest_addr|guest_port)"\}\}', reply), reply
    assert_alive(net)


@nsnet_only
@unpriv_only
@pytest.mark.parametrize("field,value,expected", [
    ("host_port", 70000, BAD_HOST_PORT),
    ("host_port", 65536, BAD_HOST_PORT),
    ("host_port", -1, BAD_HOST_PORT),
    ("guest_port", 70000, BAD_GUEST_PORT),
    ("guest_port", -1, BAD_GUEST_PORT),
], ids=["host_port 70000", "host_port 65536", "host_port -1", "guest_port 70000",
        "guest_port -1"])
def test_nsnet_port_range(connect, field, value, expected):
    """slirp4netns accepts these and lists the bogus numbers."""
    net = connect()
    args = {"host_port": free_port(), "guest_port": 80, field: value}
    assert api_call(net.api, add("tcp", "127.0.0.1", **args)) == expected
    assert api_call(net.api, LIST) == list_reply("nsnet", [])


@nsnet_only
@unpriv_only
def test_nsnet_list_has_return_key(connect):
    net = connect()
    port = free_port()
    assert api_call(net.api, add("tcp", "127.0.0.1", port, 80)) == OK1
    reply = json.loads(api_call(net.api, LIST))
    assert reply["entries"] == reply["return"]["entries"] == [
        entry(1, "tcp", "127.0.0.1", port, "10.0.2.100", 80)]


@nsnet_only
@pytest.mark.parametrize("user", ["root", "unpriv"], indirect=True)
def test_nsnet_ipv6_hostfwd(connect):
    """slirp4netns rejects an IPv6 host_addr; nsnet forwards [::1]:P into the namespace."""
    net = connect("--enable-ipv6")
    net.ns.wait_slaac()
    server = net.ns.start_server("tcp-serve", "::", 8080, "echo", 1)
    try:
        port = free_port(family=socket.AF_INET6, addr="::1")
        assert api_call(net.api, add("tcp", "::1", port, 8080)) == OK1
        listed = json.loads(api_call(net.api, LIST))["entries"]
        assert listed[0]["host_addr"] == "::1" and listed[0]["host_port"] == port
        data = payload(200_000)
        assert sha256(tcp_send("::1", port, data)) == sha256(data)
    finally:
        server.close()


@nsnet_only
@unpriv_only
def test_nsnet_concurrent_clients(connect):
    """slirp4netns listens with backlog 0; nsnet must serve a burst of clients."""
    net = connect()
    n = 32
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def client(i):
        barrier.wait(timeout=10)
        try:
            results[i] = api_call(net.api, LIST, timeout=10)
        except OSError as e:
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [list_reply("nsnet", [])] * n


@nsnet_only
def test_nsnet_get_info_interface(connect, ns):
    """get_info with "interface": true reports the TAP as the namespace sees
    it (read with pyroute2 from inside the namespace), matching `ip`."""
    net = connect("--macaddress=02:00:00:00:00:42", "--mtu=9000")
    info = json.loads(api_call(net.api, {"execute": "get_info",
                                         "arguments": {"interface": True}}))["return"]
    iface = info["interface"]
    link = ns.link("tap0")
    assert iface["ifname"] == "tap0" and iface["ifindex"] == link["ifindex"]
    assert iface["mtu"] == 9000 == link["mtu"]
    assert iface["mac"] == "02:00:00:00:00:42" == link["address"]
    assert iface["up"] is True
    assert "10.0.2.100/24" in iface["addresses"]
    assert {"dst": "default", "gateway": "10.0.2.2", "family": "inet"} in iface["routes"]
    # Without the argument, no namespace helper runs and no "interface" key.
    plain = json.loads(api_call(net.api, {"execute": "get_info"}))["return"]
    assert "interface" not in plain and plain["tap"]["name"] == "tap0"
    assert_alive(net)
