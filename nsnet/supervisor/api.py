"""The JSON API socket, wire-compatible with slirp4netns 1.2.0.

One request per connection: the client writes one JSON object, shuts down
its write side (or not: a complete object is enough), and reads one
compact JSON reply to EOF.  This module turns request bytes into reply
bytes; the supervisor owns the socket and the state behind it.

slirp4netns commands: add_hostfwd, list_hostfwd, remove_hostfwd.
nsnet adds get_info, get_stats, get_policy and set_policy (docs/policy.md).
"""

from __future__ import annotations

import json
import math

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any, Generator, Protocol

from ..forwards import Forward, ForwardError, make_forward
from .tasks import run_sync, wait

MAX_REQUEST = 4096  # a request of this many bytes or more is refused
# ... except set_policy (a policy of thousands of rules), when its
# "execute" comes within the first MAX_REQUEST bytes.
MAX_POLICY_REQUEST = 8 << 20


def request_limit(data: bytes) -> int:
    """The size from which a request (its first bytes given) is refused."""
    if b'"set_policy"' in data[:MAX_REQUEST]:
        return MAX_POLICY_REQUEST
    return MAX_REQUEST


class ApiError(Exception):
    """An error reply; str() is the text after "bad request: "."""


if TYPE_CHECKING:
    # What api.py needs of the supervisor (a type only).
    class ApiBackend(Protocol):
        def api_add_forward(self, fwd: Forward) -> int: ...

        def api_remove_forward(self, fid: int) -> None: ...

        def api_list_forwards(self) -> list[tuple[int, Forward]]: ...

        def api_info(self, interface: bool = False) -> dict[str, Any]: ...

        def api_stats(self) -> dict[str, Any]: ...

        def api_get_policy(self) -> dict[str, Any]: ...

        def api_set_policy(self, args: dict[str, Any]) -> None: ...

        def api_start_capture(self, path: str, max_bytes: int) -> None: ...

        def api_stop_capture(self) -> None: ...

        @property
        def default_guest_addr(self) -> str: ...

        @property
        def default_guest_addr6(self) -> str | None: ...


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def error_reply(desc: str) -> bytes:
    return encode({"error": {"desc": f"bad request: {desc}"}})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")  # slirp4netns's parser refuses them too
    return obj


def _loads(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                      object_pairs_hook=_no_duplicates)


def parse_request(data: bytes) -> dict[str, Any]:
    limit = request_limit(data)
    if len(data) >= limit:
        raise ApiError("too large message")
    try:
        req = _loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError("cannot parse JSON") from None
    if not isinstance(req, dict):
        raise ApiError("json_object() failed")
    if not isinstance(req.get("execute"), str):
        raise ApiError("no execute found")
    if limit > MAX_REQUEST and len(data) >= MAX_REQUEST and req["execute"] != "set_policy":
        raise ApiError("too large message")  # it only mentioned set_policy
    return req


def is_complete(data: bytes) -> bool:
    """True once data holds a whole JSON value (so a client that never
    shuts down its write side still gets an answer)."""
    try:
        _loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return True


