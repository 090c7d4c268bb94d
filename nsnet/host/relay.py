"""The fast path's relay ("nsnet-relay", host network namespace): owns the
listeners and splices each accepted connection to the one the connector
opened in the namespace (csrc/relay.c); see nsnet/supervisor/fastpath.py."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any

from .. import fdlimit, linux, log
from ..forwards import Forward
from ..proto import fastpath as proto
from ..proto.fastpath import NO_SUCH_FORWARD, family, send_json
from ..proto.wire import MAX_MSG, ProtocolError

RELAY_TURN_MS = 1000      # the C loop returns to Python at least this often
PIPE_SIZE = 256 * 1024    # per direction and connection (falls back to 64 KiB)
MAX_PENDING = 128         # connections waiting for the connector
REFUSED_LOG_PER_SECOND = 10  # debug lines for connections the guest refused
FD_LOG_WINDOW = 10.0      # at most one line about the fd limit this often


def _reset_close(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the peer sees the connection refused
    rather than a clean, empty reply."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def listen(fwd: Forward) -> socket.socket:
    """The host-side listener of a fast-path forward (as libslirp binds its
    own: SO_REUSEADDR; IPv6 only for an IPv6 address)."""
    fam = family(fwd.host_addr)
    s = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((fwd.host_addr, fwd.host_port))
        s.listen(socket.SOMAXCONN)
    except OSError:
        s.close()
        raise
    return s


class _Listener:
    def __init__(self, sock: socket.socket, fwd: Forward) -> None:
        self.sock = sock
        self.fwd = fwd


class Relay:
    """The relay process's state: listeners, the connector, the C relay."""

    def __init__(self, ctl: socket.socket) -> None:
        from .._relay_cffi import ffi, lib

        self.ffi, self.lib = ffi, lib
        self.log = log.get("nsnet.relay")
        self.ctl = ctl
        self.ctx = lib.relay_new(PIPE_SIZE)
        if self.ctx == ffi.NULL:
            raise OSError(ffi.errno, "relay_new failed")
        self.listeners: dict[int, _Listener] = {}  # by fd
        self.connector: socket.socket | None = None
        # tag -> (accepted client, its forward, its peer address)
        self.pending: dict[int, tuple[socket.socket, Forward, Any]] = {}
        self.next_tag = 1
        self.paused = False  # listeners unwatched: too many pending
        self.refused = 0  # connections the guest refused (get_stats)
        # debug lines for them: at most REFUSED_LOG_PER_SECOND a second
        self.clock = time.monotonic
        self.refused_log = log.Throttle(REFUSED_LOG_PER_SECOND, 1.0)
        self.fd_refused = 0  # connections refused at the fd limit (get_stats)
        self.fd_log = log.Throttle(1, FD_LOG_WINDOW)
        self.reserve: socket.socket | None = _reserve()  # room to refuse at the fd limit
        ctl.setblocking(False)
        self._watch(ctl.fileno())

    def _watch(self, fd: int) -> None:
        rc = self.lib.relay_watch(self.ctx, fd)
        if rc < 0:
            raise OSError(-rc, f"epoll: {os.strerror(-rc)}")

    def _unwatch(self, fd: int) -> None:
        self.lib.relay_unwatch(self.ctx, fd)

    # -- control requests from the supervisor --------------------------------

    def _find(self, fwd: Forward) -> int | None:
        for fd, lst in self.listeners.items():
            if lst.fwd.key() == fwd.key():
                return fd
        return None

    def handle(self, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = req.get("op")
        if op == "add":
            fwd = Forward(**req["forward"])
            try:
                sock = listen(fwd)
            except OSError as e:
                name = errno.errorcode.get(e.errno or 0, str(e.errno))
                return {"ok": False, "error": f"{_addr(fwd.host_addr, fwd.host_port)}: "
                                              f"{e.strerror} ({name})"}
            self.listeners[sock.fileno()] = _Listener(sock, fwd)
            if not self.paused:
                self._watch(sock.fileno())
            return {"ok": True}
        if op == "remove":
            fd = self._find(Forward(**req["forward"]))
            if fd is None:
                return {"ok": False, "error": NO_SUCH_FORWARD}
            lst = self.listeners.pop(fd)
            if not self.paused:
                self._unwatch(fd)
            lst.sock.close()
            return {"ok": True}
        if op == "connector":
            self._drop_connector()
            self.connector = socket.socket(fileno=fds.pop(0))
            self.connector.setblocking(False)
            self._watch(self.connector.fileno())
            return {"ok": True}
        if op == "stats":
            st = self.ffi.new("struct relay_stats *")
            self.lib.relay_get_stats(self.ctx, st)
            return {"ok": True, "stats": {
                "active": st.active, "total": st.total, "closed": st.closed,
                "reset": st.reset, "failed": st.failed, "bytes_in": st.bytes[0],
                "bytes_out": st.bytes[1], "pending": len(self.pending),
                "listeners": len(self.listeners), "refused": self.refused,
                "fd_refused": self.fd_refused}}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _control(self) -> bool:
        """Answer every queued request; False once the supervisor hung up."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.ctl, MAX_MSG + 1, 1)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            try:
                req = proto.parse_relay_request(data, len(fds))
            except ProtocolError as e:  # nsnet's own bug: stop, the supervisor restarts it
                self.log.error(f"relay: bad request from the supervisor ({e}); exiting")
                for fd in fds:
                    os.close(fd)
                return False
            try:
                reply = self.handle(req, fds)
            except (KeyError, IndexError, TypeError, ValueError, OSError) as e:
                reply = {"ok": False, "error": str(e)}
            for fd in fds:  # any fd the request did not take
                os.close(fd)
            reply["reply_to"] = req["seq"]
            try:
                send_json(self.ctl, reply)
            except OSError:
                return False

    # -- connections ---------------------------------------------------------

    def _drop_connector(self) -> None:
        if self.connector is not None:
            self._unwatch(self.connector.fileno())
            self.connector.close()
            self.connector = None
        for client, _fwd, _peer in self.pending.values():
            _reset_close(client)
        self.pending.clear()
        self._pause(False)

    def _pause(self, pause: bool) -> None:
        if pause == self.paused:
            return
        self.paused = pause
        for fd in self.listeners:
            (self._unwatch if pause else self._watch)(fd)

    def _accept(self, lst: _Listener) -> None:
        while len(self.pending) < MAX_PENDING:
            try:
                client, peer = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    if self._refuse_one(lst):
                        continue  # at the fd limit: that connection refused, not spun on
                    return  # none was waiting (accept says EMFILE first)
                self._warn_fds(f"accept on {_addr(lst.fwd.host_addr, lst.fwd.host_port)}: "
                               f"{e.strerror}")
                return
            if self.connector is None:
                _reset_close(client)
                continue
            tag = self.next_tag
            self.next_tag += 1
            try:
                send_json(self.connector, {"tag": tag, "addr": lst.fwd.guest_addr,
                                            "port": lst.fwd.guest_port})
            except OSError:
                _reset_close(client)
                self._drop_connector()
                return
            self.pending[tag] = (client, lst.fwd, peer)
        self._pause(True)

    def _refuse_one(self, lst: _Listener) -> bool:
        """At the fd limit: the reserve makes room to accept one connection,
        which is reset at once (the client sees it, nothing spins); a
        rate-limited warning.  False if there was none to refuse (or no
        room even so: the next event retries)."""
        if self.reserve is not None:
            self.reserve.close()
            self.reserve = None
        try:
            client, _peer = lst.sock.accept()
        except OSError:
            self.reserve = _reserve()
            return False
        _reset_close(client)
        self.reserve = _reserve()
        self._fd_refused(f"a connection to {_addr(lst.fwd.host_addr, lst.fwd.host_port)}")
        return True

    def _fd_refused(self, what: str) -> None:
        self.fd_refused += 1
        emfile = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        self._warn_fds(f"relay: refused {what}: {fdlimit.exhausted(emfile, False)}")

    def _warn_fds(self, msg: str) -> None:
        """At most one line about the fd limit every FD_LOG_WINDOW seconds."""
        held, secs = self.fd_log.roll(self.clock())
        if held:
            msg += f" ({held} more such events in {secs:.0f} s)"
        if self.fd_log.admit():
            self.log.warning(msg)

    def _connected(self) -> None:
        """Replies from the connector: start relaying, or refuse the client."""
        assert self.connector is not None
        while self.connector is not None:
            try:
                data, fds, flags, _src = socket.recv_fds(self.connector, MAX_MSG + 1, 1)
            except BlockingIOError:
                break
            except OSError:
                data, fds, flags = b"", [], 0
            # At the fd limit the kernel drops the connection's fd
            # (MSG_CTRUNC): that one client is refused, not the connector.
            truncated = bool(flags & socket.MSG_CTRUNC) and not fds
            if not data:  # the connector died; the supervisor sends a new one
                for fd in fds:
                    os.close(fd)
                self._drop_connector()
                break
            try:
                # The connector lives in the namespace: its word is checked.
                if truncated:  # checked as sent: with its one fd
                    reply = proto.parse_connect_reply(data, 1, self.pending)
                else:
                    reply = proto.parse_connect_reply(data, len(fds), self.pending)
            except ProtocolError as e:
                self.log.warning(f"relay: the connector broke its protocol ({str(e)[:200]}); "
                                 "dropping it")
                for fd in fds:
                    os.close(fd)
                self._drop_connector()  # it sees EOF and exits; a new one comes
                break
            waiting = self.pending.pop(reply["tag"], None)
            client = waiting[0] if waiting is not None else None
            if truncated:
                if waiting is not None:
                    _reset_close(waiting[0])
                    self._fd_refused(f"a connection to "
                                     f"{_addr(waiting[1].host_addr, waiting[1].host_port)}")
            elif client is not None and reply["ok"] and fds:
                rc = self.lib.relay_add(self.ctx, client.detach(), fds.pop(0))
                if rc < 0:
                    self.log.warning(f"relay: cannot relay a connection: {os.strerror(-rc)}")
            elif waiting is not None:
                _reset_close(waiting[0])
                self._refused(waiting[1], waiting[2], reply.get("errno"))
            for fd in fds:
                os.close(fd)
        if len(self.pending) < MAX_PENDING // 2:
            self._pause(False)

    def _refused(self, fwd: Forward, peer: Any, err: int | None) -> None:
        """The connector could not connect to the guest port (nothing
        listens: ECONNREFUSED; a firewall: ETIMEDOUT...): counted, and one
        debug line, at most REFUSED_LOG_PER_SECOND a second (a client
        hammering a closed port must not flood the log).  Only the errno
        number comes from the connector (it lives in the namespace)."""
        self.refused += 1
        if not self.log.isEnabledFor("debug"):
            return
        self._refused_window(self.clock())
        if not self.refused_log.admit():
            return
        name = errno.errorcode.get(err or 0, "")
        why = f"{os.strerror(err)} ({name})" if name else "unknown error"
        client = _addr(peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        self.log.debug(
            f"fast path: the guest refused {_addr(fwd.guest_addr, fwd.guest_port)} "
            f"(forward {_addr(fwd.host_addr, fwd.host_port)}/tcp): {why}; the connection "
            f"from {client} was reset",
            extra={"fields": {"event": "fastpath_refused", "errno": name or None,
                              "client": client, **fwd.to_dict()}})

    def _refused_window(self, now: float) -> None:
        """A new second: say how many refusals were not logged in the last."""
        held, _ = self.refused_log.roll(now)
        if held:
            self.log.debug(f"fast path: {held} more connections refused by "
                           f"the guest were not logged (at most {REFUSED_LOG_PER_SECOND} "
                           "lines a second)",
                           extra={"fields": {"event": "fastpath_refused_unlogged",
                                             "count": held}})

    def step(self) -> bool:
        """After the C loop woke up: serve whatever is readable."""
        fds = [self.ctl.fileno()]
        if self.connector is not None:
            fds.append(self.connector.fileno())
        if not self.paused:
            fds += list(self.listeners)
        ready = {fd for fd, _ in _poll_now(fds)}
        if self.ctl.fileno() in ready and not self._control():
            return False
        if self.connector is not None and self.connector.fileno() in ready:
            self._connected()
        for fd in ready:
            lst = self.listeners.get(fd)
            if lst is not None and not self.paused:
                self._accept(lst)
        return True

    def close(self) -> None:
        """Close every socket it holds, on its way out.  Left to the
        interpreter, a socket object still open is repr()'d as it is freed
        (the unclosed-socket ResourceWarning is formatted even when it is
        filtered out): getsockname and getpeername, and getpeername is not
        on the relay's seccomp list: the relay that saw the supervisor hang
        up was killed by SIGSYS instead of exiting 0."""
        socks = [lst.sock for lst in self.listeners.values()]
        socks += [client for client, _fwd, _peer in self.pending.values()]
        socks += [s for s in (self.connector, self.reserve, self.ctl) if s is not None]
        self.listeners.clear()
        self.pending.clear()
        self.connector = self.reserve = None
        for s in socks:
            s.close()

    def serve(self) -> int:
        while True:
            rc = self.lib.relay_run(self.ctx, RELAY_TURN_MS)
            if rc < 0:
                self.log.error(f"relay: epoll_wait: {os.strerror(-rc)}")
                return 4
            if rc == self.lib.RELAY_WAKE and not self.step():
                return 0
            if self.refused_log.held:
                self._refused_window(self.clock())


def _reserve() -> socket.socket | None:
    """An fd held to be closed when accept() fails with EMFILE (fdlimit.py)."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _poll_now(fds: list[int]) -> list[tuple[int, int]]:
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return p.poll(0)


EXIT_SANDBOX_FAILED = 5


def relay_main(ctl: socket.socket, sandbox: bool = False, seccomp: bool = False) -> int:
    """--enable-sandbox / --enable-seccomp: the relay enters its own
    sandbox (an empty root; nobody when root) and seccomp list (profile
    "relay" in nsnet/seccomp.py) once its epoll instance exists."""
    linux.raise_fd_limit()  # each relayed connection holds 6 fds (2 sockets, 2 pipes)
    relay = Relay(ctl)
    if sandbox or seccomp:
        from .. import sandbox as sandbox_mod

        try:
            sandbox_mod.enter(sandbox=sandbox, seccomp=seccomp, profile="relay")
        except sandbox_mod.SandboxError as e:
            relay.log.error(f"relay: {e}")
            return EXIT_SANDBOX_FAILED
    try:
        return relay.serve()
    finally:
        relay.close()
