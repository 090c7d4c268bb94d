"""Interface configuration over rtnetlink with the standard library only.

What `nsnet -c` does with pyroute2 (lo up; the TAP's MTU, MAC, up; the
guest address with the CIDR's netmask and broadcast; a default route via
the gateway, proto boot), in a few raw netlink messages.  `nsnet run` uses
it inside its child, where importing pyroute2 (~100 ms) would sit on the
path to CMD's first instruction.

Call configure() from a process inside the target network namespace that
has CAP_NET_ADMIN there.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from .netconfig import NetConfig

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

IFF_UP = 0x1
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")


class NetlinkError(OSError):
    """The kernel refused a request; str() says which one and why."""


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


class Rtnl:
    """One NETLINK_ROUTE socket; each request waits for its ack."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, what: str, msg_type: int, flags: int, body: bytes) -> None:
        self.seq += 1
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type,
                             NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0)
        self.sock.send(hdr + body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(errno.EPROTO, f"{what}: malformed netlink reply")
                if kind == NLMSG_ERROR and seq == self.seq:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    if err:
                        raise NetlinkError(-err, f"{what}: {os.strerror(-err)}")
                    return
                off += (length + 3) & ~3

    def set_link(self, index: int, *, up: bool = True, mtu: int | None = None,
                 mac: bytes | None = None) -> None:
        attrs = b""
        if mac is not None:
            attrs += _attr(IFLA_ADDRESS, mac)
        if mtu is not None:
            attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
        self.request(f"set link {index}", RTM_NEWLINK, 0, body + attrs)

    def add_addr4(self, index: int, iface: ipaddress.IPv4Interface) -> None:
        body = _IFADDRMSG.pack(socket.AF_INET, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE,
                               index)
        body += _attr(IFA_LOCAL, iface.ip.packed) + _attr(IFA_ADDRESS, iface.ip.packed)
        body += _attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
        self.request(f"add address {iface}", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def add_default_route4(self, index: int, gateway: ipaddress.IPv4Address) -> None:
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                           RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
        body += _attr(RTA_GATEWAY, gateway.packed) + _attr(RTA_OIF, struct.pack("=i", index))
        self.request(f"add default route via {gateway}", RTM_NEWROUTE,
                     NLM_F_CREATE | NLM_F_EXCL, body)


def configure(tapname: str, net: NetConfig) -> None:
    """Configure lo and the TAP as `nsnet -c` does. Raises OSError."""
    try:
        idx = socket.if_nametoindex(tapname)
    except OSError:
        raise NetlinkError(errno.ENODEV, f"no interface {tapname!r} in the namespace") from None
    with Rtnl() as nl:
        nl.set_link(socket.if_nametoindex("lo"), up=True)
        nl.set_link(idx, up=True, mtu=net.mtu, mac=net.mac)
        nl.add_addr4(idx, ipaddress.IPv4Interface(f"{net.guest}/{net.cidr.prefixlen}"))
        nl.add_default_route4(idx, net.gateway)
