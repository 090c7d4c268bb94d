"""The fast path's connector ("nsnet-connect"): joins the target's
namespaces once and connects to guest ports there for the relay
(see nsnet/supervisor/fastpath.py for the whole picture)."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any

from .. import fdpass, linux
from ..proto.fastpath import family, parse_connect_request, send_json
from ..proto.wire import MAX_MSG, ProtocolError
from . import helper as helper_ns

CONNECT_TIMEOUT = 10.0    # connector: connect() to the guest port


def _seccomp(seccomp: bool) -> str:
    """--enable-seccomp, last: the connector's own allowlist (profile
    "connector" in nsnet/seccomp.py: TCP sockets, connect, the socket to
    the relay; no files).  "" or why not."""
    if not seccomp:
        return ""
    from .. import seccomp as seccomp_mod

    try:
        seccomp_mod.install("connector")
    except seccomp_mod.SeccompError as e:
        return f"seccomp: {e}"
    return ""


def _confine() -> str:
    """Inside the namespaces, before serving: an empty root (it lives on in
    the target's user namespace, and needs no file: only socket() and
    connect() in the target's netns) and no capability.  "" or why not."""
    # Nothing can be imported after this.  (No encodings.idna, 7-14 ms: the
    # addresses are IP literals, ASCII, which socket takes without a codec.)
    try:
        linux.empty_root()
    except OSError as e:
        return f"cannot leave the host's filesystem: {e.strerror}"
    if not helper_ns.drop_capabilities():
        return "cannot drop capabilities"
    return ""


def connector_main(ns: helper_ns.NsFds, sock: socket.socket,
                   seccomp: bool = False) -> int:
    """Join the namespaces (non-dumpable first), move to an empty root,
    drop every capability, load its seccomp filter (--enable-seccomp), say
    ready, then answer {"tag","addr","port"}
    requests with {"tag","ok":true} plus the connected fd, or
    {"tag","ok":false,"error"}.  Connects are non-blocking: a slow guest
    port does not hold up the others.  Exits 0 when its peer hangs up."""
    if seccomp:  # the binding and libseccomp, while there are files to load them from
        from .. import seccomp as seccomp_mod

        seccomp_mod.resolve(profile="connector")
    if not helper_ns.enter_namespaces(ns):
        send_json(sock, {"event": "failed", "error": "cannot join the target's namespaces"})
        return 1
    why = _confine() or _seccomp(seccomp)
    if why:
        send_json(sock, {"event": "failed", "error": why})
        return 1
    send_json(sock, {"event": "ready", "pid": os.getpid()})
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    pending: dict[int, tuple[Any, socket.socket, float]] = {}

    def answer(tag: Any, conn: socket.socket | None, err: int = 0) -> None:
        if conn is not None:
            fdpass.send_fds(sock, {"tag": tag, "ok": True}, [conn.fileno()])
            conn.close()
        else:
            send_json(sock, {"tag": tag, "ok": False, "error": os.strerror(err), "errno": err})

    while True:
        now = time.monotonic()
        timeout = None
        if pending:
            timeout = max(0.0, min(d for _, _, d in pending.values()) - now) * 1000
        for fd, _ev in poller.poll(timeout):
            if fd == sock.fileno():
                data = sock.recv(MAX_MSG + 1)
                if not data:
                    return 0
                try:
                    req = parse_connect_request(data)
                except ProtocolError:
                    return 1  # nsnet's own bug: the relay drops this connector
                tag, addr, port = req["tag"], req["addr"], req["port"]
                conn = socket.socket(family(addr), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                err = conn.connect_ex((addr, port))
                if err == 0:
                    answer(tag, conn)
                elif err == errno.EINPROGRESS:
                    pending[conn.fileno()] = (tag, conn, time.monotonic() + CONNECT_TIMEOUT)
                    poller.register(conn.fileno(), select.POLLOUT)
                else:
                    conn.close()
                    answer(tag, None, err)
                continue
            tag, conn, _ = pending.pop(fd)
            poller.unregister(fd)
            err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                conn.close()
                answer(tag, None, err)
            else:
                answer(tag, conn)
        now = time.monotonic()
        for fd, (tag, conn, deadline) in list(pending.items()):
            if now >= deadline:
                del pending[fd]
                poller.unregister(fd)
                conn.close()
                answer(tag, None, errno.ETIMEDOUT)
