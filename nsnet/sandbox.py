"""The forwarder's sandbox (--enable-sandbox) and seccomp filter
(--enable-seccomp), entered after libslirp is set up and before the
forwarder serves any packet."""

from __future__ import annotations

from typing import Any


class SandboxError(RuntimeError):
    pass


def enter(sandbox: bool, seccomp: bool, forwards: Any = None) -> None:
    raise SandboxError("--enable-sandbox and --enable-seccomp are not supported yet")
