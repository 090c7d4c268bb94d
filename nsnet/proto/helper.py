"""The namespace helpers' protocol (nsnet/ns/helper.py -> supervisor).

A helper runs inside the target's namespaces, where its root can take it
over: its one message is checked before the supervisor uses any of it.

TAP helper:       {"ifindex": int, "mac": "12 hex digits" | null} + the TAP fd
Interface helper (get_info "interface": true), no fd:
                  {"ifname", "ifindex", "mtu", "mac", "operstate", "up",
                   "addresses": [str], "routes": [{"dst", "gateway", "family"}]}
               or {"error": str}
Netfacts helper (--bypass-listener), no fd:
                  {"cookie": SO_NETNS_COOKIE, "sndbuf": int, "rcvbuf": int}
               or {"error": str}
"""

from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from .wire import ERROR, Bool, Either, Int, List, Null, Obj, ProtocolError, Str, decode

MAX_ADDRESSES = 256
MAX_ROUTES = 256
_MAC_HEX = re.compile(r"[0-9a-f]{12}")

TAP_RESULT = Obj({"ifindex": Int(0, (1 << 31) - 1), "mac": Either(Str(12), Null())})
OPT_STR = Either(Str(64), Null())
OPT_INT = Either(Int(0, (1 << 31) - 1), Null())
INTERFACE = Obj({"ifname": Str(15), "ifindex": Int(0, (1 << 31) - 1), "mtu": OPT_INT,
                 "mac": OPT_STR, "operstate": OPT_STR, "up": Bool(),
                 "addresses": List(Str(64), MAX_ADDRESSES),
                 "routes": List(Obj({"dst": Str(64), "gateway": OPT_STR,
                                     "family": Str(8, ("inet", "inet6"))}), MAX_ROUTES)})
INTERFACE_ERROR = Obj({"error": ERROR})
NETFACTS = Obj({"cookie": Int(1, (1 << 64) - 1), "sndbuf": Int(1, (1 << 31) - 1),
                "rcvbuf": Int(1, (1 << 31) - 1)})


def parse_tap_result(data: bytes, nfds: int) -> tuple[int, bytes | None]:
    """(ifindex, MAC) of the TAP helper's message, which must carry one fd."""
    msg = TAP_RESULT(decode(data), "TAP helper message")
    if nfds != 1:
        raise ProtocolError(f"TAP helper message with {nfds} fds (expected 1)")
    mac = msg["mac"]
    if mac is not None and not _MAC_HEX.fullmatch(mac):
        raise ProtocolError("TAP helper message: mac is not 12 hex digits")
    return msg["ifindex"], bytes.fromhex(mac) if mac else None


def _answer(data: bytes, nfds: int, who: str, schema: Obj) -> dict[str, Any]:
    """A helper's one answer with no fd: `schema`, or {"error": str}."""
    msg = decode(data)
    if nfds:
        raise ProtocolError(f"{who} message with {nfds} fds (expected none)")
    if type(msg) is dict and "error" in msg:
        return INTERFACE_ERROR(msg, f"{who} error")
    return schema(msg, f"{who} message")


def parse_interface(data: bytes, nfds: int) -> dict[str, Any]:
    """The interface helper's answer: the interface, or {"error": str}."""
    return _answer(data, nfds, "interface helper", INTERFACE)


def parse_netfacts(data: bytes, nfds: int) -> dict[str, Any]:
    """The netfacts helper's answer: the facts, or {"error": str}."""
    return _answer(data, nfds, "netfacts helper", NETFACTS)
