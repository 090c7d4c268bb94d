"""The bypass handler's audit stream (csrc/bypass.c -> supervisor).

`nsnet run --bypass`'s handler (nsnet/host/bypass.py) writes one record per
connect it decides that the egress policy's audit log must show (the
connects it bypasses, with --audit=all; the connects of host sockets it
refuses) to a SOCK_STREAM socketpair, as struct nsb_audit (csrc/bypass.h):

  int64 time_ms (CLOCK_REALTIME), u8 family (4|6), u8 action (0 allow,
  1 deny), u16 sport, u16 dport, 2 zero bytes, 16 bytes src, 16 bytes dst

native byte order, 48 bytes each, nothing else.  The handler reads what
the command sends it, so the supervisor believes none of it beyond this
shape: parse() refuses a record with an unknown family or action, non-zero
padding, an IPv4 address with bytes past its fourth, destination port 0 or
a time that is not plausible.  Anything else is a protocol error: the
handler is killed and replaced as a crashed one.  The supervisor also caps
what it writes (PolicyControl: the same 500 records a second as the
forwarder).
"""

from __future__ import annotations

import ipaddress
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from .wire import ProtocolError

RECORD = struct.Struct("=qBBHH2s16s16s")
RECORD_SIZE = RECORD.size  # 48
MAX_READ = 1024 * RECORD_SIZE  # one read of the stream: at most the handler's burst
_ZERO12 = bytes(12)
_TIME_MAX_MS = 1 << 45  # year 3084: a time past this is not a clock's


def parse(data: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The complete records at the start of data, as audit-record fields
    (time, proto, src, sport, dst, dport, action), and the bytes of an
    incomplete record left over (the rest of it comes with the next read)."""
    whole = len(data) - len(data) % RECORD_SIZE
    out = []
    for off in range(0, whole, RECORD_SIZE):
        t, fam, action, sport, dport, pad, src, dst = RECORD.unpack_from(data, off)
        where = f"bypass audit record {off // RECORD_SIZE}"
        if fam not in (4, 6):
            raise ProtocolError(f"{where}: family {fam} (4 or 6)")
        if action not in (0, 1):
            raise ProtocolError(f"{where}: action {action} (0 or 1)")
        if pad != b"\0\0":
            raise ProtocolError(f"{where}: padding is not zero")
        if fam == 4 and (src[4:] != _ZERO12 or dst[4:] != _ZERO12):
            raise ProtocolError(f"{where}: an IPv4 address longer than 4 bytes")
        if dport == 0:
            raise ProtocolError(f"{where}: destination port 0")
        if not 0 < t < _TIME_MAX_MS:
            raise ProtocolError(f"{where}: time {t} ms")
        n = 4 if fam == 4 else 16
        out.append({"time": t / 1000.0, "proto": "tcp",
                    "src": str(ipaddress.ip_address(src[:n])), "sport": sport,
                    "dst": str(ipaddress.ip_address(dst[:n])), "dport": dport,
                    "action": "deny" if action else "allow"})
    return out, data[whole:]


def pack(time_ms: int, family: int, action: int, sport: int, dport: int, src: bytes,
         dst: bytes, pad: bytes = b"\0\0") -> bytes:
    """One record as the handler writes it (tests)."""
    return RECORD.pack(time_ms, family, action, sport, dport, pad, src.ljust(16, b"\0"),
                       dst.ljust(16, b"\0"))
