"""The supervisor's API socket: binding it, serving clients in the poll
loop, and the backend that supervisor/api.py's request handler calls."""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any, Callable, Generator

from .. import fdlimit
from ..forwards import Forward, ForwardError
from ..log import Throttle
from ..netconfig import slaac_address
from ..ns import helper as helper_ns
from . import api
from .errors import SetupError
from .peercheck import PeerCheck
from .tasks import run_task, wait

API_CLIENT_TIMEOUT = 5.0
API_DRAIN_LIMIT = 1 << 20
# At most this many clients at once: at the cap the oldest connection not
# waiting for a child is closed to make room, so idle connections cannot
# lock others out (if all wait for children, new ones wait); at most
# half as many accepts per loop turn, so a client accepted in one turn is
# read in the next before a flood can push it out.
API_MAX_CLIENTS = 128
API_ACCEPT_BATCH = API_MAX_CLIENTS // 2
# Out of fds (EMFILE/ENFILE): the listener is not polled until a client's
# fd is closed or this many seconds have passed (no busy loop).
API_EMFILE_PAUSE = 0.25
FD_LOG_WINDOW = 10.0
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_WINDOW = 10.0


def _median(values: list[float]) -> float:
    """statistics.median, without its 3 ms import on the path to ready."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _fwd_text(f: Forward) -> str:
    def addr(a: str, p: int) -> str:
        return f"[{a}]:{p}" if ":" in a else f"{a}:{p}"
    return (f"{addr(f.host_addr, f.host_port)} -> {addr(f.guest_addr, f.guest_port)}/{f.proto}"
            + (" (splice)" if f.is_splice else ""))


class _ApiClient:
    """One connection to the API socket, until it is answered or expires."""

    def __init__(self, sock: socket.socket, deadline: float,
                 refused: tuple[int, str] | None = None) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.answered = False
        self.waiting = False  # its answer waits for a child
        self.drained = 0
        self.refused = refused  # (pid, why): answered with an error, never served


class ApiServer:
    """Supervisor methods behind the API socket (mixed into
    supervisor.core.Supervisor)."""

    _fd_warned: Throttle | None = None  # lines about the fd limit (_warn_fds)

    def _bind_api(self, path: str) -> None:
        self.api_sock, self.api_ino = bind_unix_socket(path, "API socket")
        self._refusals = Throttle(REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW)
        ns = self.nsfds
        self.peer_check = PeerCheck(ns.user if ns else None, ns.net if ns else None,
                                    self.opts.target.pid)
        if self.peer_check.active:
            self.log.debug("API: clients inside the target's user namespace are refused")

    # -- the API (called by api.handle) -------------------------------------

    @property
    def default_guest_addr(self) -> str:
        return str(self.opts.net.guest)

    @property
    def default_guest_addr6(self) -> str | None:
        """The namespace's SLAAC address (EUI-64 from the TAP's MAC)."""
        if not self.opts.net.ipv6 or not self.tap_mac:
            return None
        return str(slaac_address(self.opts.net.prefix6, self.tap_mac))

    # The api_* methods that ask a child are tasks (supervisor/tasks.py):
    # they yield the child's reply Future and the loop goes on meanwhile.

    def api_add_forward(self, fwd: Forward) -> Generator[Any, Any, int]:
        if fwd.host_port == 0:  # the kernel picks; a race with another binder: try again
            from ..forwards import pick_host_port

            for attempt in range(4):
                try:
                    picked = pick_host_port(fwd)
                except OSError as e:
                    self.log.warning(f"forward {fwd.proto} {fwd.host_addr}:0 failed: "
                                     f"cannot pick a port: {e.strerror}")
                    raise ForwardError(f"cannot pick a port: {e.strerror}") from None
                try:
                    return (yield from self._add_forward(picked))
                except ForwardError:
                    if attempt == 3:
                        raise
        return (yield from self._add_forward(fwd))

    def _add_forward(self, fwd: Forward) -> Generator[Any, Any, int]:
        if fwd.is_splice:  # the fast path: nsnet/supervisor/fastpath.py
            try:
                yield from wait(self._fastpath().add(fwd))
            except ForwardError as e:
                self.log.warning(f"forward {_fwd_text(fwd)} failed: {e}",
                                 extra={"fields": {"event": "forward_failed", "error": str(e),
                                                   **fwd.to_dict()}})
                raise
            fid = self.forwards.add(fwd)
            self.log.debug(f"forward {fid} added: {_fwd_text(fwd)}",
                           extra={"fields": {"event": "forward_added", "id": fid,
                                             **fwd.to_dict()}})
            return fid
        reply = yield from wait(self._forwarder_request({"op": "add", "forward": fwd.to_dict()}))
        if not reply.get("ok"):
            why = reply.get("error", "failed")
            self.log.warning(f"forward {_fwd_text(fwd)} failed: {why}",
                             extra={"fields": {"event": "forward_failed", "error": why,
                                               **fwd.to_dict()}})
            raise ForwardError(why)
        fid = self.forwards.add(fwd)
        self.log.debug(f"forward {fid} added: {_fwd_text(fwd)}",
                       extra={"fields": {"event": "forward_added", "id": fid, **fwd.to_dict()}})
        return fid

    def api_remove_forward(self, fid: int) -> Generator[Any, Any, None]:
        fwd = self.forwards.get(fid)
        if fwd is None:
            raise KeyError(fid)
        if fwd.is_splice:  # the fast path: nsnet/supervisor/fastpath.py
            yield from wait(self._fastpath().remove(fwd))
        elif fid not in self.inactive_forwards:  # else libslirp does not have it
            reply = yield from wait(self._forwarder_request({"op": "remove",
                                                             "forward": fwd.to_dict()}))
            if not reply.get("ok"):
                raise ForwardError(reply.get("error", "failed"))
        self.inactive_forwards.discard(fid)
        if self.forwards.get(fid) is fwd:  # not removed by another client meanwhile
            self.forwards.remove(fid)
        self.log.debug(f"forward {fid} removed: {_fwd_text(fwd)}",
                       extra={"fields": {"event": "forward_removed", "id": fid}})

    def api_list_forwards(self) -> list[tuple[int, Forward]]:
        return self.forwards.items()

    def _forwarder_state(self) -> str:
        if self.fwd is not None:
            return "running" if self.fwd.ready else "starting"
        return "restarting" if self.restart_at is not None else "stopped"

    def api_info(self, interface: bool = False) -> Any:
        """The info dict; with interface, a task that adds what the
        interface helper reports (supervisor/interface.py)."""
        from .. import __version__
        from ..host import slirp

        net = self.opts.net
        now = time.monotonic()
        fwd = self.fwd
        lat = self.restart_latencies_ms
        info: dict[str, Any] = {
            "version": __version__,
            "libslirp": slirp.version(),
            "supervisor_pid": os.getpid(),
            "forwarder_pid": fwd.pid if fwd else None,
            "forwarder_state": self._forwarder_state(),
            "capture": self.pcap_path,  # --pcap or start_capture's file, else null
            "forwarder_uptime_s": (round(now - fwd.ready_at, 3)
                                   if fwd is not None and fwd.ready_at is not None else None),
            "target": {
                "pid": self.opts.target.pid,
                "netns": self.opts.target.netns,
                "userns": self.opts.target.userns,
                "exit_with_target": self.opts.exit_with_target and self.target_pidfd is not None,
            },
            "tap": {"name": self.opts.tapname, "ifindex": self.ifindex,
                    "mac": ":".join(f"{b:02x}" for b in self.tap_mac) if self.tap_mac else None},
            "mtu": net.mtu,
            "cidr": str(net.cidr),
            "guest": str(net.guest),
            "gateway": str(net.gateway),
            "dns": str(net.dns),
            "ipv6": net.ipv6,
            "offload": net.offload,
            "api_socket": self.opts.api_socket,
            "inactive_forwards": sorted(self.inactive_forwards),
            "restarts": self.restarts,
            "restart_latency_ms": {
                "last": round(lat[-1], 3) if lat else None,
                "median": round(_median(lat), 3) if lat else None,
                "max": round(max(lat), 3) if lat else None,
            },
            "restart_policy": {"max_restarts": self.opts.max_restarts,
                               "window_s": self.opts.restart_window,
                               "recent_failures": len([t for t in self.failures
                                                       if now - t < self.opts.restart_window])},
            "last_failure": self.last_failure or None,
            "uptime_s": round(now - self.started, 3),
        }
        if net.ipv6:
            info.update(gateway6=str(net.gateway6), dns6=str(net.dns6),
                        prefix6=f"{net.prefix6}/64", guest6=self.default_guest_addr6)
        if interface:
            return self._add_interface(info)
        return info

    def _add_interface(self, info: dict[str, Any]) -> Generator[Any, Any, dict[str, Any]]:
        from .interface import InterfaceQuery

        try:
            query = InterfaceQuery(self.nsfds, self.opts.tapname)
        except (OSError, helper_ns.HelperError) as e:
            info["interface"] = {"error": f"cannot start the namespace helper: {e}"}
            return info
        self.io_sources.append(query)
        try:
            info["interface"] = yield query.future
        except helper_ns.HelperError as e:
            info["interface"] = {"error": str(e)}
        return info

    def _ask_forwarder(self, what: str, msg: dict[str, Any]) -> Generator[Any, Any, dict[str, Any]]:
        """A request to the forwarder for the API command `what`: its
        successful reply, else ApiError saying why."""
        try:
            reply = yield from wait(self._forwarder_request(msg))
        except ForwardError as e:
            raise api.ApiError(f"{what}: {e}") from None
        if not reply.get("ok"):
            raise api.ApiError(f"{what}: {reply.get('error', 'failed')}")
        return reply

    def api_stats(self) -> Generator[Any, Any, dict[str, Any]]:
        reply = yield from self._ask_forwarder("get_stats", {"op": "stats"})
        conns = parse_connection_info(reply.get("connections", ""))
        active = [c for c in conns if c["state"] != "HOST_FORWARD"]
        n_active = len(active)
        total = reply.get("connections_total")
        if isinstance(total, int) and total > len(conns):
            # The forwarder lists at most STATS_MAX_CONNECTIONS sockets: count the rest.
            n_active += total - len(conns)
        out = dict(reply["stats"], forwarder_pid=self.fwd.pid if self.fwd else None,
                   active_connections=n_active, connections=conns,
                   restarts=self.restarts)
        for name, source in self.stats_sources.items():
            out[name] = source()
        pstats = reply.get("policy")
        if isinstance(pstats, dict) and self.policy is not None:
            out["policy"] = dict(pstats, audit_log_lost=self.policy.audit_lost)
            bypass = out.get("bypass")  # nsnet run --bypass: its records left out too
            if isinstance(bypass, dict) and isinstance(pstats.get("audit_lost"), int):
                out["policy"]["audit_lost"] = pstats["audit_lost"] + bypass["audit_lost"]
        if self.fastpath is not None:  # splice forwards: the relay's own counters
            try:
                out["fastpath"] = yield from wait(self.fastpath.stats())
            except ForwardError as e:
                out["fastpath"] = {"error": str(e)}
        return out

    def api_start_capture(self, path: str, max_bytes: int) -> Generator[Any, Any, None]:
        """start_capture (docs/capture.md): the supervisor opens the file,
        the forwarder gets the fd; later forwarders inherit it."""
        from .core import open_pcap

        if self.pcap_fd >= 0:
            raise api.ApiError(f"start_capture: a capture to {self.pcap_path} is running "
                               "(stop_capture first)")
        try:
            fd = open_pcap(path)
        except SetupError as e:
            raise api.ApiError(f"start_capture: {str(e).replace('--pcap=', '', 1)}") from None
        try:
            yield from self._ask_forwarder(
                "start_capture", {"op": "pcap", "max_bytes": max_bytes, "__fds": [fd]})
        except api.ApiError:
            os.close(fd)
            raise
        self.pcap_fd, self.pcap_max, self.pcap_path = fd, max_bytes, path
        self.log.info(f"capture started: {path} (at most {max_bytes} bytes)")

    def api_stop_capture(self) -> Generator[Any, Any, None]:
        if self.pcap_fd < 0:
            raise api.ApiError("stop_capture: no capture is running")
        fd, path = self.pcap_fd, self.pcap_path
        self.pcap_fd, self.pcap_path = -1, None  # the next forwarder does not capture
        os.close(fd)
        yield from self._ask_forwarder("stop_capture", {"op": "pcap_stop"})
        self.log.info(f"capture stopped: {path}")

    def api_get_policy(self) -> dict[str, Any]:
        if self.policy is None:
            return {"egress": "allow", "rules": []}
        return self.policy.get()

    def api_set_policy(self, args: dict[str, Any]) -> Generator[Any, Any, None]:
        """Replace the egress policy atomically: the forwarder judges every
        frame after this by the new one (flows it denies are cut unless
        keep_established); a forwarder started later gets it at fork."""
        from .policy import PolicyControl, PolicyControlError

        if self.policy is None:
            self.policy = PolicyControl(None, self.opts.audit_all)
            if self.fwd is not None:
                self.fwd.on_audit = self.policy.on_audit
        try:
            pol, keep = self.policy.parse_set(args)
        except PolicyControlError as e:
            raise api.ApiError(f"set_policy: {e}") from None
        # another enforcement point that cannot cut flows (nsnet run --bypass)
        blocked = getattr(self, "policy_blocked_by", None)
        blocked = blocked() if callable(blocked) else blocked
        if blocked and not keep:
            raise api.ApiError(f"set_policy: {blocked}")
        old = self.policy.policy
        # Other enforcement points (nsnet run --bypass): narrowed to what
        # both policies allow while the forwarder switches, then the new one.
        for fn in self.policy_listeners:
            fn(old, pol, False)
        fwd = self.fwd  # None: restart pending: the next forwarder gets it at fork
        if fwd is not None and not fwd.broken:  # (a starting one: sent once it is ready)
            try:
                yield from self.policy.send(self._forwarder_request, pol, keep)
            except (PolicyControlError, ForwardError) as e:
                for fn in self.policy_listeners:
                    fn(None, old, True)
                raise api.ApiError(f"set_policy: {e}") from None
        self.policy.policy = pol
        for fn in self.policy_listeners:
            fn(None, pol, True)
        self.log.info(f"egress policy replaced: default {pol.default}, {len(pol.rules)} rules"
                      + (" (established flows kept)" if keep else ""))

    # -- API socket handling (non-blocking, in the poll loop) --------------

    def _api_listening(self, now: float) -> bool:
        """Whether to poll the listener this turn: not at the client cap
        (connections wait in the backlog), nor while out of fds."""
        if self.api_paused_until is not None:
            if now < self.api_paused_until:
                return False
            self.api_paused_until = None
        if len(self.api_clients) >= API_MAX_CLIENTS and self._api_victim() is None:
            return False  # every slot waits for a child: new ones wait in the backlog
        return True

    def _api_victim(self) -> int | None:
        """The client to close at the cap: the oldest not waiting for a child."""
        fds = [fd for fd, c in self.api_clients.items() if not c.waiting]
        return min(fds, key=lambda fd: self.api_clients[fd].deadline) if fds else None

    def _api_accept(self) -> None:
        assert self.api_sock is not None
        for _ in range(API_ACCEPT_BATCH):
            # Clients never take the last SUPERVISOR_RESERVE fds: those are
            # for the children (a forwarder restart).  At that budget, as
            # at the cap, the oldest idle client makes room; with none, the
            # new one is refused with an error.
            room = fdlimit.free_fds()
            at_budget = room is not None and room <= fdlimit.SUPERVISOR_RESERVE
            victim = None
            if len(self.api_clients) >= API_MAX_CLIENTS or at_budget:
                victim = self._api_victim()
                if victim is None and not at_budget:
                    return
            try:
                conn, _ = self.api_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    # The connection stays in the backlog: wait for an fd
                    # to be freed (or the pause to end), do not spin.
                    self._warn_fds(f"API: cannot accept: {e.strerror} "
                                   f"({fdlimit.errno_name(e)}); {len(self.api_clients)} "
                                   f"clients open; waiting for fds")
                    self.api_paused_until = time.monotonic() + API_EMFILE_PAUSE
                return
            if victim is not None:
                self._api_close(victim)
            elif at_budget:
                n = len(self.api_clients)
                self._warn_fds(f"API: refused a client: {room} fds left under the open-file "
                               f"limit (RLIMIT_NOFILE), kept for nsnet's children; {n} "
                               f"clients open" + (", each waiting for a child" if n else ""))
                try:
                    conn.setblocking(False)
                    conn.send(b'{"error":{"desc":"nsnet is out of file descriptors '
                              b'(RLIMIT_NOFILE): try again later"}}')
                except OSError:
                    pass
                conn.close()
                continue
            conn.setblocking(False)
            refused = self.peer_check.refusal(conn)
            if refused is not None:
                self._log_refusal(*refused)
            self.api_clients[conn.fileno()] = _ApiClient(
                conn, time.monotonic() + API_CLIENT_TIMEOUT, refused)

    def _warn_fds(self, msg: str) -> None:
        """At most one line a FD_LOG_WINDOW about the fd limit, then a count."""
        if self._fd_warned is None:
            self._fd_warned = Throttle(1, FD_LOG_WINDOW)
        held, secs = self._fd_warned.roll(time.monotonic())
        if held:
            msg += f" ({held} more such events in {secs:.0f} s)"
        if self._fd_warned.admit():
            self.log.warning(msg)

    def _log_refusal(self, pid: int, why: str) -> None:
        """One warning per refused client, at most REFUSAL_LOG_BURST per
        REFUSAL_LOG_WINDOW seconds (then a count): a flood of refused
        clients must not flood the log."""
        held, secs = self._refusals.roll(time.monotonic())
        if held:
            self.log.warning(f"API: {held} more clients refused in {secs:.0f} s")
        if self._refusals.admit():
            self.log.warning(f"API: refused client pid {pid}: {why}")

    def _api_read(self, fd: int) -> None:
        c = self.api_clients[fd]
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._api_close(fd)
            return
        if c.answered:
            c.drained += len(data)
            if not data or c.drained > API_DRAIN_LIMIT:
                self._api_close(fd)
            return
        c.buf += data
        eof = not data
        # (a large set_policy: parse only once it may be whole, not per chunk)
        if (eof or len(c.buf) >= api.request_limit(bytes(c.buf[:api.MAX_REQUEST]))
                or ((len(c.buf) < api.MAX_REQUEST or c.buf.rstrip().endswith(b"}"))
                    and api.is_complete(bytes(c.buf)))):
            self._api_answer(fd, bytes(c.buf), eof)

    def _api_answer(self, fd: int, request: bytes, eof: bool) -> None:
        """Start answering: the request runs as a task (api.handle_task);
        one that waits for a child leaves the client waiting (not read,
        not expired: the child's deadline bounds it) and the loop serves
        the others.  The reply goes out when the task ends."""
        c = self.api_clients[fd]
        c.answered = True
        c.waiting = True

        def done(reply: bytes | None, error: BaseException | None) -> None:
            if error is not None:  # a bug must not take the network down
                self.log.error(f"API: internal error answering {request[:200]!r}: {error!r}")
                reply = api.error_reply(f"internal error: {error}")
            reply = reply or b""
            if self.log.isEnabledFor("debug"):
                text = request[:300].decode(errors="replace").strip()
                self.log.debug(f"API: {text} -> {reply[:300].decode(errors='replace')}",
                               extra={"fields": {"event": "api_request", "request": text,
                                                 "ok": not reply.startswith(b'{"error"')}})
            c.waiting = False
            if self.api_clients.get(fd) is c:  # still connected (and not a reused fd)
                self._api_send(fd, c, reply, eof)
            else:
                c.sock.close()

        if c.refused is not None:  # the peer check refused it (peercheck.py)
            done(refusal_reply(c.refused[1]), None)
            return
        try:
            run_task(api.handle_task(request, self), done)
        except Exception as e:  # noqa: BLE001
            done(None, e)

    def _api_send(self, fd: int, c: _ApiClient, reply: bytes, eof: bool) -> None:
        try:
            c.sock.setblocking(True)
            c.sock.settimeout(1.0)
            c.sock.sendall(reply)
            c.sock.shutdown(socket.SHUT_WR)
            c.sock.setblocking(False)
        except OSError:
            self._api_close(fd)
            return
        if eof:
            self._api_close(fd)

    def _api_close(self, fd: int) -> None:
        c = self.api_clients.pop(fd, None)
        if c is not None:  # a waiting one's task ends later and finds it gone
            try:
                c.sock.close()
            except OSError:
                pass
            self.api_paused_until = None  # an fd is free again: accept

    def _api_expire(self, now: float) -> None:
        for fd, c in list(self.api_clients.items()):
            if now >= c.deadline and not c.waiting:
                if not c.answered and c.buf:
                    self._api_answer(fd, bytes(c.buf), True)  # closes it once answered
                    if c.waiting:
                        continue
                self._api_close(fd)

    def _make_api_reader(self, fd: int) -> Callable[[int], None]:
        def reader(ev: int) -> None:
            if fd in self.api_clients:
                self._api_read(fd)
        return reader

    def _unlink_api(self) -> None:
        if self.peer_check is not None:
            self.peer_check.close()
        unlink_if_ours(self.opts.api_socket, self.api_ino)


def bind_unix_socket(path: str, what: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening, non-blocking unix socket at path, mode 0600 (only the
    invoking user; root passes anyway), and its file's (st_dev, st_ino) for
    removing it later only if it is still ours.  A stale socket file of a
    dead process is replaced; a live one, or anything else at path, is a
    SetupError naming `what`."""
    if len(path.encode()) >= 108:
        raise SetupError(f"{what} path too long ({len(path.encode())} bytes, max 107)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SetupError(f"{what} path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale socket of a dead process
        except OSError as e:
            raise SetupError(f"{what} {path}: {e.strerror}") from None
        else:
            raise SetupError(f"{what} {path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # 0600: only the invoking user may talk to it
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise SetupError(f"cannot bind {what} {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(1024)  # bursts of clients wait in the queue, not EAGAIN
    sock.setblocking(False)
    st = os.lstat(path)  # never follow a symlink swapped in after bind
    return sock, (st.st_dev, st.st_ino)


def unlink_if_ours(path: str | None, ino: tuple[int, int] | None) -> None:
    """Remove the socket file at path if it is still the one we bound."""
    if not path or ino is None:
        return
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ino:
            os.unlink(path)
    except OSError:
        pass


def refusal_reply(why: str) -> bytes:
    """The error a refused client gets (slirp4netns's error shape)."""
    return api.encode({"error": {"desc": f"permission denied: {why}; the API does not "
                                         "serve processes in the namespace it networks"}})


def parse_connection_info(text: str) -> list[dict[str, Any]]:
    """slirp_connection_info()'s table, one dict per socket:
    {"proto", "state", "fd", "src", "sport", "dst", "dport", "recvq", "sendq"}
    (the state of a UDP socket is its remaining lifetime, e.g. "236 sec")."""

    def num(v: str) -> int | None:
        return int(v) if v.lstrip("-").isdigit() else None

    out: list[dict[str, Any]] = []
    for line in text.splitlines()[1:]:
        m = _CONN_LINE.match(line)
        if m is None:
            continue
        rest = m.group(3).split()
        if len(rest) != 7:
            continue
        out.append({"proto": m.group(1).lower(), "state": m.group(2), "fd": num(rest[0]),
                    "src": rest[1], "sport": num(rest[2]), "dst": rest[3],
                    "dport": num(rest[4]), "recvq": num(rest[5]), "sendq": num(rest[6])})
    return out


_CONN_LINE = re.compile(r"^\s*(\w+)\[([^\]]*)\]\s+(.*)$")


