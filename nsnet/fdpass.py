"""Passing file descriptors between processes over a Unix socket
(SCM_RIGHTS), with a small JSON message beside them."""

from __future__ import annotations

import json
import socket

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any

MAX_MSG = 65536


def send_fds(sock: socket.socket, msg: dict[str, Any], fds: list[int]) -> None:
    socket.send_fds(sock, [json.dumps(msg).encode()], fds)


def recv_fds(sock: socket.socket, maxfds: int = 1) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message and the fds that came with it; (None, []) on EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, maxfds)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    return json.loads(data), fds
