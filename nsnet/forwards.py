"""Port forwards: the spec of one forward, and the table that owns them.

The supervisor keeps the canonical table, so the forwards outlive any one
forwarder process: a restarted forwarder gets every entry back, each with
its id.  Ids start at 1 and are never reused.
"""

from __future__ import annotations

import ipaddress
from collections import namedtuple


class ForwardError(ValueError):
    """A forward that cannot be added or removed; str() names the field."""


class Forward(namedtuple("Forward", ("proto", "host_addr", "host_port", "guest_addr",
                                     "guest_port", "mode"), defaults=("slirp",))):
    """One forward: proto "tcp" or "udp"; mode (an nsnet extra) "slirp",
    libslirp's forward and the default, or "splice", the fast path
    (nsnet/supervisor/fastpath.py; tcp only)."""

    __slots__ = ()

    @property
    def is_udp(self) -> bool:
        return self.proto == "udp"

    @property
    def is_splice(self) -> bool:
        return self.mode == "splice"

    def key(self) -> tuple[str, str, int]:
        return (self.proto, self.host_addr, self.host_port)

    def to_dict(self) -> dict:
        return self._asdict()


def make_forward(
    proto: str,
    host_port: int,
    guest_port: int,
    host_addr: str = "",
    guest_addr: str = "",
    *,
    default_guest: str,
    default_guest6: str | None = None,
    mode: str = "slirp",
) -> Forward:
    """Validate and normalise a forward; empty addresses take the defaults
    (host 0.0.0.0; guest the namespace's IPv4 address, or for an IPv6 host
    address its IPv6 one). Raises ForwardError with the name of the
    offending field. libslirp cannot forward between address families, so
    host and guest addresses must be of the same one."""
    if proto not in ("tcp", "udp"):
        raise ForwardError("proto")
    host_addr = host_addr or "0.0.0.0"
    try:
        h = ipaddress.ip_address(host_addr)
    except ValueError:
        raise ForwardError("host_addr") from None
    if not (_is_port(host_port) or host_port == 0 and not isinstance(host_port, bool)):
        raise ForwardError("host_port")  # 0: the kernel picks (pick_host_port)
    if not guest_addr:
        guest_addr = default_guest if h.version == 4 else (default_guest6 or "")
    try:
        g = ipaddress.ip_address(guest_addr)
    except ValueError:
        raise ForwardError("guest_addr") from None
    if g.version != h.version:
        raise ForwardError("guest_addr")
    if not _is_port(guest_port):
        raise ForwardError("guest_port")
    return Forward(proto, str(h), int(host_port), str(g), int(guest_port), mode)


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def pick_host_port(fwd: Forward) -> Forward:
    """fwd with host port 0 replaced by a port the kernel picks: bind port 0
    on the host address, read the port, release it (the forwarder binds it
    right after; api_add_forward tries again if another process took it)."""
    import socket

    family = socket.AF_INET6 if ":" in fwd.host_addr else socket.AF_INET
    kind = socket.SOCK_DGRAM if fwd.is_udp else socket.SOCK_STREAM
    with socket.socket(family, kind) as s:
        s.bind((fwd.host_addr, 0))
        port = s.getsockname()[1]
    return fwd._replace(host_port=port)


class ForwardTable:
    def __init__(self) -> None:
        self._entries: dict[int, Forward] = {}
        self._next_id = 1

    def find(self, fwd: Forward) -> int | None:
        for fid, f in self._entries.items():
            if f.key() == fwd.key():
                return fid
        return None

    def add(self, fwd: Forward) -> int:
        fid = self._next_id
        self._next_id += 1
        self._entries[fid] = fwd
        return fid

    def get(self, fid: int) -> Forward | None:
        return self._entries.get(fid)

    def remove(self, fid: int) -> Forward:
        return self._entries.pop(fid)

    def items(self) -> list[tuple[int, Forward]]:
        return sorted(self._entries.items())

    def libslirp_items(self) -> list[tuple[int, Forward]]:
        """The forwards the libslirp forwarder serves (not the fast path's)."""
        return [(fid, f) for fid, f in self.items() if not f.is_splice]

    def __len__(self) -> int:
        return len(self._entries)


def publish_forward(host_port: int, guest_port: int, proto: str = "tcp",
                    host_addr: str = "", guest_addr: str = "", *,
                    default_guest: str, default_guest6: str | None = None) -> Forward:
    """The Forward to publish a port with: TCP through the fast path
    (mode "splice"), UDP through libslirp (the fast path is TCP only).
    Either way the guest address defaults to default_guest /
    default_guest6, the namespace's addresses on the TAP, as libslirp's
    forwards do: a service bound only to the namespace's loopback stays
    private unless guest_addr names 127.0.0.1 / ::1.  Raises ForwardError naming the bad field.  Put the result
    in supervisor.Options.initial_forwards (published before ready; a port
    that cannot be bound fails the set-up), or pass it to
    Supervisor.api_add_forward once running."""
    if proto == "tcp":
        return make_forward(proto, host_port, guest_port, host_addr, guest_addr,
                            default_guest=default_guest, default_guest6=default_guest6,
                            mode="splice")
    return make_forward(proto, host_port, guest_port, host_addr, guest_addr,
                        default_guest=default_guest, default_guest6=default_guest6)

