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

import json
import os
import select
import signal
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any, Callable

from .. import fdpass, log
from ..children import fork_child
from ..forwards import Forward, ForwardError
from ..host.relay import relay_main
from ..ns import helper as helper_ns
from ..proto.fastpath import NO_SUCH_FORWARD, send_json

START_TIMEOUT = 10.0      # connector: namespaces joined
REQUEST_TIMEOUT = 5.0     # supervisor <-> relay round trip
MAX_RESTARTS = 5          # relay/connector deaths allowed in RESTART_WINDOW
RESTART_WINDOW = 60.0


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

    def __init__(self, ns: helper_ns.NsFds) -> None:
        self.ns = ns  # the target's namespace fds (the supervisor's; kept)
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
                send_json(relay.sock, msg)
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
        try:  # non-dumpable, empty root, no capability, no libslirp: ns/helper.py
            pid = helper_ns.spawn("nsnet-connect", "connector", self.ns, theirs, {})
        except OSError as e:
            mine.close()
            raise ForwardError(f"connector: cannot start: {e.strerror}") from None
        finally:
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
