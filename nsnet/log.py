"""Logging to stderr, one line per message, as text or JSON lines.

Not the logging module: nsnet's needs are one stream, four levels and two
formats, and importing logging costs ~3.5 ms (6 with what it pulls in) on
the path to ready.

Text:  "nsnet: MESSAGE", or "nsnet: warning: MESSAGE" from warning up.
JSON:  {"time":...,"level":...,"pid":...,"msg":...} plus the `fields` of
       extra={"fields": {...}}, the same keyword the logging module takes.
"""

from __future__ import annotations

import json
import os
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
_RANK = {name: i for i, name in enumerate(LEVELS)}

_level = _RANK["info"]
_json = False


def setup(level: str = "info", fmt: str = "text") -> None:
    """Set the level and the format for every logger of this process (and
    of the children it forks afterwards)."""
    global _level, _json
    _level = _RANK[level.lower()]
    _json = fmt == "json"


class Logger:
    """The subset of logging.Logger nsnet uses."""

    def __init__(self, name: str) -> None:
        self.name = name

    def isEnabledFor(self, level: str) -> bool:  # noqa: N802 (logging's name)
        return _RANK[level] >= _level

    def _emit(self, level: str, msg: str, exc_info: bool, extra: dict | None) -> None:
        if _RANK[level] < _level:
            return
        if exc_info and sys.exc_info()[0] is not None:
            import traceback

            msg = f"{msg}\n{traceback.format_exc().rstrip()}"
        if _json:
            _write(_json_line(level, msg, (extra or {}).get("fields")))
        elif _RANK[level] >= _RANK["warning"]:
            _write(f"nsnet: {level}: {msg}")
        else:
            _write(f"nsnet: {msg}")

    def debug(self, msg: str, *, exc_info: bool = False, extra: dict | None = None) -> None:
        self._emit("debug", msg, exc_info, extra)

    def info(self, msg: str, *, exc_info: bool = False, extra: dict | None = None) -> None:
        self._emit("info", msg, exc_info, extra)

    def warning(self, msg: str, *, exc_info: bool = False, extra: dict | None = None) -> None:
        self._emit("warning", msg, exc_info, extra)

    def error(self, msg: str, *, exc_info: bool = False, extra: dict | None = None) -> None:
        self._emit("error", msg, exc_info, extra)


class Throttle:
    """At most `burst` lines per `window` seconds, then a count: for a line
    per event someone outside nsnet can cause (a refused API client or
    listener peer, a connection the guest refused), which must not flood
    the log.  The caller passes the time (its own clock), so that:

        held, secs = t.roll(now)     # a window ended: say `held` lines were left out
        if t.admit(): log the line   # else it is counted for the next roll
    """

    def __init__(self, burst: int, window: float) -> None:
        self.burst = burst
        self.window = window
        self.start = float("-inf")  # the first event opens the first window
        self.logged = 0
        self.held = 0

    def roll(self, now: float) -> tuple[int, float]:
        """When the window has run out, open the next at `now`; returns the
        lines the ended one held back and its length in seconds ((0, 0.0)
        while it runs)."""
        if now - self.start < self.window:
            return 0, 0.0
        held, secs = self.held, now - self.start
        self.start, self.logged, self.held = now, 0, 0
        return held, secs

    def admit(self) -> bool:
        """One more line in this window (True), or one more held back."""
        if self.logged < self.burst:
            self.logged += 1
            return True
        self.held += 1
        return False


def get(name: str = "nsnet") -> Logger:
    return Logger(name if name.startswith("nsnet") else f"nsnet.{name}")


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0


def wants_json(argv: list[str]) -> bool:
    """Whether a command line asks for --log-format=json, read before it is
    parsed (so that an error in parsing it is a JSON line too)."""
    for i, word in enumerate(argv):
        if word == "--":
            break
        if word in ("--log-format=json", "--log-f=json", "--log-fo=json") or (
                word.startswith("--log-f") and "--log-format".startswith(word)
                and argv[i + 1:i + 2] == ["json"]):
            return True
    return False


def fail(prog: str, msg: str, fields: dict | None = None) -> None:
    """A front end's last words: "PROG: MSG" on stderr, or a JSON error
    line with --log-format=json."""
    if _json:
        _write(_json_line("error", msg, {"event": "error", **(fields or {})}))
    else:
        _write(f"{prog}: {msg}")


def say(msg: str, level: str = "error") -> None:
    """A line a child process prints on stderr as it is in text mode (the
    namespace helper's "setns(net): ..."), a JSON line with --log-format=json."""
    _write(_json_line(level, msg, None) if _json else msg)


def _json_line(level: str, msg: str, fields: dict | None) -> str:
    out = {"time": round(time.time(), 6), "level": level, "pid": os.getpid(), "msg": msg}
    out.update(fields or {})
    return json.dumps(out, separators=(",", ":"))


def _write(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr closed or gone: nothing to tell anyone