def _number(value: Any) -> int | None:
    """A JSON number that is a whole number, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _add_hostfwd(args: dict[str, Any], backend: ApiBackend) -> Generator[Any, Any, Any]:
    proto = args.get("proto")
    # slirp4netns 1.2.0 checks the value of proto before any other field.
    if proto not in ("tcp", "udp"):
        raise ApiError("add_hostfwd: bad arguments.proto")
    # nsnet extra "mode": "splice" is the fast path (docs/fastpath.md).  Both
    # modes connect to the guest's TAP address by default (issue 11 item 3:
    # a loopback-only service stays private); the namespace's loopback only
    # when guest_addr names it.
    mode = args.get("mode")
    mode = "slirp" if mode in (None, "") else mode
    if mode not in ("slirp", "splice"):
        raise ApiError("add_hostfwd: bad arguments.mode")
    if mode == "splice" and proto == "udp":
        raise ApiError("add_hostfwd: bad arguments.mode: splice is for tcp only")
    defaults = {"default_guest": backend.default_guest_addr,
                "default_guest6": backend.default_guest_addr6}
    fields: dict[str, Any] = {}
    for name in ("host_addr", "guest_addr"):
        value = args.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ApiError(f"add_hostfwd: bad arguments.{name}")
        fields[name] = value
    for name in ("host_port", "guest_port"):
        num = _number(args.get(name))
        if num is None:
            raise ApiError(f"add_hostfwd: bad arguments.{name}")
        fields[name] = num
    try:
        fwd = make_forward(proto, mode=mode, **defaults, **fields)
    except ForwardError as e:
        if (str(e) == "guest_addr" and not fields["guest_addr"]
                and ":" in fields["host_addr"] and defaults["default_guest6"] is None):
            # not the guest address's fault: there is no IPv6 in the namespace
            raise ApiError("add_hostfwd: bad arguments.host_addr: an IPv6 host address "
                           "needs IPv6 in the namespace (start nsnet with -6)") from None
        raise ApiError(f"add_hostfwd: bad arguments.{e}") from None
    try:
        fid = yield from wait(backend.api_add_forward(fwd))
    except ForwardError:
        raise ApiError("add_hostfwd: slirp_add_hostfwd failed") from None
    if fwd.host_port == 0:  # nsnet: the kernel picked the port; say which
        port = next((f.host_port for i, f in backend.api_list_forwards() if i == fid), 0)
        return {"return": {"id": fid, "host_port": port}}
    return {"return": {"id": fid}}


def _entry(fid: int, fwd: Forward) -> dict[str, Any]:
    return {
        "id": fid,
        "proto": fwd.proto,
        "host_addr": fwd.host_addr,
        "host_port": fwd.host_port,
        "guest_addr": fwd.guest_addr,
        "guest_port": fwd.guest_port,
        **({"mode": fwd.mode} if fwd.is_splice else {}),
    }


def _list_hostfwd(backend: ApiBackend) -> Any:
    entries = [_entry(fid, fwd) for fid, fwd in backend.api_list_forwards()]
    # slirp4netns 1.2.0 answers {"entries":...}; its man page documents
    # {"return":{"entries":...}}.  Both keys, so clients of either work.
    return {"entries": entries, "return": {"entries": entries}}


def _remove_hostfwd(args: dict[str, Any], backend: ApiBackend) -> Generator[Any, Any, Any]:
    fid = _number(args.get("id"))
    if fid is None:
        raise ApiError("remove_hostfwd: bad arguments.id")
    try:
        yield from wait(backend.api_remove_forward(fid))
    except KeyError:  # no such id (slirp4netns answers the same)
        raise ApiError("remove_hostfwd: bad arguments.id") from None
    except ForwardError:
        raise ApiError("remove_hostfwd: slirp_remove_hostfwd failed") from None
    return {"return": {}}


def handle(data: bytes, backend: ApiBackend) -> bytes:
    """Answer one request; never raises for bad input.  For a backend whose
    methods return values (or settled Futures) at once."""
    return run_sync(handle_task(data, backend))  # type: ignore[no-any-return]


def handle_task(data: bytes, backend: ApiBackend) -> Generator[Any, Any, bytes]:
    """handle() as a task (supervisor/tasks.py): the backend's methods may
    return Futures or tasks (requests to children); the supervisor resumes
    it when they are settled, without blocking its loop."""
    try:
        req = parse_request(data)
        execute = req["execute"]
        args = req.get("arguments")
        if not isinstance(args, dict):
            args = {}
        if execute == "add_hostfwd":
            return encode((yield from _add_hostfwd(args, backend)))
        if execute == "list_hostfwd":
            return encode(_list_hostfwd(backend))
        if execute == "remove_hostfwd":
            return encode((yield from _remove_hostfwd(args, backend)))
        if execute == "get_info":
            # "interface": true adds the TAP's state as the namespace sees it
            info = backend.api_info(interface=args.get("interface") is True)
            return encode({"return": (yield from wait(info))})
        if execute == "get_stats":
            return encode({"return": (yield from wait(backend.api_stats()))})
        if execute == "get_policy":
            return encode({"return": backend.api_get_policy()})
        if execute == "set_policy":
            if not isinstance(req.get("arguments"), dict):
                raise ApiError('set_policy: arguments must be the policy, '
                               '{"egress":"allow"|"deny","rules":[...]}')
            yield from wait(backend.api_set_policy(args))
            return encode({"return": {}})
        if execute == "start_capture":
            from ..options import PCAP_MAX_BYTES

            path = args.get("path")
            if not isinstance(path, str) or not path or "\0" in path:
                raise ApiError("start_capture: bad arguments.path (the capture file's path)")
            max_bytes = args.get("max_bytes", PCAP_MAX_BYTES)
            if type(max_bytes) is not int or not 0 <= max_bytes < 1 << 63:
                raise ApiError("start_capture: bad arguments.max_bytes "
                               "(a non-negative integer; 0: no limit)")
            yield from wait(backend.api_start_capture(path, max_bytes))
            return encode({"return": {}})
        if execute == "stop_capture":
            yield from wait(backend.api_stop_capture())
            return encode({"return": {}})
        raise ApiError("unknown execute")
    except ApiError as e:
        return error_reply(str(e))
