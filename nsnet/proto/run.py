"""`nsnet run`'s handshake between the parent (nsnet) and its child (the
future COMMAND), over a SOCK_SEQPACKET socketpair, one byte per step:

  child  -> parent  U   user namespace made (parent writes the id maps)
  parent -> child   M   maps written: set up the mount namespace
  child  -> parent  N   mount namespace ready (parent starts the supervisor)
  parent -> child   C   the TAP exists: configure the network
  child  -> parent  c   configured (--bypass: + the seccomp listener fd and
                        bypassfilter.FACTS_SIZE bytes of facts)
  parent -> child   G   the network is ready: exec COMMAND
  child  -> parent  E<text>   set-up failed: text says why (then it exits)

The child runs nsnet's code until exec, so it is trusted; still, the
parent takes nothing from it but these exact bytes: an E text is bounded
and decoded with replacement, anything else ends the set-up."""

from __future__ import annotations

USER_NS = b"U"
MAPPED = b"M"
MOUNT_NS = b"N"
CONFIGURE = b"C"
CONFIGURED = b"c"
GO = b"G"
ERROR = b"E"
MAX_ERROR_TEXT = 4096


def error_text(msg: bytes) -> str | None:
    """The text of an E message (bounded, printable), else None."""
    if not msg.startswith(ERROR):
        return None
    text = msg[1:1 + MAX_ERROR_TEXT].decode(errors="replace")
    return "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in text)
