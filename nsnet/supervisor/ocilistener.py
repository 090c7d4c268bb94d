"""nsnet --bypass-listener=PATH: the socket bypass for containers that an
OCI runtime starts in the target's network namespace.

The runtime (runc, crun) connects to PATH once per container whose
seccomp profile has SCMP_ACT_NOTIFY rules and `listenerPath` = PATH, and
sends the container process state with the seccomp listener fd
(proto/oci.py).  The supervisor accepts in its poll loop (an I/O source:
watch(), deadline(), check(now), close()) and hands each listener that
passes every check to a bypass handler of its own (host/bypass.py's
Handler, the one `nsnet run --bypass` uses):

  1. the peer: SO_PEERCRED uid is this process's or root's (the socket
     file is 0600 as well);
  2. the message: at most MAX_STATE bytes within CONN_TIMEOUT seconds, the
     schema of proto/oci.py, exactly one fd, named seccompFd;
  3. the fd is a seccomp listener ("anon_inode:seccomp notify") and the
     kernel can do what the handler needs with it (ADDFD, Linux 5.14);
  4. the container is ours: the network namespace of its process (the
     message's pid, pinned by a pidfd) is the target's;
  5. nsnet may copy that process's fds (pidfd_getfd: ptrace access).

A listener that fails a check is closed (the container's notifying
syscalls then fail with ENOSYS: the kernel's answer when no one listens)
and one warning says why.  The supervisor keeps every accepted listener,
so a handler that dies is replaced on the same listener (Handler.on_exit)
without the runtime, which cannot send it again.  docs/bypass.md ("OCI
runtimes") has the whole design, SECURITY.md what it changes.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from ..host.bypass import Handler
    from ..netconfig import NetConfig

from .. import log
from ..proto.oci import MAX_FDS, MAX_STATE, check_state, decode_state
from ..proto.wire import ProtocolError

CONN_TIMEOUT = 5.0       # seconds a runtime has to send its message
MAX_CONNS = 8            # connections being read at once (others wait in the backlog)
MAX_CONTAINERS = 64      # listeners (handler processes) held at once
EMFILE_PAUSE = 1.0
REFUSAL_LOG_BURST = 10   # warnings per REFUSAL_LOG_WINDOW seconds, then a count
REFUSAL_LOG_WINDOW = 60.0


class Refused(Exception):
    """A listener or message refused; str() says why."""


class _Conn:
    __slots__ = ("sock", "deadline", "buf", "fds", "uid", "pid", "error")

    def __init__(self, sock: socket.socket, deadline: float, uid: int, pid: int) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.fds: list[int] = []
        self.uid = uid
        self.pid = pid
        self.error = ""


class _Container:
    __slots__ = ("handler", "id", "pid")

    def __init__(self, handler: Handler, cid: str, pid: int) -> None:
        self.handler = handler
        self.id = cid
        self.pid = pid


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _ns_ident(path_or_fd: str | int) -> tuple[int, int]:
    st = os.stat(path_or_fd) if isinstance(path_or_fd, str) else os.fstat(path_or_fd)
    return (st.st_dev, st.st_ino)


class OciListener:
    """The socket at PATH, the connections being read, the containers'
    handlers.  Created in the supervisor's set-up (after the namespaces are
    open), closed at teardown."""

    def __init__(self, path: str, netns_fd: int, net: NetConfig, facts: tuple[int, int, int],
                 guest6: Callable[[], str | None], policy_control: Callable[[], Any],
                 bytes_mode: str = "sampled", seccomp: bool = False) -> None:
        from .apiserver import bind_unix_socket

        self.log = log.get("nsnet.supervisor")
        self.path = path
        self.net = net
        self.facts = facts
        self.guest6 = guest6
        self.policy_control = policy_control  # the supervisor's PolicyControl, or None
        self.bytes_mode = bytes_mode  # --bypass-bytes
        self.seccomp = seccomp  # --enable-seccomp: each handler under its allowlist
        self.netns = _ns_ident(netns_fd)
        self.sock, self.ino = bind_unix_socket(path, "--bypass-listener socket")
        self.conns: dict[int, _Conn] = {}
        self.containers: list[_Container] = []
        self.paused_until: float | None = None
        self.refused = 0
        self.accepted = 0
        self.ended: dict[str, int] = {}  # counters of handlers that are gone
        self.finished = False
        self._refusals = log.Throttle(REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW)

    # -- the I/O-source interface of the supervisor's loop ------------------

    def watch(self) -> list[tuple[int, int, Callable[[int], None]]]:
        out: list[tuple[int, int, Callable[[int], None]]] = []
        now = time.monotonic()
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
        if self.sock is not None and self.paused_until is None and len(self.conns) < MAX_CONNS:
            out.append((self.sock.fileno(), select.POLLIN, lambda ev: self._accept()))
        for fd in self.conns:
            out.append((fd, select.POLLIN, self._reader(fd)))
        for c in self.containers:
            h = c.handler
            if h.pidfd >= 0:
                out.append((h.pidfd, select.POLLIN, self._on_exit(c)))
            if h.audit_sock is not None:
                out.append((h.audit_sock.fileno(), select.POLLIN, h.read_audit))
        return out

    def deadline(self) -> float | None:
        ds = [c.deadline for c in self.conns.values()]
        if self.paused_until is not None:
            ds.append(self.paused_until)
        return min(ds) if ds else None

    def check(self, now: float) -> None:
        for fd, c in list(self.conns.items()):
            if now >= c.deadline:
                self._refuse(fd, f"no whole message in {CONN_TIMEOUT:g} s "
                                 f"({len(c.buf)} bytes, {len(c.fds)} fds"
                                 + (f"; {c.error}" if c.error else "") + ")")

    def close(self) -> None:
        """Teardown: every handler stopped, every listener closed (the
        containers' notifying calls fail with ENOSYS from then on), the
        socket file removed if it is still ours."""
        from .apiserver import unlink_if_ours

        for fd in list(self.conns):
            self._drop(fd)
        for c in self.containers:
            c.handler.stop()
        self.containers = []
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            unlink_if_ours(self.path, self.ino)

    # -- get_stats, set_policy, the audit log -----------------------------------

    def policy(self) -> Any:
        pc = self.policy_control()
        return pc.policy if pc is not None else None

    def stats(self) -> dict[str, Any]:
        from ..host.bypass import BYTE_COUNTS, COUNTERS, scope

        keys = (*COUNTERS, *BYTE_COUNTS, "protocol_errors")
        total = {k: self.ended.get(k, 0) for k in keys}
        listed = []
        for c in self.containers:
            st = c.handler.stats()
            for k in keys:
                total[k] += st[k]
            listed.append({"id": c.id, "pid": c.pid, "handler_pid": st["handler_pid"],
                           "restarts": st["restarts"]})
        pc = self.policy_control()
        total["audit_lost"] += pc.bypass_audit_capped if pc is not None else 0
        total.update(listener=self.path, containers=listed, accepted=self.accepted,
                     refused=self.refused, scope=scope(self.net, self.policy()))
        return total

    def policy_changed(self, old: Any, new: Any, done: bool) -> None:
        for c in self.containers:
            c.handler.policy_changed(old, new, done)
            self._audit_settings(c.handler)

    def _audit_settings(self, h: Handler) -> None:
        """The egress policy's audit log records the handlers' decisions
        (docs/policy.md): which ones depends on the policy, which set_policy
        can create at run time."""
        pc = self.policy_control()
        h.set_audit(pc is not None and pc.active, pc is not None and pc.audit_all)

    def _on_audit(self, records: list[dict[str, Any]]) -> None:
        pc = self.policy_control()
        if pc is not None:
            pc.on_bypass_audit(records)

    def may_have_bypassed(self) -> bool:
        from ..host.bypass import scope

        if any(scope(self.net, self.policy()).values()):
            return True
        return bool(self.ended.get("bypassed")) or any(
            c.handler.stats()["bypassed"] for c in self.containers)

    # -- connections ---------------------------------------------------------

    def _accept(self) -> None:
        assert self.sock is not None
        while len(self.conns) < MAX_CONNS:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self.paused_until = time.monotonic() + EMFILE_PAUSE
                    self._warn(f"cannot accept: {e.strerror}")
                return
            conn.setblocking(False)
            pid, uid, _gid = _peercred(conn)
            if uid not in (os.geteuid(), 0):
                self.refused += 1
                who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} or root"
                self._warn(f"refused a connection from pid {pid} uid {uid}: "
                           f"only {who} may send a seccomp listener")
                conn.close()
                continue
            self.conns[conn.fileno()] = _Conn(conn, time.monotonic() + CONN_TIMEOUT, uid, pid)

    def _reader(self, fd: int) -> Callable[[int], None]:
        return lambda ev: self._read(fd)

    def _read(self, fd: int) -> None:
        c = self.conns.get(fd)
        if c is None:
            return
        room = MAX_STATE + 1 - len(c.buf)
        try:
            data, fds, flags, _ = socket.recv_fds(
                c.sock, room, MAX_FDS, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._refuse(fd, f"cannot read the message: {e.strerror}")
            return
        if fds and c.buf:
            c.fds += fds
            self._refuse(fd, "fds after the first bytes of the message (the runtime-spec "
                             "sends them with the first sendmsg only)")
            return
        c.fds += fds
        if flags & socket.MSG_CTRUNC:
            self._refuse(fd, f"more than {MAX_FDS} fds (control data truncated)")
            return
        c.buf += data
        if len(c.buf) > MAX_STATE:
            self._refuse(fd, f"message larger than {MAX_STATE} bytes")
            return
        try:
            value = decode_state(bytes(c.buf))
        except ProtocolError as e:
            if data and len(c.buf) < MAX_STATE:
                c.error = str(e)  # not whole yet: more may come (or the deadline)
                return
            self._refuse(fd, str(e) if c.buf else "no message")
            return
        try:
            msg = check_state(value, len(c.fds))
        except ProtocolError as e:
            self._refuse(fd, str(e))
            return
        listener, c.fds = c.fds[0], []
        self._drop(fd)
        try:
            self._adopt(listener, msg)
        except Refused as e:
            os.close(listener)
            self.refused += 1
            self._warn(f"refused the seccomp listener of container "
                       f"{msg['state']['id'][:64]!r} (pid {msg['pid']}): {e}")

    def _refuse(self, fd: int, why: str) -> None:
        c = self.conns[fd]
        self.refused += 1
        self._warn(f"refused a message from pid {c.pid} uid {c.uid}: {why}")
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        c = self.conns.pop(fd)
        _close_all(c.fds)
        c.fds = []
        c.sock.close()

    def _warn(self, text: str) -> None:
        """One warning per refusal, at most REFUSAL_LOG_BURST a window."""
        held, secs = self._refusals.roll(time.monotonic())
        if held:
            self.log.warning(f"--bypass-listener: {held} more refusals in {secs:.0f} s")
        if self._refusals.admit():
            self.log.warning(f"--bypass-listener: {text}")

    # -- listeners -------------------------------------------------------------

    def _adopt(self, listener: int, msg: dict[str, Any]) -> None:
        """Checks 3-5 (module doc), then a handler of its own."""
        from ..host.bypass import BypassError, Handler, check_access, check_kernel

        self.containers = [c for c in self.containers if c.handler.listener >= 0]
        if len(self.containers) >= MAX_CONTAINERS:
            raise Refused(f"{MAX_CONTAINERS} containers are served already")
        try:
            kind = os.readlink(f"/proc/self/fd/{listener}")
        except OSError as e:
            raise Refused(f"cannot look at the fd: {e.strerror}") from None
        if kind != "anon_inode:seccomp notify":
            raise Refused(f"seccompFd is {kind[:64]!r}, not a seccomp listener")
        pid = msg["pid"]
        self._check_netns(pid)
        try:
            check_kernel(listener)
            check_access(pid)
        except BypassError as e:
            raise Refused(str(e)) from None
        cid = msg["state"]["id"]
        try:
            h = Handler(listener, self.net, self.facts, self.guest6(), policy=self.policy(),
                        bytes_mode=self.bytes_mode, seccomp=self.seccomp,
                        on_give_up=lambda why: self.log.error(
                            f"--bypass-listener: container {cid[:64]!r}: {why}; its listener "
                            "is closed (its connects fail with ENOSYS from now on)"))
        except BypassError as e:
            raise Refused(str(e)) from None
        self._audit_settings(h)
        h.on_audit = self._on_audit
        try:
            h.start()
        except OSError as e:
            h.stop()
            raise Refused(f"cannot start its handler: {e.strerror}") from None
        self.containers.append(_Container(h, cid, pid))
        self.accepted += 1
        self.log.info(f"--bypass-listener: container {cid[:64]!r} (pid {pid}): bypass handler "
                      f"pid {h.pid}")

    def _check_netns(self, pid: int) -> None:
        """The process `pid` (the message's) lives in the target's network
        namespace.  Pinned by a pidfd: if the PID was reused between the
        look and now, the pidfd says the first process is gone."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            raise Refused(f"pidfd_open({pid}): {e.strerror} (is the runtime in another "
                          "PID namespace?)") from None
        try:
            try:
                ident = _ns_ident(f"/proc/{pid}/ns/net")
            except OSError as e:
                raise Refused(f"cannot read /proc/{pid}/ns/net: {e.strerror}") from None
            if select.select([pidfd], [], [], 0)[0]:
                raise Refused(f"process {pid} exited")
        finally:
            os.close(pidfd)
        if ident != self.netns:
            raise Refused("the container's network namespace is not the one this nsnet "
                          "serves (its profile's listenerPath names the wrong nsnet)")

    def _on_exit(self, c: _Container) -> Callable[[int], None]:
        def fn(ev: int) -> None:
            h = c.handler
            h.on_exit(ev)  # a restart on the same listener, or the end
            if h.pid > 0:
                return
            from ..host.bypass import BYTE_COUNTS, COUNTERS

            h.stop()  # the last audit records; closes the listener
            st = h.stats()
            for k in (*COUNTERS, *BYTE_COUNTS, "protocol_errors"):
                if k not in ("pending", "bytes_live"):
                    self.ended[k] = self.ended.get(k, 0) + st[k]
            self.containers.remove(c)
            if not h.gave_up:
                self.log.info(f"--bypass-listener: container {c.id[:64]!r} ended "
                              "(its listener hung up)")
        return fn


def _peercred(conn: socket.socket) -> tuple[int, int, int]:
    import struct

    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))
