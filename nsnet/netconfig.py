"""The virtual network: addresses derived from --cidr, MTU, MAC, IPv6.

Defaults are slirp4netns's: 10.0.2.0/24, gateway (and host loopback) .2,
DNS .3, DHCP from .15, guest .100, MTU 1500; with IPv6 fd00::/64, gateway
::2, DNS ::3, guest address by SLAAC.
"""

from __future__ import annotations

import ipaddress
import re
from collections import namedtuple

DEFAULT_CIDR = "10.0.2.0/24"
DEFAULT_MTU = 1500
MTU_MIN = 68
MTU_MAX = 65521
IPV6_PREFIX = "fd00::"
IPV6_PREFIX_LEN = 64
IFNAMSIZ = 16  # including the terminating NUL

GATEWAY_OFFSET = 2
DNS_OFFSET = 3
DHCP_START_OFFSET = 15
GUEST_OFFSET = 100


def slaac_address(prefix: ipaddress.IPv6Address, mac: bytes) -> ipaddress.IPv6Address:
    """The address a Linux guest forms by SLAAC with EUI-64 (the default
    addr_gen_mode) from a /64 prefix and its MAC."""
    iid = bytes([mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE, mac[3], mac[4], mac[5]])
    return ipaddress.IPv6Address(prefix.packed[:8] + iid)


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """Parse --cidr as slirp4netns does: a network address, prefix 1..25."""
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise ConfigError(f"invalid CIDR: {text}") from None
    if "/" not in text:
        raise ConfigError(f"invalid CIDR: {text}")
    net = iface.network
    if not 1 <= net.prefixlen <= 25:
        raise ConfigError("prefix length needs to be 1-25")
    if iface.ip != net.network_address:
        raise ConfigError(
            f"CIDR needs to be a network address like {net}, not like {text}"
        )
    return net


def parse_cidr6(text: str) -> ipaddress.IPv6Network:
    """--cidr6: an IPv6 network address with prefix length 64 (SLAAC forms
    the namespace's address from a /64; libslirp's prefix is a /64)."""
    try:
        net = ipaddress.IPv6Network(text, strict=False)
    except ValueError:
        raise ConfigError(f"invalid IPv6 prefix: {text} (give PREFIX/64, e.g. fd00:1::/64)"
                          ) from None
    if "/" not in text or net.prefixlen != IPV6_PREFIX_LEN:
        raise ConfigError(f"--cidr6 needs a /64 (SLAAC), not {text}")
    if ipaddress.IPv6Interface(text).ip != net.network_address:
        raise ConfigError(f"--cidr6 needs a network address like {net}, not like {text}")
    if net.is_multicast or net.is_loopback or net.is_link_local or net.is_unspecified:
        raise ConfigError(f"--cidr6 {text}: not a unicast prefix a namespace can use")
    return net


def parse_mac(text: str) -> bytes:
    if not _MAC_RE.match(text):
        raise ConfigError(
            f'"{text}" is an invalid MAC address. macaddress has to be a valid '
            "MAC address (hex string, 6 bytes, each byte separated by a ':')."
        )
    return bytes(int(b, 16) for b in text.split(":"))


def check_mtu(mtu: int) -> int:
    if not MTU_MIN <= mtu <= MTU_MAX:
        raise ConfigError(f"MTU must be an integer from {MTU_MIN} to {MTU_MAX}, not {mtu}")
    return mtu


def check_tapname(name: str) -> str:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or name in (".", ".."):
        raise ConfigError(
            f"invalid TAP name {name!r}: 1 to {IFNAMSIZ - 1} bytes, no '/' or NUL"
        )
    return name


_NET_FIELDS = (
    "cidr",
    "mtu",
    "ipv6",
    "disable_host_loopback",
    "disable_dns",
    "restricted",  # no egress: only forwarded ports work
    "mac",  # bytes, or None for the kernel's random one
    "outbound_addr",  # resolved IPv4 address, or None
    "outbound_addr6",  # resolved IPv6 address, or None
    "offload",  # IFF_VNET_HDR + TSO on the TAP (--no-offload: off)
    "cidr6",  # the IPv6 /64 (--cidr6), or None for fd00::/64
)


# A named tuple, not a dataclass: importing dataclasses costs ~10 ms on the
# path to ready (it imports inspect).
class NetConfig(namedtuple("NetConfig", _NET_FIELDS, defaults=(
        ipaddress.IPv4Network(DEFAULT_CIDR), DEFAULT_MTU, False, False, False, False,
        None, None, None, True, None))):
    """Everything the forwarder and the namespace helper need to agree on."""

    __slots__ = ()

    def _host(self, offset: int) -> ipaddress.IPv4Address:
        return self.cidr.network_address + offset

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self._host(GATEWAY_OFFSET)

    @property
    def dns(self) -> ipaddress.IPv4Address:
        return self._host(DNS_OFFSET)

    @property
    def dhcp_start(self) -> ipaddress.IPv4Address:
        return self._host(DHCP_START_OFFSET)

    @property
    def guest(self) -> ipaddress.IPv4Address:
        return self._host(GUEST_OFFSET)

    @property
    def netmask(self) -> ipaddress.IPv4Address:
        return self.cidr.netmask

    @property
    def prefix6(self) -> ipaddress.IPv6Address:
        if self.cidr6 is not None:
            return self.cidr6.network_address
        return ipaddress.IPv6Address(IPV6_PREFIX)

    @property
    def gateway6(self) -> ipaddress.IPv6Address:
        return self.prefix6 + GATEWAY_OFFSET

    @property
    def dns6(self) -> ipaddress.IPv6Address:
        return self.prefix6 + DNS_OFFSET

    def to_wire(self) -> dict:
        """A JSON-able form, to hand the configuration to a child process."""
        return {
            "cidr": str(self.cidr),
            "mtu": self.mtu,
            "ipv6": self.ipv6,
            "disable_host_loopback": self.disable_host_loopback,
            "disable_dns": self.disable_dns,
            "restricted": self.restricted,
            "mac": self.mac.hex() if self.mac else None,
            "outbound_addr": self.outbound_addr,
            "outbound_addr6": self.outbound_addr6,
            "offload": self.offload,
            "cidr6": str(self.cidr6) if self.cidr6 is not None else None,
        }

    @classmethod
    def from_wire(cls, d: dict) -> "NetConfig":
        d = dict(d)
        d["cidr"] = ipaddress.IPv4Network(d["cidr"])
        d["mac"] = bytes.fromhex(d["mac"]) if d.get("mac") else None
        d["cidr6"] = ipaddress.IPv6Network(d["cidr6"]) if d.get("cidr6") else None
        return cls(**d)
