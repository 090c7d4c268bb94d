"""The fast path for published ports (add_hostfwd "mode":"splice").

libslirp's port forward carries every byte through a user-mode TCP stack
and the TAP.  The fast path skips all of it:

  client --TCP--> listener (host netns, the relay process)
                    | accept; "connect to port P" over a socketpair
                    v
                  connector (stays inside the target's user+net namespaces)
                    | connect(127.0.0.1:P) there; the connected fd comes
                    v back over SCM_RIGHTS
  relay process: splice(2) outer socket <-> pipe <-> inner socket, in C
                 (csrc/relay.c, one epoll loop for every connection; Python
                 sees one event per connection, never a data chunk)

Processes (all forked from the supervisor, all with PR_SET_PDEATHSIG):
- the relay ("nsnet-relay"): owns the listeners and the relayed
  connections; answers the supervisor's add/remove/stats requests between
  turns of the C loop.  It does not depend on the libslirp forwarder: a
  forwarder restart leaves it and its connections alone.
- the connector ("nsnet-connect"): joins the target's namespaces once
  (helper_ns.enter_namespaces) and stays there, answering connect requests.

The supervisor owns a FastPath object: it starts both children on the first
splice forward, restarts them when they die (the listeners are re-created;
connections relayed by a dead relay are lost), and kills them at teardown.
The trade-off (the server in the namespace sees a loopback peer, not the
client's address) is documented in docs/fastpath.md.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import struct
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any, Callable

from . import fdpass, helper_ns, linux, log
from .children import fork_child
from .forwards import Forward, ForwardError, make_forward

START_TIMEOUT = 10.0      # connector: namespaces joined
REQUEST_TIMEOUT = 5.0     # supervisor <-> relay round trip
CONNECT_TIMEOUT = 10.0    # connector: connect() to the guest port
RELAY_TURN_MS = 1000      # the C loop returns to Python at least this often
PIPE_SIZE = 256 * 1024    # per direction and connection (falls back to 64 KiB)
MAX_PENDING = 128         # connections waiting for the connector
NO_SUCH_FORWARD = "no such forward"  # the relay's answer to a remove it has no listener for
MAX_RESTARTS = 5          # relay/connector deaths allowed in RESTART_WINDOW
RESTART_WINDOW = 60.0

LOOPBACK = {4: "127.0.0.1", 6: "::1"}


# --------------------------------------------------------------------------
# For `nsnet run --publish`
# --------------------------------------------------------------------------

def publish_forward(host_port: int, guest_port: int, proto: str = "tcp",
                    host_addr: str = "", guest_addr: str = "", *,
                    default_guest: str, default_guest6: str | None = None) -> Forward:
    """The Forward to publish a port with: TCP through the fast path
    (mode "splice"; the guest address defaults to the namespace's
    loopback), UDP through libslirp (the fast path is TCP only; the guest
    address defaults to default_guest / default_guest6, the namespace's
    addresses).  Raises ForwardError naming the bad field.  Put the result
    in supervisor.Options.initial_forwards (published before ready; a port
    that cannot be bound fails the set-up), or pass it to
    Supervisor.api_add_forward once running."""
    if proto == "tcp":
        return make_forward(proto, host_port, guest_port, host_addr, guest_addr,
                            default_guest=LOOPBACK[4], default_guest6=LOOPBACK[6], mode="splice")
    return make_forward(proto, host_port, guest_port, host_addr, guest_addr,
                        default_guest=default_guest, default_guest6=default_guest6)


# --------------------------------------------------------------------------
# Children: common set-up
# --------------------------------------------------------------------------

def _send_json(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(json.dumps(msg, separators=(",", ":")).encode())


def _reset_close(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the peer sees the connection refused
    rather than a clean, empty reply."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


# --------------------------------------------------------------------------
# The connector (inside the target's namespaces)
# --------------------------------------------------------------------------

def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def connector_main(target: helper_ns.Target, sock: socket.socket) -> int:
    """Join the namespaces, say ready, then answer {"tag","addr","port"}
    requests with {"tag","ok":true} plus the connected fd, or
    {"tag","ok":false,"error"}.  Connects are non-blocking: a slow guest
    port does not hold up the others.  Exits 0 when its peer hangs up."""
    if not helper_ns.enter_namespaces(target):
        _send_json(sock, {"event": "failed", "error": "cannot join the target's namespaces"})
        return 1
    _send_json(sock, {"event": "ready", "pid": os.getpid()})
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    pending: dict[int, tuple[Any, socket.socket, float]] = {}

    def answer(tag: Any, conn: socket.socket | None, error: str = "") -> None:
        if conn is not None:
            fdpass.send_fds(sock, {"tag": tag, "ok": True}, [conn.fileno()])
            conn.close()
        else:
            _send_json(sock, {"tag": tag, "ok": False, "error": error})

    while True:
        now = time.monotonic()
        timeout = None
        if pending:
            timeout = max(0.0, min(d for _, _, d in pending.values()) - now) * 1000
        for fd, _ev in poller.poll(timeout):
            if fd == sock.fileno():
                data = sock.recv(65536)
                if not data:
                    return 0
                req = json.loads(data)
                tag, addr, port = req.get("tag"), req["addr"], int(req["port"])
                conn = socket.socket(_family(addr), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                err = conn.connect_ex((addr, port))
                if err == 0:
                    answer(tag, conn)
                elif err == errno.EINPROGRESS:
                    pending[conn.fileno()] = (tag, conn, time.monotonic() + CONNECT_TIMEOUT)
                    poller.register(conn.fileno(), select.POLLOUT)
                else:
                    conn.close()
                    answer(tag, None, os.strerror(err))
                continue
            tag, conn, _ = pending.pop(fd)
            poller.unregister(fd)
            err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                conn.close()
                answer(tag, None, os.strerror(err))
            else:
                answer(tag, conn)
        now = time.monotonic()
        for fd, (tag, conn, deadline) in list(pending.items()):
            if now >= deadline:
                del pending[fd]
                poller.unregister(fd)
                conn.close()
                answer(tag, None, os.strerror(errno.ETIMEDOUT))


# --------------------------------------------------------------------------
# The relay (host namespace)
# --------------------------------------------------------------------------

def listen(fwd: Forward) -> socket.socket:
    """The host-side listener of a fast-path forward (as libslirp binds its
    own: SO_REUSEADDR; IPv6 only for an IPv6 address)."""
    fam = _family(fwd.host_addr)
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
        from ._relay_cffi import ffi, lib

        self.ffi, self.lib = ffi, lib
        self.log = log.get("nsnet.relay")
        self.ctl = ctl
        self.ctx = lib.relay_new(PIPE_SIZE)
        if self.ctx == ffi.NULL:
            raise OSError(ffi.errno, "relay_new failed")
        self.listeners: dict[int, _Listener] = {}  # by fd
        self.connector: socket.socket | None = None
        self.pending: dict[int, socket.socket] = {}  # tag -> accepted client
        self.next_tag = 1
        self.paused = False  # listeners unwatched: too many pending
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
                return {"ok": False, "error": f"{fwd.host_addr}:{fwd.host_port}: {e.strerror}"}
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
                "listeners": len(self.listeners)}}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _control(self) -> bool:
        """Answer every queued request; False once the supervisor hung up."""
        while True:
            try:
                req, fds = fdpass.recv_fds(self.ctl)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if req is None:
                return False
            try:
                reply = self.handle(req, fds)
            except (KeyError, IndexError, TypeError, ValueError, OSError) as e:
                reply = {"ok": False, "error": str(e)}
            for fd in fds:  # any fd the request did not take
                os.close(fd)
            reply["reply_to"] = req.get("seq")
            try:
                _send_json(self.ctl, reply)
            except OSError:
                return False

    # -- connections ---------------------------------------------------------

    def _drop_connector(self) -> None:
        if self.connector is not None:
            self._unwatch(self.connector.fileno())
            self.connector.close()
            self.connector = None
        for client in self.pending.values():
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
                client, _ = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again next turn
                self.log.warning(f"accept on {lst.fwd.host_addr}:{lst.fwd.host_port}: {e.strerror}")
                return
            if self.connector is None:
                _reset_close(client)
                continue
            tag = self.next_tag
            self.next_tag += 1
            try:
                _send_json(self.connector, {"tag": tag, "addr": lst.fwd.guest_addr,
                                            "port": lst.fwd.guest_port})
            except OSError:
                _reset_close(client)
                self._drop_connector()
                return
            self.pending[tag] = client
        self._pause(True)

    def _connected(self) -> None:
        """Replies from the connector: start relaying, or refuse the client."""
        assert self.connector is not None
        while self.connector is not None:
            try:
                reply, fds = fdpass.recv_fds(self.connector)
            except BlockingIOError:
                break
            except (OSError, ValueError):
                reply, fds = None, []
            if reply is None:  # the connector died; the supervisor sends a new one
                self._drop_connector()
                break
            client = self.pending.pop(reply.get("tag"), None)
            if client is not None and reply.get("ok") and fds:
                rc = self.lib.relay_add(self.ctx, client.detach(), fds.pop(0))
                if rc < 0:
                    self.log.warning(f"relay: cannot relay a connection: {os.strerror(-rc)}")
            elif client is not None:
                _reset_close(client)
            for fd in fds:
                os.close(fd)
        if len(self.pending) < MAX_PENDING // 2:
            self._pause(False)

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

    def serve(self) -> int:
        while True:
            rc = self.lib.relay_run(self.ctx, RELAY_TURN_MS)
            if rc < 0:
                self.log.error(f"relay: epoll_wait: {os.strerror(-rc)}")
                return 4
            if rc == self.lib.RELAY_WAKE and not self.step():
                return 0


def _poll_now(fds: list[int]) -> list[tuple[int, int]]:
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return p.poll(0)


def relay_main(ctl: socket.socket) -> int:
    linux.raise_fd_limit()  # each relayed connection holds 6 fds (2 sockets, 2 pipes)
    return Relay(ctl).serve()


# --------------------------------------------------------------------------
# The supervisor's side
# --------------------------------------------------------------------------

class _Child:
    """A relay (sock: its control socket) or a connector (sock: None; the
    relay holds the socket to it)."""

    def __init__(self, pid: int, sock: socket.socket | None) -> None:
        self.pid = pid
        self.sock = sock
        self.pidfd = os.pidfd_open(pid)
        self.seq = 0

    def kill(self) -> str:
        """SIGKILL (it holds nothing that needs a clean exit) and reap."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        select.select([self.pidfd], [], [], 5.0)
        return self.reap()

    def reap(self) -> str:
        try:
            os.close(self.pidfd)
            if self.sock is not None:
                self.sock.close()
        except OSError:
            pass
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "already reaped"
        return f"status {os.waitstatus_to_exitcode(status)}"


