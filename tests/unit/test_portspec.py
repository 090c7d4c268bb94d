"""nsnet.portspec: `nsnet run --publish` / add_forward("...") specs."""
from __future__ import annotations

import socket

import pytest

from nsnet import portspec as ps


@pytest.mark.parametrize("spec,want", [
    ("8080:80", ("tcp", "", 8080, 80)),
    ("8080:80/udp", ("udp", "", 8080, 80)),
    ("8080:80/TCP", ("tcp", "", 8080, 80)),
    ("127.0.0.1:8080:80", ("tcp", "127.0.0.1", 8080, 80)),
    ("[::1]:8080:80/udp", ("udp", "::1", 8080, 80)),
    ("[0:0::1]:1:65535", ("tcp", "::1", 1, 65535)),
])
def test_parse(spec, want):
    s = ps.parse(spec)
    assert (s.proto, s.host_addr, s.host_port, s.guest_port) == want


@pytest.mark.parametrize("spec,msg", [
    ("80", "expected"),
    ("1:2:3:4", "expected"),
    ("8080:80/sctp", "protocol must be tcp or udp"),
    ("0:80", "host port must be from 1 to 65535"),
    ("8080:65536", "guest port must be from 1 to 65535"),
    ("x:80", "host port 'x' is not a port number"),
    ("8080:-1", "guest port '-1' is not a port number"),
    (":8080:80", "empty host address"),
    ("bogus:8080:80", "is not an IPv4 or IPv6 address"),
    ("[127.0.0.1]:8080:80", "brackets are for IPv6"),
    ("[::1:8080:80", "expected"),
    ("[::1]:8080", "expected"),
])
def test_refused(spec, msg):
    with pytest.raises(ps.PortSpecError, match=msg):
        ps.parse(spec)


def test_not_a_string():
    with pytest.raises(ps.PortSpecError, match="string"):
        ps.parse(8080)


@pytest.mark.parametrize("spec", ["8080:80/tcp", "127.0.0.1:8080:80/udp", "[::1]:1:2/tcp"])
def test_str_round_trip(spec):
    assert str(ps.parse(spec)) == spec


@pytest.mark.parametrize("value", [0, 65536, True, "80", 8.0])
def test_check_port_refuses(value):
    with pytest.raises(ps.PortSpecError):
        ps.check_port(value, "port")


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert ps.port_in_use("tcp", "127.0.0.1", port)
    assert not ps.port_in_use("tcp", "127.0.0.1", port)
