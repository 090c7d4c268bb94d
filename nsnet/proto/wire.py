"""What every internal protocol shares: a bounded JSON decoder and a small
declarative validator.

A message from another process is untrusted: a compromised forwarder or a
connector taken over from inside the namespace can send anything.  decode()
refuses, before json.loads sees them, messages that are too large, not
UTF-8, or nested deeper than a protocol ever needs (a cheap scan: strings
are blanked, then innermost bracket pairs are removed once per allowed
level, all in C); then NaN/Infinity and duplicate keys.  check() holds the
decoded value against a spec of fields, types, lengths and ranges.  Both
raise ProtocolError, never anything else: the receiver treats it as the
sender having crashed.
"""

from __future__ import annotations

import json
import re

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any

MAX_MSG = 65536  # bytes: one SOCK_SEQPACKET message
MAX_DEPTH = 6    # the deepest message of any protocol is 3 levels


class ProtocolError(ValueError):
    """A message that breaks its protocol; str() says what and where."""


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_PAIR = re.compile(rb"\[\]|\{\}")


def nesting_ok(data: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """True if the JSON text nests arrays/objects at most max_depth deep
    (or is unbalanced in a way json.loads will refuse anyway)."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    for _ in range(max_depth):
        if not brackets:
            return True
        brackets = _PAIR.sub(b"", brackets)
    return not brackets


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def decode(data: bytes, max_bytes: int = MAX_MSG, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one JSON message within the bounds; ProtocolError if not."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes (at most {max_bytes})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("message is not UTF-8") from None
    if not nesting_ok(data, max_depth):
        raise ProtocolError(f"message nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"message is not JSON ({e})") from None


def encode(msg: Any) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


# -- specs ---------------------------------------------------------------------
# A spec is a callable spec(value, where) that returns the value or raises
# ProtocolError naming `where` (e.g. "ready.failed_forwards[3]").


class Int:
    def __init__(self, lo: int = 0, hi: int = (1 << 63) - 1) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, v: Any, where: str) -> int:
        if type(v) is not int:
            raise ProtocolError(f"{where}: {_kind(v)}, not an integer")
        if not self.lo <= v <= self.hi:
            raise ProtocolError(f"{where}: {v} out of range [{self.lo}, {self.hi}]")
        return v


class Num:
    """A finite JSON number (an integer too, not a boolean)."""

    def __call__(self, v: Any, where: str) -> float:
        if type(v) not in (int, float) or v != v or v in (float("inf"), float("-inf")):
            raise ProtocolError(f"{where}: {_kind(v)}, not a number")
        return v  # type: ignore[no-any-return]


class Str:
    def __init__(self, max_len: int = 1024, choices: tuple[str, ...] | None = None) -> None:
        self.max_len, self.choices = max_len, choices

    def __call__(self, v: Any, where: str) -> str:
        if type(v) is not str:
            raise ProtocolError(f"{where}: {_kind(v)}, not a string")
        if len(v) > self.max_len:
            raise ProtocolError(f"{where}: string of {len(v)} characters (at most {self.max_len})")
        if self.choices is not None and v not in self.choices:
            raise ProtocolError(f"{where}: {v[:40]!r} is not one of {', '.join(self.choices)}")
        return v


class Bool:
    def __call__(self, v: Any, where: str) -> bool:
        if type(v) is not bool:
            raise ProtocolError(f"{where}: {_kind(v)}, not a boolean")
        return v


class Null:
    def __call__(self, v: Any, where: str) -> None:
        if v is not None:
            raise ProtocolError(f"{where}: {_kind(v)}, not null")


class Either:
    """The first of the specs that accepts the value."""

    def __init__(self, *specs: Any) -> None:
        self.specs = specs

    def __call__(self, v: Any, where: str) -> Any:
        err: ProtocolError | None = None
        for spec in self.specs:
            try:
                return spec(v, where)
            except ProtocolError as e:
                err = err or e
        assert err is not None
        raise err


class List:
    def __init__(self, item: Any, max_len: int) -> None:
        self.item, self.max_len = item, max_len

    def __call__(self, v: Any, where: str) -> list[Any]:
        if type(v) is not list:
            raise ProtocolError(f"{where}: {_kind(v)}, not a list")
        if len(v) > self.max_len:
            raise ProtocolError(f"{where}: {len(v)} items (at most {self.max_len})")
        return [self.item(x, f"{where}[{i}]") for i, x in enumerate(v)]


class Map:
    """An object with free keys (bounded strings) and values of one spec."""

    def __init__(self, value: Any, max_len: int, key_len: int = 64) -> None:
        self.value, self.max_len, self.key = value, max_len, Str(key_len)

    def __call__(self, v: Any, where: str) -> dict[str, Any]:
        if type(v) is not dict:
            raise ProtocolError(f"{where}: {_kind(v)}, not an object")
        if len(v) > self.max_len:
            raise ProtocolError(f"{where}: {len(v)} keys (at most {self.max_len})")
        return {self.key(k, f"{where} key"): self.value(x, f"{where}.{k}") for k, x in v.items()}


class Obj:
    """An object with known fields: required ones, optional ones (name ->
    spec), nothing else."""

    def __init__(self, required: dict[str, Any], optional: dict[str, Any] | None = None) -> None:
        self.required = required
        self.optional = optional or {}

    def __call__(self, v: Any, where: str) -> dict[str, Any]:
        if type(v) is not dict:
            raise ProtocolError(f"{where}: {_kind(v)}, not an object")
        for name in self.required:
            if name not in v:
                raise ProtocolError(f"{where}: no field {name!r}")
        out = {}
        for name, x in v.items():
            spec = self.required.get(name) or self.optional.get(name)
            if spec is None:
                raise ProtocolError(f"{where}: unexpected field {name[:40]!r}")
            out[name] = spec(x, f"{where}.{name}")
        return out


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def tagged(msg: Any, key: str, specs: dict[str, Any], what: str) -> dict[str, Any]:
    """Check a message whose kind is named by msg[key] (an event, an op)
    against the spec of that kind."""
    kind = msg.get(key) if type(msg) is dict else None
    spec = specs.get(kind) if type(kind) is str else None
    if spec is None:
        raise ProtocolError(f"unknown {what} {str(kind)[:40]!r}")
    return spec(msg, f"{what} {kind}")  # type: ignore[no-any-return]


def parse(data: bytes, spec: Any, where: str = "message", **bounds: int) -> Any:
    """decode() then check against spec."""
    return spec(decode(data, **bounds), where)


# Fields several protocols share.
SEQ = Int(1)
ERROR = Str(1024)
PID = Int(1, (1 << 22))
PORT = Int(0, 65535)
ADDR = Str(64)
FORWARD = Obj({"proto": Str(8, ("tcp", "udp")), "host_addr": ADDR, "host_port": PORT,
               "guest_addr": ADDR, "guest_port": PORT},
              {"mode": Str(16, ("slirp", "splice"))})
