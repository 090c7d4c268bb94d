"""The fast path's internal protocol (supervisor <-> relay <-> connector):
JSON messages over SOCK_SEQPACKET socketpairs, fds over SCM_RIGHTS."""

from __future__ import annotations

import json
import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NO_SUCH_FORWARD = "no such forward"  # the relay's answer to a remove it has no listener for


def send_json(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(json.dumps(msg, separators=(",", ":")).encode())


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
