"""The fast path's internal protocol (supervisor <-> relay <-> connector):
JSON messages over SOCK_SEQPACKET socketpairs (wire.py bounds them), fds
over SCM_RIGHTS.

Supervisor -> relay (requests, answered in order):
  {"op": "add"|"remove", "forward": FORWARD, "seq": N}
  {"op": "connector", "seq": N}          + the socket to a new connector
  {"op": "stats", "seq": N}
Relay -> supervisor: {"reply_to": N, "ok": bool, "error"?: str, "stats"?: {name: int}}

Connector -> supervisor (once, at start): {"event": "ready", "pid": P}
                                        or {"event": "failed", "error": str}
Relay -> connector:  {"tag": T, "addr": str, "port": int}
Connector -> relay:  {"tag": T, "ok": true} + the connected fd
                   | {"tag": T, "ok": false, "error": str, "errno": E}
                     (E: connect's errno, 1..4095; the relay logs it at debug
                     level by its number, never the connector's text)

The connector lives in the target's namespaces: whatever it says is
checked (shape, a tag the relay is waiting for, one fd exactly with ok);
a protocol error drops it (the supervisor starts a new one)."""

from __future__ import annotations

import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from .wire import (ADDR, ERROR, FORWARD, PID, PORT, SEQ, Bool, Int, Map, Obj,
                   ProtocolError, Str, decode, encode, tagged)

NO_SUCH_FORWARD = "no such forward"  # the relay's answer to a remove it has no listener for
TAG = Int(1)
MAX_STATS = 32

RELAY_REQUESTS = {
    "add": Obj({"op": Str(), "forward": FORWARD, "seq": SEQ}),
    "remove": Obj({"op": Str(), "forward": FORWARD, "seq": SEQ}),
    "connector": Obj({"op": Str(), "seq": SEQ}),
    "stats": Obj({"op": Str(), "seq": SEQ}),
}
RELAY_REPLY = Obj({"reply_to": SEQ, "ok": Bool()}, {"error": ERROR, "stats": Map(Int(0), MAX_STATS)})
CONNECTOR_START = {
    "ready": Obj({"event": Str(), "pid": PID}),
    "failed": Obj({"event": Str(), "error": ERROR}),
}
CONNECT_REQUEST = Obj({"tag": TAG, "addr": ADDR, "port": PORT})
ERRNO = Int(1, 4095)
CONNECT_REPLY = Obj({"tag": TAG, "ok": Bool()}, {"error": ERROR, "errno": ERRNO})


def send_json(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(encode(msg))


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def parse_relay_request(data: bytes, nfds: int) -> dict[str, Any]:
    """A request from the supervisor (the relay's side)."""
    msg = tagged(decode(data), "op", RELAY_REQUESTS, "request")
    op = msg["op"]
    want = 1 if op == "connector" else 0
    if nfds != want:
        raise ProtocolError(f"request {op} with {nfds} fds (expected {want})")
    return msg


def parse_relay_reply(data: bytes, op: str) -> dict[str, Any]:
    """The relay's reply to `op` (the supervisor's side)."""
    reply = RELAY_REPLY(decode(data), f"reply to {op}")
    if reply["ok"] and op == "stats" and "stats" not in reply:
        raise ProtocolError("reply to stats: no field 'stats'")
    if not reply["ok"] and "error" not in reply:
        raise ProtocolError(f"reply to {op}: ok false without an error")
    return reply


def parse_connector_start(data: bytes) -> dict[str, Any]:
    """The connector's first message (the supervisor's side)."""
    return tagged(decode(data), "event", CONNECTOR_START, "connector event")


def parse_connect_request(data: bytes) -> dict[str, Any]:
    """The relay's request (the connector's side)."""
    return CONNECT_REQUEST(decode(data), "connect request")


def parse_connect_reply(data: bytes, nfds: int, pending: Any) -> dict[str, Any]:
    """The connector's answer (the relay's side): a tag the relay waits
    for (pending: a container of tags), and one fd exactly when ok."""
    reply = CONNECT_REPLY(decode(data), "connector reply")
    if reply["tag"] not in pending:
        raise ProtocolError(f"connector reply for tag {reply['tag']}, which is not pending")
    want = 1 if reply["ok"] else 0
    if nfds != want:
        raise ProtocolError(f"connector reply with {nfds} fds (expected {want})")
    return reply
