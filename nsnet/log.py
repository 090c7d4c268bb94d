"""Logging to stderr, line-buffered, as text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "pid": record.process,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            out.update(extra)
        return json.dumps(out, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"nsnet: {record.levelname.lower()}: {msg}"
        return f"nsnet: {msg}"


_configured = False


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the 'nsnet' logger once per process."""
    global _configured
    logger = logging.getLogger("nsnet")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    try:
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        pass
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    _configured = True


def get(name: str = "nsnet") -> logging.Logger:
    if not _configured:
        setup()
    return logging.getLogger(name if name.startswith("nsnet") else f"nsnet.{name}")


def monotonic_ms() -> float:
    return time.monotonic() * 1000.0
