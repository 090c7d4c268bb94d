"""The fast path for published ports (add_hostfwd "mode":"splice").

libslirp's port forward carries every byte through a user-mode TCP stack
and the TAP.  The fast path skips all of it:

  client --TCP--> listener (host netns, the relay process)
                    | accept; "connect to port P" over a socketpair
                    v
                  connector (stays inside the target's user+net namespaces)
                    | connect(GUEST_ADDR:P) there; the connected fd comes
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
  (helper_ns.spawn: non-dumpable first, through the namespace fds the
  supervisor opened at start, never with libslirp mapped), moves to an
  empty root, drops every capability, and stays there, answering connect
  requests.

The supervisor owns a FastPath object: it starts both children on the first
splice forward, restarts them when they die (the listeners are re-created;
connections relayed by a dead relay are lost), and kills them at teardown.
The trade-off (the server in the namespace sees the namespace's own
address as peer, not the client's) is documented in docs/fastpath.md.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any, Callable, Generator

from .. import fdpass, log
from ..children import fork_child
from ..forwards import Forward, ForwardError
from ..host.relay import relay_main
from ..ns import helper as helper_ns
from ..proto import fastpath as proto
from ..proto.fastpath import NO_SUCH_FORWARD
from ..proto.wire import MAX_MSG, ProtocolError
from .tasks import Future, run_task

START_TIMEOUT = 10.0      # connector: namespaces joined
REQUEST_TIMEOUT = 5.0     # supervisor <-> relay round trip
MAX_RESTARTS = 5          # relay/connector deaths allowed in RESTART_WINDOW
RESTART_WINDOW = 60.0
MAX_MESSAGES_PER_TURN = 64


def _recv(sock: socket.socket) -> bytes | None:
    """One message (b"" at EOF or on an error), None if none is queued; one
    byte more than a message may have, so that an oversized one is seen."""
    try:
        return sock.recv(MAX_MSG + 1, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class _Child:
    """A relay (sock: its control socket), a connector (sock: None once the
    relay holds the socket to it), or a connector that is starting (sock:
    the socket its first message comes on; started: settled by it)."""

    def __init__(self, pid: int, sock: socket.socket | None) -> None:
        self.pid = pid
        self.sock = sock
        self.sock_eof = False
        self.pidfd = os.pidfd_open(pid)
        self.seq = 0
        self.pending: dict[int, tuple[str, Future, float]] = {}  # relay: seq -> request
        self.started: Future | None = None      # connector: its first message
        self.start_deadline = float("inf")
        self.killed = False

    def kill(self) -> str:
        """SIGKILL (it holds nothing that needs a clean exit) and reap."""
        self.signal_kill()
        select.select([self.pidfd], [], [], 5.0)
        return self.reap()

    def signal_kill(self) -> None:
        self.killed = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

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

    def fail_all(self, why: str) -> None:
        pending = [fut for _, fut, _ in self.pending.values()]
        self.pending.clear()
        for fut in pending:
            fut.fail(ForwardError(why))
        if self.started is not None:
            self.started.fail(ForwardError(why))


class FastPath:
    """The supervisor's handle on the fast path: nothing runs until the
    first splice forward is added.  Requests to the relay never block the
    supervisor's loop: they are tasks (supervisor/tasks.py) whose Futures
    the relay's replies, its death or a deadline settle; the supervisor
    polls watch(), and calls check(now) by deadline()."""

    def __init__(self, ns: helper_ns.NsFds, sandbox: bool = False,
                 seccomp: bool = False) -> None:
        self.ns = ns  # the target's namespace fds (the supervisor's; kept)
        # --enable-sandbox / --enable-seccomp confine the relay and the
        # connector too (nsnet/sandbox.py, nsnet/seccomp.py profiles)
        self.sandbox = sandbox
        self.seccomp = seccomp
        self.log = log.get("nsnet.fastpath")
        self.forwards: list[Forward] = []
        self.relay: _Child | None = None
        self.connector: _Child | None = None
        self.starting_connector: _Child | None = None
        self.starting: Future | None = None  # _ensure_running in progress
        self.deaths: list[float] = []
        self.failed: str | None = None  # gave up restarting: why

    # -- the supervisor's hooks ------------------------------------------------

    def watch(self) -> list[tuple[int, int, Callable[[int], None]]]:
        """(fd, poll events, handler) for the supervisor's poll loop."""
        # Each handler is bound to its child: when the relay dies, its
        # connector exits too, and both pidfds can wake the same poll; by
        # the time the connector's event is handled, the relay's handler
        # has already replaced it, and the event must not touch the new one.
        out = [(child.pidfd, select.POLLIN, lambda ev, c=child: self._on_exit(c))
               for child in (self.relay, self.connector, self.starting_connector)
               if child is not None]
        relay = self.relay
        if relay is not None and relay.sock is not None and not relay.sock_eof:
            out.append((relay.sock.fileno(), select.POLLIN,
                        lambda ev, c=relay: self._on_relay_readable(c)))
        conn = self.starting_connector
        if conn is not None and conn.sock is not None and not conn.sock_eof:
            out.append((conn.sock.fileno(), select.POLLIN,
                        lambda ev, c=conn: self._on_connector_start(c)))
        return out

    def deadline(self) -> float | None:
        times = []
        if self.relay is not None:
            times += [d for _, _, d in self.relay.pending.values()]
        if self.starting_connector is not None:
            times.append(self.starting_connector.start_deadline)
        return min(times) if times else None

    def check(self, now: float) -> None:
        relay = self.relay
        if relay is not None and any(d <= now for _, _, d in relay.pending.values()):
            # Hung (or stopped): as with a forwarder that does not answer,
            # kill it; its pidfd wakes the supervisor's loop, and _on_exit
            # reaps it and starts a new one (within the restart budget).
            self.log.error(f"fast path: the relay (pid {relay.pid}) did not answer in "
                           f"{REQUEST_TIMEOUT:g} s; killing it")
            relay.signal_kill()
            relay.fail_all(f"relay did not answer in {REQUEST_TIMEOUT:g} s "
                           "(killed; a new one is started)")
        conn = self.starting_connector
        if conn is not None and now >= conn.start_deadline:
            conn.signal_kill()
            conn.start_deadline = float("inf")
            if conn.started is not None:
                conn.started.fail(ForwardError(f"connector: not ready in {START_TIMEOUT:g} s"))

    def add_initial(self, forwards: list[tuple[int, Forward]]) -> None:
        """Set-up (before the supervisor's loop runs): serve the splice
        forwards of Options.initial_forwards, waiting here."""
        for _fid, fwd in forwards:
            if fwd.is_splice:
                self.run_blocking(self.add(fwd))

    def add(self, fwd: Forward) -> Generator[Any, Any, None]:
        """Listen and relay (a task); ForwardError (logged) if the port
        cannot be bound."""
        if not fwd.is_splice or fwd.is_udp:
            raise ForwardError("mode")
        yield from self._ensure_running()
        reply = yield self._request({"op": "add", "forward": fwd.to_dict()})
        if not reply["ok"]:
            self.log.warning(f"fast-path forward {fwd.host_addr}:{fwd.host_port}: "
                             f"{reply['error']}")
            raise ForwardError(reply["error"])
        self.forwards.append(fwd)

    def remove(self, fwd: Forward) -> Generator[Any, Any, None]:
        """Close the listener (connections already relayed go on).  Once the
        forward is off self.forwards no relay started later listens on it,
        so a relay that is gone, hung (then killed) or never had the
        listener (not re-added after a restart) leaves nothing to undo."""
        if fwd in self.forwards:
            self.forwards.remove(fwd)
        if self.relay is None:
            return
        try:
            reply = yield self._request({"op": "remove", "forward": fwd.to_dict()})
        except ForwardError as e:
            self.log.warning(f"fast-path forward {fwd.host_addr}:{fwd.host_port} removed; "
                             f"the relay did not confirm: {e}")
            return
        if not reply["ok"] and reply["error"] != NO_SUCH_FORWARD:
            raise ForwardError(reply["error"])

    def stats(self) -> Generator[Any, Any, dict[str, Any]]:
        if self.relay is None:
            return {}
        reply = yield self._request({"op": "stats"})
        return reply.get("stats", {})  # type: ignore[no-any-return]

    def close(self) -> None:
        self.failed = self.failed or "nsnet is stopping"  # no restart from here on
        for child in (self.relay, self.connector, self.starting_connector):
            if child is not None:
                child.kill()
                child.fail_all("fast path: nsnet is stopping")
        self.relay = self.connector = self.starting_connector = None

    def run_blocking(self, task: Generator[Any, Any, Any]) -> Any:
        """Run a task to its end with a poll loop of the fast path's own
        (set-up only: the supervisor's loop does not run yet)."""
        out: list[tuple[Any, BaseException | None]] = []
        run_task(task, lambda v, e: out.append((v, e)))
        while not out:
            handlers = {fd: fn for fd, _ev, fn in self.watch()}
            p = select.poll()
            for fd in handlers:
                p.register(fd, select.POLLIN)
            d = self.deadline()
            timeout = None if d is None else max(0.0, d - time.monotonic()) * 1000
            for fd, ev in p.poll(timeout):
                fn = handlers.get(fd)
                if fn is not None and not out:
                    fn(ev)
            self.check(time.monotonic())
        value, error = out[0]
        if error is not None:
            raise error
        return value

    # -- requests to the relay -------------------------------------------------

    def _request(self, msg: dict[str, Any], fds: list[int] | None = None) -> Future:
        """Send a request to the relay now; its reply settles the Future."""
        fut = Future()
        relay = self.relay
        if relay is None or relay.sock is None or relay.killed:
            fut.fail(ForwardError(f"fast path not running: {self.failed or 'relay down'}"))
            return fut
        relay.seq += 1
        msg = dict(msg, seq=relay.seq)
        try:
            if fds:
                fdpass.send_fds(relay.sock, msg, fds)
            else:
                proto.send_json(relay.sock, msg)
        except OSError as e:
            fut.fail(ForwardError(f"relay: {e.strerror or e}"))
            return fut
        relay.pending[relay.seq] = (msg["op"], fut, time.monotonic() + REQUEST_TIMEOUT)
        return fut

    def _on_relay_readable(self, relay: _Child) -> None:
        if relay is not self.relay or relay.sock is None:
            return
        for _ in range(MAX_MESSAGES_PER_TURN):
            data = _recv(relay.sock)
            if data is None:
                return
            if not data:
                relay.sock_eof = True  # it is dying: its pidfd says so
                relay.fail_all("relay: hung up")
                return
            try:
                seq = min(relay.pending) if relay.pending else None
                if seq is None:
                    raise ProtocolError("a message with no request pending")
                reply = proto.parse_relay_reply(data, relay.pending[seq][0])
                if reply["reply_to"] != seq:
                    raise ProtocolError(f"reply to {reply['reply_to']}, expected {seq}")
            except ProtocolError as e:
                self.log.error(f"fast path: the relay (pid {relay.pid}) broke its protocol "
                               f"({str(e)[:200]}); killing it")
                relay.signal_kill()
                relay.fail_all(f"relay: protocol error ({str(e)[:200]})")
                return
            _op, fut, _deadline = relay.pending.pop(seq)
            fut.resolve(reply)

    # -- processes -------------------------------------------------------------

    def _ensure_running(self) -> Generator[Any, Any, None]:
        if self.failed:
            raise ForwardError(f"fast path disabled: {self.failed}")
        if self.starting is not None:  # another request is starting it
            yield self.starting
            return
        if self.relay is not None and self.connector is not None:
            return
        starting = self.starting = Future()
        try:
            yield from self._start()
        except ForwardError as e:
            self.starting = None
            starting.fail(e)
            raise
        self.starting = None
        starting.resolve(None)

    def _start(self) -> Generator[Any, Any, None]:
        fresh = self.relay is None
        if fresh:
            self._start_relay()
        if self.connector is None:
            yield from self._start_connector()
        if fresh:  # a restarted relay: listen again
            for fwd in list(self.forwards):
                reply = yield self._request({"op": "add", "forward": fwd.to_dict()})
                if not reply["ok"]:
                    self.log.warning(f"fast-path forward {fwd.host_addr}:{fwd.host_port} could "
                                     f"not be re-added: {reply['error']}")

    def _start_connector(self) -> Generator[Any, Any, None]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:  # non-dumpable, empty root, no capability, no libslirp: ns/helper.py
            pid = helper_ns.spawn("nsnet-connect", "connector", self.ns, theirs,
                                   {"seccomp": self.seccomp})
        except OSError as e:
            mine.close()
            raise ForwardError(f"connector: cannot start: {e.strerror or e}") from None
        finally:
            theirs.close()
        child = _Child(pid, mine)
        child.started = Future()
        child.start_deadline = time.monotonic() + START_TIMEOUT
        self.starting_connector = child
        try:
            yield child.started
        except ForwardError as e:
            if self.starting_connector is child:
                self.starting_connector = None
                how = child.kill()
            else:
                how = "exited"
            raise ForwardError(f"{e} ({how})") from None
        # The relay talks to it from now on; the supervisor only watches it.
        self.starting_connector = None
        child.sock = None
        child.started = None
        self.connector = child
        try:
            fut = self._request({"op": "connector"}, [mine.fileno()])
        finally:
            mine.close()
        yield fut

    def _on_connector_start(self, child: _Child) -> None:
        """The starting connector's first message: ready, or why not."""
        if child is not self.starting_connector or child.sock is None or child.started is None:
            return
        data = _recv(child.sock)
        if data is None:
            return
        if not data:
            child.sock_eof = True
            child.started.fail(ForwardError("connector: did not start"))
            return
        try:
            msg = proto.parse_connector_start(data)
        except ProtocolError as e:
            child.started.fail(ForwardError(f"connector: protocol error ({str(e)[:200]})"))
            return
        if msg["event"] != "ready":
            child.started.fail(ForwardError(f"connector: {msg['error']}"))
            return
        child.started.resolve(msg)

    def _start_relay(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sandbox, seccomp = self.sandbox, self.seccomp
        try:
            pid = fork_child("nsnet-relay", lambda: relay_main(theirs, sandbox, seccomp),
                             [theirs.fileno()])
        except OSError as e:
            mine.close()
            raise ForwardError(f"relay: cannot start: {e.strerror or e}") from None
        finally:
            theirs.close()
        self.relay = _Child(pid, mine)

    def _on_exit(self, child: _Child) -> None:
        if child is self.starting_connector:
            self.starting_connector = None
            how = child.reap()
            if child.started is not None:
                child.started.fail(ForwardError(f"connector: did not start ({how})"))
            return
        if child is self.relay:
            which = "relay"
        elif child is self.connector:
            which = "connector"
        else:  # already reaped and replaced in this turn
            return
        how = child.reap()
        child.fail_all(f"{which}: died ({how})")
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

        def restarted(_value: Any, error: BaseException | None) -> None:
            if error is not None:
                self.log.error(f"fast path: restart failed: {error}")

        run_task(self._ensure_running(), restarted)
