"""Just enough rtnetlink, with plain sockets, to configure the TAP on the
path to "ready" (-c): link up/MTU/MAC, one IPv4 address, the default route.

pyroute2 does the same but costs ~90 ms to import (it loads the whole
package, asyncio included), three times slirp4netns's whole start; it stays
for what is off that path.  Every request asks for an ACK and a negative
ACK raises OSError with the kernel's errno.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

TYPE_CHECKING = False

if TYPE_CHECKING:
    from ..netconfig import NetConfig

RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2

IFF_UP = 0x1
IFF_MULTICAST = 0x1000
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1


def _attr(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


class Rtnl:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes) -> None:
        self.seq += 1
        msg = struct.pack("=LHHLL", 16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK,
                          self.seq, 0) + body
        self.sock.send(msg)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, seq, _ = struct.unpack_from("=LHHLL", data, off)
                if mtype == NLMSG_ERROR and seq == self.seq:
                    err = -struct.unpack_from("=i", data, off + 16)[0]
                    if err:
                        raise OSError(err, os.strerror(err))
                    return
                off += max(16, (length + 3) & ~3)

    def set_link(self, index: int, up: bool | None = None, mtu: int | None = None,
                 mac: bytes | None = None, multicast: bool | None = None) -> None:
        attrs = b""
        if mtu is not None:
            attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
        if mac is not None:
            attrs += _attr(IFLA_ADDRESS, mac)
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        if multicast is not None:
            flags |= IFF_MULTICAST if multicast else 0
            change |= IFF_MULTICAST
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)
        self.request(RTM_NEWLINK, 0, body + attrs)

    def add_addr4(self, index: int, addr: ipaddress.IPv4Address, prefixlen: int,
                  broadcast: ipaddress.IPv4Address) -> None:
        body = struct.pack("=BBBBI", socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, addr.packed) + _attr(IFA_ADDRESS, addr.packed)
        body += _attr(IFA_BROADCAST, broadcast.packed)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def add_default_route4(self, index: int, gateway: ipaddress.IPv4Address,
                           proto: int) -> None:
        body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, proto,
                           RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
        body += _attr(RTA_GATEWAY, gateway.packed) + _attr(RTA_OIF, struct.pack("=I", index))
        # NLM_F_CREATE without NLM_F_EXCL, as slirp4netns's SIOCADDRT: a
        # second instance on the namespace (another TAP, --cidr) adds a second
        # default route ahead of the first; only the very same route is EEXIST.
        self.request(RTM_NEWROUTE, NLM_F_CREATE, body)


def configure(tapname: str, net: "NetConfig") -> None:
    """Configure the namespace side as `nsnet -c` does: lo up; TAP MTU,
    MAC, up; the guest address; the default route via the gateway.
    Raises OSError (with the kernel's errno) on failure."""
    with Rtnl() as nl:
        try:
            nl.set_link(socket.if_nametoindex("lo"), up=True)
        except OSError:
            pass  # no lo: nothing to bring up
        idx = socket.if_nametoindex(tapname)
        nl.set_link(idx, mtu=net.mtu)
        if net.mac:
            nl.set_link(idx, mac=net.mac)
        # slirp4netns sets the flags wholesale (SIOCSIFFLAGS), which clears
        # MULTICAST; the namespace sees the same link flags with nsnet.
        nl.set_link(idx, up=True, multicast=False)
        nl.add_addr4(idx, net.guest, net.cidr.prefixlen, net.cidr.broadcast_address)
        # proto boot (3), as `ip route add` and the SIOCADDRT ioctl set it
        nl.add_default_route4(idx, net.gateway, proto=3)
