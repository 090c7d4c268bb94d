"""The forwarder's control protocol (supervisor <-> nsnet/host/forwarder.py).

One JSON object per SOCK_SEQPACKET message (wire.py bounds them).

Supervisor -> forwarder (requests; the forwarder answers each in order):
  {"op": "tap"}                       + the TAP fd (first forwarder, once)
  {"op": "add"|"remove", "forward": FORWARD, "seq": N}
  {"op": "stats", "seq": N}
  {"op": "ping", "seq": N}
  {"op": "pcap", "max_bytes": B, "seq": N}   + the capture file's fd (start_capture)
  {"op": "pcap_stop", "seq": N}                         (stop_capture)
  {"op": "policy_part", "index": I, "data": str, "seq": N}   (the egress
  {"op": "policy", "last_part": str, "parts": n,               policy,
   "keep_established": bool, "audit_all": bool, "seq": N}     in parts)

Forwarder -> supervisor:
  replies  {"reply_to": N, "ok": true|false, "error"?: str,
            "stats"?: {name: int}, "policy"?: {name: int}, "connections"?: str,
            "connections_total"?: int}
  events   {"event": "ready", "pid": P, "failed_forwards": [id, ...]}
           {"event": "failed", "error": str}      (it exits next)
           {"event": "tap_error", "error": str}   (it exits 3 next)
           {"event": "poll_error"}                (it exits 4 next)
           {"event": "audit", "records": [RECORD, ...]}   (egress policy: a
                                  stream, handled as it comes, not counted)

The supervisor believes none of it beyond its shape: a reply must answer a
request it is waiting for, "ready" comes once, at most MAX_EVENTS events in
a forwarder's life, failed_forwards names forwards it was given, and a
tap_error is checked against the supervisor's own TAP fd.  Anything else is
a protocol error: the forwarder is killed and replaced as a crashed one.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from .wire import (ADDR, ERROR, FORWARD, MAX_MSG, PID, PORT, SEQ, Bool, Either, Int, List, Map,
                   Null, Num, Obj, ProtocolError, Str)
from .wire import decode, tagged

MAX_EVENTS = 8          # a forwarder says ready, failed, tap_error, poll_error: once each
MAX_FORWARDS = 65536    # failed_forwards entries
MAX_STATS = 64          # counters in a stats reply
CONNECTIONS_TEXT = MAX_MSG  # slirp_connection_info()'s table, already capped by the forwarder

MAX_AUDIT = 256         # records in one audit event (the forwarder sends 128 at most)
POLICY_TEXT = MAX_MSG   # a part of a policy's JSON text

AUDIT_RECORD = Obj({"time": Num(), "proto": Str(8, ("tcp", "udp", "icmp")), "src": ADDR,
                    "dst": ADDR, "action": Str(8, ("allow", "deny")),
                    "rule": Either(Int(0), Null())},
                   {"sport": PORT, "dport": PORT, "name": Str(255), "rule_text": Str(4096),
                    "dns_refused": Bool()})

EVENTS = {
    "audit": Obj({"event": Str(), "records": List(AUDIT_RECORD, MAX_AUDIT)}),
    "ready": Obj({"event": Str(), "pid": PID, "failed_forwards": List(Int(1), MAX_FORWARDS)}),
    "failed": Obj({"event": Str(), "error": ERROR}),
    "tap_error": Obj({"event": Str(), "error": ERROR}),
    "poll_error": Obj({"event": Str()}),
}

REPLY = Obj({"reply_to": SEQ, "ok": Bool()},
            {"error": ERROR, "stats": Map(Int(0), MAX_STATS), "policy": Map(Int(0), MAX_STATS),
             "connections": Str(CONNECTIONS_TEXT), "connections_total": Int(0)})

REQUESTS = {
    "add": Obj({"op": Str(), "forward": FORWARD, "seq": SEQ}),
    "remove": Obj({"op": Str(), "forward": FORWARD, "seq": SEQ}),
    "stats": Obj({"op": Str(), "seq": SEQ}),
    "ping": Obj({"op": Str(), "seq": SEQ}),
    "pcap": Obj({"op": Str(), "max_bytes": Int(0), "seq": SEQ}),
    "pcap_stop": Obj({"op": Str(), "seq": SEQ}),
    "policy_part": Obj({"op": Str(), "index": Int(0), "data": Str(POLICY_TEXT), "seq": SEQ}),
    "policy": Obj({"op": Str(), "last_part": Str(POLICY_TEXT), "parts": Int(1),
                   "keep_established": Bool(), "audit_all": Bool(), "seq": SEQ}),
}
TAP = Obj({"op": Str(8, ("tap",))})


def parse_message(data: bytes) -> dict[str, Any]:
    """A message from the forwarder: an event or a reply, shape-checked."""
    msg = decode(data)
    if type(msg) is dict and "event" in msg:
        return tagged(msg, "event", EVENTS, "event")
    return REPLY(msg, "reply")  # type: ignore[no-any-return]


def check_reply(reply: dict[str, Any], op: str) -> dict[str, Any]:
    """The fields a successful reply to `op` must carry."""
    if reply["ok"] and op == "stats":
        for name in ("stats", "connections", "connections_total"):
            if name not in reply:
                raise ProtocolError(f"reply to stats: no field {name!r}")
    if not reply["ok"] and "error" not in reply:
        raise ProtocolError(f"reply to {op}: ok false without an error")
    return reply


def parse_request(data: bytes) -> dict[str, Any]:
    """A request from the supervisor (the forwarder's side)."""
    return tagged(decode(data), "op", REQUESTS, "request")


def parse_tap(data: bytes, nfds: int) -> None:
    """The first forwarder's {"op": "tap"} with exactly one fd."""
    TAP(decode(data), "tap message")
    if nfds != 1:
        raise ProtocolError(f"tap message with {nfds} fds (expected 1)")
