"""Published-port specs: ``[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]``.

The syntax of ``nsnet run --publish`` and of the Python API's
``add_forward("...")``.  An IPv6 host address goes in brackets:
``[::1]:8080:80``.  Without HOST_IP the port is published on every host
address (0.0.0.0), as ``docker run -p`` and ``pasta -t`` do.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class PortSpecError(ValueError):
    """A spec that cannot be parsed; str() says what is wrong with it."""


@dataclass(frozen=True)
class PortSpec:
    proto: str  # "tcp" or "udp"
    host_addr: str  # "" means every address (0.0.0.0)
    host_port: int
    guest_port: int
    guest_addr: str = ""  # "" means the namespace's own address

    def __str__(self) -> str:
        host = self.host_addr
        if host and ":" in host:
            host = f"[{host}]"
        prefix = f"{host}:" if host else ""
        hport = self.host_port or ""  # 0: the kernel picks (parse_many's "::")
        return f"{prefix}{hport}:{self.guest_port}/{self.proto}"


def check_port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise PortSpecError(f"{what} must be a port number from 1 to 65535, not {value!r}")
    return value


def _port(text: str, what: str, spec: str) -> int:
    if not text.isdigit():
        raise PortSpecError(f"{spec!r}: {what} {text!r} is not a port number")
    try:
        return check_port(int(text), what)
    except PortSpecError:
        raise PortSpecError(f"{spec!r}: {what} must be from 1 to 65535, not {text}") from None


def check_addr(text: str, what: str) -> str:
    """A normalised IP address (either family); "" stays ""."""
    if text == "":
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise PortSpecError(f"{what} {text!r} is not an IPv4 or IPv6 address") from None


def parse(spec: str) -> PortSpec:
    """Parse ``[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]``: one forward, both
    ports given (parse_many takes ranges and kernel-chosen host ports)."""
    specs = parse_many(spec) if not isinstance(spec, str) or ":" in spec else []
    if len(specs) != 1 or specs[0].host_port == 0:
        raise PortSpecError(f"{spec!r}: expected [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp] "
                            "(an IPv6 host address goes in brackets)")
    return specs[0]


def port_in_use(proto: str, host_addr: str, host_port: int) -> bool:
    """True if binding host_addr:host_port (in this network namespace) fails
    with EADDRINUSE: the reason libslirp refused a forward, most of the time."""
    import errno
    import socket

    addr = host_addr or "0.0.0.0"
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(family, kind) as s:
        if proto != "udp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libslirp does
        try:
            s.bind((addr, host_port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def _port_range(text: str, what: str, spec: str, allow_zero: bool = False) -> list[int]:
    """"8080" or "8000-8002" -> the ports; "" (allow_zero) -> [0]."""
    if text == "" and allow_zero:
        return [0]
    lo, dash, hi = text.partition("-")
    if not lo:
        return [_port(text, what, spec)]  # refused, with the whole text
    first = _port(lo, what, spec)
    if not dash:
        return [first]
    last = _port(hi, what, spec)
    if last < first:
        raise PortSpecError(f"{spec!r}: {what} range {text} runs backwards")
    return list(range(first, last + 1))


def parse_many(spec: str) -> list[PortSpec]:
    """The -p syntax as Docker and Podman users type it, one spec or more:

        [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]   as parse()
        8000-8002:8000-8002                         a range (same lengths)
        127.0.0.1::80, [::1]::80, :80               the kernel picks the host port
        8080, 8000-8002                             a bare guest port: the kernel
                                                    picks the host port (docker -p 80)

    Host port 0 means "the kernel picks" (add_hostfwd replies with it)."""
    if not isinstance(spec, str):
        raise PortSpecError(f"a port spec is a string, not {type(spec).__name__}")
    body, slash, proto = spec.partition("/")
    proto = proto.lower() if slash else "tcp"
    if proto not in ("tcp", "udp"):
        raise PortSpecError(f"{spec!r}: protocol must be tcp or udp, not {proto!r}")
    host_addr = ""
    if body.startswith("["):
        end = body.find("]")
        if end < 0 or body[end + 1:end + 2] != ":":
            raise PortSpecError(f"{spec!r}: expected [IPv6]:HOST_PORT:GUEST_PORT")
        host_addr = body[1:end]
        if ":" not in host_addr:
            raise PortSpecError(f"{spec!r}: brackets are for IPv6 addresses only")
        parts = body[end + 2:].split(":")
        if len(parts) != 2:
            raise PortSpecError(f"{spec!r}: expected [IPv6]:HOST_PORT:GUEST_PORT")
    else:
        parts = body.split(":")
        if len(parts) == 3:
            host_addr, parts = parts[0], parts[1:]
            if not host_addr:
                raise PortSpecError(f"{spec!r}: empty host address")
        elif len(parts) == 1:
            parts = ["", parts[0]]
        elif len(parts) != 2:
            raise PortSpecError(f"{spec!r}: expected [HOST_IP:][HOST_PORT]:GUEST_PORT"
                                "[/tcp|/udp] (an IPv6 host address goes in brackets)")
    try:
        addr = check_addr(host_addr, "host address")
    except PortSpecError as e:
        raise PortSpecError(f"{spec!r}: {e}") from None
    guests = _port_range(parts[1], "guest port", spec)
    hosts = _port_range(parts[0], "host port", spec, allow_zero=True)
    if hosts == [0]:
        hosts = [0] * len(guests)
    if len(hosts) != len(guests):
        raise PortSpecError(f"{spec!r}: the host and guest port ranges must have the same "
                            f"length ({len(hosts)} and {len(guests)})")
    if len(guests) > 1024:
        raise PortSpecError(f"{spec!r}: at most 1024 ports in a range")
    return [PortSpec(proto, addr, h, g) for h, g in zip(hosts, guests)]
