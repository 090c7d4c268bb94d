"""The OCI runtime's seccomp listener message (nsnet --bypass-listener).

An OCI runtime (runc, crun) whose container's seccomp profile has
SCMP_ACT_NOTIFY rules and `linux.seccomp.listenerPath` connects to that
unix socket (SOCK_STREAM) once per container and sends the "container
process state" (runtime-spec config-linux.md, "The Container Process
State") as JSON, with the listener fd(s) in SCM_RIGHTS on the first
sendmsg; the names in "fds" give the fds' order:

    {"ociVersion": "1.0.2-dev", "fds": ["seccompFd"], "pid": 4422,
     "metadata": "opaque", "state": {"ociVersion": ..., "id": "c1",
     "status": "creating", "pid": 4422, "bundle": "/b", "annotations": {}}}

The runtime may split the JSON over several sendmsg calls and need not
close the connection when it is done (runc 1.1 keeps it open until it
exits): the message ends when the bytes so far are one complete JSON value.

The sender is only checked by its credentials (supervisor/ocilistener.py),
so everything here is bounded and checked as untrusted: the size, the
schema (these fields and no others), exactly one fd and it named
"seccompFd".
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from .wire import Int, Map, Obj, ProtocolError, Str, decode, List

MAX_STATE = 65536  # bytes: a state with a few KiB of annotations fits
MAX_ANNOTATIONS = 256
MAX_FDS = 4  # received at most; anything but exactly one is refused
PID = Int(1, (1 << 22))
VERSION = Str(64)

STATE = Obj({"ociVersion": VERSION, "id": Str(1024),
             "status": Str(16, ("creating", "created", "running")),
             "bundle": Str(4096)},
            {"pid": PID, "annotations": Map(Str(4096), MAX_ANNOTATIONS, key_len=1024)})
PROCESS_STATE = Obj({"ociVersion": VERSION, "fds": List(Str(64), MAX_FDS), "pid": PID,
                     "state": STATE},
                    {"metadata": Str(4096)})


def decode_state(data: bytes) -> Any:
    """The JSON value of data (bounded); ProtocolError if it is not one
    whole JSON value (yet: the runtime may send more)."""
    if len(data) > MAX_STATE:
        raise ProtocolError(f"container process state of more than {MAX_STATE} bytes")
    return decode(data, max_bytes=MAX_STATE)


def check_state(value: Any, nfds: int) -> dict[str, Any]:
    """The checked container process state; ProtocolError saying what is
    wrong.  nfds: how many fds came with it."""
    msg = PROCESS_STATE(value, "container process state")
    if msg["fds"] != ["seccompFd"]:
        raise ProtocolError(f"container process state: fds is {msg['fds'][:MAX_FDS]!r} "
                            "(expected [\"seccompFd\"])")
    if nfds != 1:
        raise ProtocolError(f"container process state with {nfds} fds (expected 1: seccompFd)")
    if msg["state"].get("pid", msg["pid"]) != msg["pid"]:
        raise ProtocolError("container process state: pid and state.pid differ")
    return msg


def parse_state(data: bytes, nfds: int) -> dict[str, Any]:
    return check_state(decode_state(data), nfds)
