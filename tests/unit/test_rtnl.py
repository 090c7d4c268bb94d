"""nsnet's rtnetlink requests (the -c path to ready), byte by byte, through
a fake netlink socket that records what is sent and answers with an ACK
or a negative ACK."""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from nsnet.ns import rtnl
from nsnet.netconfig import NetConfig, parse_cidr, parse_mac


class FakeSock:
    def __init__(self, errors=()):
        self.sent: list[bytes] = []
        self.errors = list(errors)  # errno per request, 0 = ACK

    def send(self, msg):
        self.sent.append(bytes(msg))
        return len(msg)

    def recv(self, _n):
        seq = struct.unpack_from("=LHHLL", self.sent[-1])[3]
        err = self.errors.pop(0) if self.errors else 0
        body = struct.pack("=i", -err) + self.sent[-1][:16]
        return struct.pack("=LHHLL", 16 + len(body), rtnl.NLMSG_ERROR, 0, seq, 0) + body

    def close(self):
        pass


def make(errors=()):
    nl = rtnl.Rtnl.__new__(rtnl.Rtnl)
    nl.sock = FakeSock(errors)
    nl.seq = 0
    return nl


def header(msg):
    return struct.unpack_from("=LHHLL", msg)


def attrs(data):
    out = {}
    while len(data) >= 4:
        length, kind = struct.unpack_from("=HH", data)
        out[kind] = data[4:length]
        data = data[(length + 3) & ~3:]
    return out


def test_header_asks_for_an_ack_and_counts_sequence():
    nl = make()
    nl.set_link(7, up=True)
    nl.set_link(7, mtu=1500)
    (m1, m2) = nl.sock.sent
    length, kind, flags, seq, _ = header(m1)
    assert length == len(m1) and kind == rtnl.RTM_NEWLINK
    assert flags & rtnl.NLM_F_REQUEST and flags & rtnl.NLM_F_ACK
    assert (seq, header(m2)[3]) == (1, 2)


def test_set_link_up_no_multicast():
    nl = make()
    nl.set_link(7, up=True, multicast=False)
    family, _type, index, flags, change = struct.unpack_from("=BxHiII", nl.sock.sent[0], 16)
    assert (family, index) == (socket.AF_UNSPEC, 7)
    assert flags == rtnl.IFF_UP
    assert change == rtnl.IFF_UP | rtnl.IFF_MULTICAST


def test_set_link_mtu_and_mac_attributes():
    nl = make()
    nl.set_link(3, mtu=65520, mac=b"\x02\0\0\0\0\x01")
    a = attrs(nl.sock.sent[0][16 + 16:])
    assert struct.unpack("=I", a[rtnl.IFLA_MTU]) == (65520,)
    assert a[rtnl.IFLA_ADDRESS] == b"\x02\0\0\0\0\x01"


def test_add_addr4():
    nl = make()
    nl.add_addr4(5, ipaddress.IPv4Address("10.0.2.100"), 24,
                 ipaddress.IPv4Address("10.0.2.255"))
    msg = nl.sock.sent[0]
    _, kind, flags, _, _ = header(msg)
    assert kind == rtnl.RTM_NEWADDR and flags & rtnl.NLM_F_CREATE and flags & rtnl.NLM_F_EXCL
    family, plen, _, scope, index = struct.unpack_from("=BBBBI", msg, 16)
    assert (family, plen, scope, index) == (socket.AF_INET, 24, 0, 5)
    a = attrs(msg[24:])
    assert a[rtnl.IFA_LOCAL] == a[rtnl.IFA_ADDRESS] == bytes([10, 0, 2, 100])
    assert a[rtnl.IFA_BROADCAST] == bytes([10, 0, 2, 255])


def test_add_default_route4():
    nl = make()
    nl.add_default_route4(5, ipaddress.IPv4Address("10.0.2.2"), proto=3)
    msg = nl.sock.sent[0]
    assert header(msg)[1] == rtnl.RTM_NEWROUTE
    fam, dst_len, _, _, table, proto, scope, rtype, _ = struct.unpack_from("=BBBBBBBBI", msg, 16)
    assert (fam, dst_len, table, proto, scope, rtype) == \
        (socket.AF_INET, 0, rtnl.RT_TABLE_MAIN, 3, 0, rtnl.RTN_UNICAST)
    a = attrs(msg[28:])
    assert a[rtnl.RTA_GATEWAY] == bytes([10, 0, 2, 2])
    assert struct.unpack("=I", a[rtnl.RTA_OIF]) == (5,)


def test_negative_ack_raises_the_kernels_errno():
    nl = make(errors=[errno.EEXIST])
    with pytest.raises(OSError) as e:
        nl.add_default_route4(5, ipaddress.IPv4Address("10.0.2.2"), proto=3)
    assert e.value.errno == errno.EEXIST


def test_real_socket_reports_errno():
    # A real NETLINK_ROUTE socket needs no privilege; changing a link does.
    with rtnl.Rtnl() as nl:
        with pytest.raises(OSError) as e:
            nl.set_link(2 ** 31 - 1, up=True)  # no such interface
        assert e.value.errno in (errno.ENODEV, errno.EPERM)


def test_configure_sequence(monkeypatch):
    made = []

    def fake_init(self):
        self.sock = FakeSock()
        self.seq = 0
        made.append(self)

    monkeypatch.setattr(rtnl.Rtnl, "__init__", fake_init)
    monkeypatch.setattr(socket, "if_nametoindex", lambda name: {"lo": 1, "tap0": 9}[name])
    net = NetConfig(cidr=parse_cidr("10.0.2.0/24"), mtu=65520,
                    mac=parse_mac("02:00:00:00:00:01"))
    rtnl.configure("tap0", net)
    kinds = [header(m)[1] for m in made[0].sock.sent]
    assert kinds == [rtnl.RTM_NEWLINK] * 4 + [rtnl.RTM_NEWADDR, rtnl.RTM_NEWROUTE]
    indexes = [struct.unpack_from("=i", m, 20)[0] for m in made[0].sock.sent[:4]]
    assert indexes == [1, 9, 9, 9]