class FastPath:
    """The supervisor's handle on the fast path: nothing runs until the
    first splice forward is added."""

    def __init__(self, target: helper_ns.Target) -> None:
        self.target = target
        self.log = log.get("nsnet.fastpath")
        self.forwards: list[Forward] = []
        self.relay: _Child | None = None
        self.connector: _Child | None = None
        self.deaths: list[float] = []
        self.failed: str | None = None  # gave up restarting: why

    # -- the supervisor's hooks ------------------------------------------------

    def watch(self) -> list[tuple[int, int, Callable[[int], None]]]:
        """(fd, poll events, handler) for the supervisor's poll loop."""
        # Each handler is bound to its child: when the relay dies, its
        # connector exits too, and both pidfds can wake the same poll; by
        # the time the connector's event is handled, the relay's handler
        # has already replaced it, and the event must not touch the new one.
        return [(child.pidfd, select.POLLIN, lambda ev, c=child: self._on_exit(c))
                for child in (self.relay, self.connector) if child is not None]

    def add_initial(self, forwards: list[tuple[int, Forward]]) -> None:
        """Set-up: serve the splice forwards of Options.initial_forwards."""
        for _fid, fwd in forwards:
            if fwd.is_splice:
                self.add(fwd)

    def add(self, fwd: Forward) -> None:
        """Listen and relay; ForwardError (logged) if the port cannot be bound."""
        if not fwd.is_splice or fwd.is_udp:
            raise ForwardError("mode")
        self._ensure_running()
        reply = self._request({"op": "add", "forward": fwd.to_dict()})
        if not reply.get("ok"):
            self.log.warning(f"fast-path forward {fwd.host_addr}:{fwd.host_port}: "
                             f"{reply.get('error')}")
            raise ForwardError(reply.get("error", "failed"))
        self.forwards.append(fwd)

    def remove(self, fwd: Forward) -> None:
        """Close the listener (connections already relayed go on).  Once the
        forward is off self.forwards no relay started later listens on it,
        so a relay that is gone, hung (then killed) or never had the
        listener (not re-added after a restart) leaves nothing to undo."""
        if fwd in self.forwards:
            self.forwards.remove(fwd)
        if self.relay is None:
            return
        try:
            reply = self._request({"op": "remove", "forward": fwd.to_dict()})
        except ForwardError as e:
            self.log.warning(f"fast-path forward {fwd.host_addr}:{fwd.host_port} removed; "
                             f"the relay did not confirm: {e}")
            return
        if not reply.get("ok") and reply.get("error") != NO_SUCH_FORWARD:
            raise ForwardError(reply.get("error", "failed"))

    def stats(self) -> dict[str, Any]:
        if self.relay is None:
            return {}
        return self._request({"op": "stats"}).get("stats", {})

    def close(self) -> None:
        for child in (self.relay, self.connector):
            if child is not None:
                child.kill()
        self.relay = self.connector = None

    # -- processes -------------------------------------------------------------

    def _request(self, msg: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        relay = self.relay
        if relay is None or relay.sock is None:
            raise ForwardError(f"fast path not running: {self.failed or 'relay down'}")
        relay.seq += 1
        msg = dict(msg, seq=relay.seq)
        try:
            if fds:
                fdpass.send_fds(relay.sock, msg, fds)
            else:
                _send_json(relay.sock, msg)
            deadline = time.monotonic() + REQUEST_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("relay did not answer")
                r, _, _ = select.select([relay.sock], [], [], left)
                if not r:
                    continue
                data = relay.sock.recv(65536)
                if not data:
                    raise ConnectionError("relay hung up")
                reply = json.loads(data)
                if reply.get("reply_to") == relay.seq:
                    return reply
        except TimeoutError:
            # Hung (or stopped): as with a forwarder that does not answer,
            # kill it; its pidfd wakes the supervisor's loop, and _on_exit
            # reaps it and starts a new one (within the restart budget).
            self.log.error(f"fast path: the relay (pid {relay.pid}) did not answer in "
                           f"{REQUEST_TIMEOUT:g} s; killing it")
            try:
                os.kill(relay.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise ForwardError(f"relay did not answer in {REQUEST_TIMEOUT:g} s "
                               "(killed; a new one is started)") from None
        except (OSError, ValueError) as e:
            raise ForwardError(f"relay: {e}") from None

    def _ensure_running(self) -> None:
        if self.failed:
            raise ForwardError(f"fast path disabled: {self.failed}")
        fresh = self.relay is None
        if fresh:
            self._start_relay()
        if self.connector is None:
            self._start_connector()
        if fresh:  # a restarted relay: listen again
            for fwd in list(self.forwards):
                reply = self._request({"op": "add", "forward": fwd.to_dict()})
                if not reply.get("ok"):
                    self.log.warning(f"fast-path forward {fwd.host_addr}:{fwd.host_port} could "
                                     f"not be re-added: {reply.get('error')}")

    def _start_connector(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        target = self.target
        pid = fork_child("nsnet-connect", lambda: connector_main(target, theirs), [theirs.fileno()])
        theirs.close()
        child = _Child(pid, mine)
        mine.settimeout(START_TIMEOUT)
        try:
            msg = json.loads(mine.recv(65536) or b"{}")
        except (OSError, ValueError):
            msg = {}
        if msg.get("event") != "ready":
            how = child.kill()
            raise ForwardError(f"connector: {msg.get('error') or 'did not start'} ({how})")
        # The relay talks to it from now on; the supervisor only watches it.
        child.sock = None
        self.connector = child
        try:
            self._request({"op": "connector"}, [mine.fileno()])
        finally:
            mine.close()

    def _start_relay(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = fork_child("nsnet-relay", lambda: relay_main(theirs), [theirs.fileno()])
        theirs.close()
        self.relay = _Child(pid, mine)

    def _on_exit(self, child: _Child) -> None:
        if child is self.relay:
            which = "relay"
        elif child is self.connector:
            which = "connector"
        else:  # already reaped and replaced in this turn
            return
        how = child.reap()
        if which == "relay":
            self.relay = None
            if self.connector is not None:  # it served the dead relay only
                self.connector.kill()
                self.connector = None
        else:
            self.connector = None
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
        if len(self.deaths) > MAX_RESTARTS:
            self.failed = f"the {which} died {len(self.deaths)} times in {RESTART_WINDOW:g} s"
            self.log.error(f"fast path: {self.failed} (last: {how}); giving up")
            self.close()
            return
        self.log.warning(f"fast path: {which} (pid {child.pid}) died ({how}); restarting")
        try:
            self._ensure_running()
        except ForwardError as e:
            self.log.error(f"fast path: restart failed: {e}")
