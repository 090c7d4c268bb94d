"""The supervisor's handle on the forwarder (nsnet/host/forwarder.py): its
control socket, spawning it, and the restart policy (docs/lifecycle.md)."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any

from .. import fdlimit, fdpass
from ..children import fork_child
from ..forwards import ForwardError
from ..ns import helper as helper_ns
from ..proto import forwarder as proto
from ..proto import wire
from ..proto.exitcodes import EXIT_FAILURE, FORWARDER_EXIT_TAP_ERROR
from ..proto.wire import ProtocolError
from .errors import SetupError
from .tasks import Future

FORWARDER_START_TIMEOUT = 10.0
CONTROL_TIMEOUT = 5.0

# Restart policy (docs/lifecycle.md).  A forwarder that was up and serving
# for STABLE_S before it died is restarted at once; one that failed to
# start, or died sooner, is restarted after a back-off that doubles from
# BACKOFF_FIRST_S up to BACKOFF_MAX_S.  Every death counts towards
# --max-restarts within --restart-window, however long the forwarder ran.
STABLE_S = 1.0
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
# Out of fds, a forwarder start is tried again this often (not a failure).
FD_RETRY_S = 0.5


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exit status {os.WEXITSTATUS(status)}"



class _Forwarder:
    """A forwarder child (starting or running), seen from the supervisor.

    Everything it says goes through proto/forwarder.py's checks; a message
    that fails them marks it broken (the supervisor kills it and restarts
    it as a crashed one).  Requests are asynchronous: submit() returns a
    Future that its reply, its death or the request's deadline settles."""

    def __init__(self, pid: int, ctl: socket.socket, started: float) -> None:
        self.pid = pid
        self.ctl = ctl
        self.started = started  # when it was spawned
        self.ready_at: float | None = None  # when it said "ready"
        self.deadline = started + FORWARDER_START_TIMEOUT
        self.ctl_eof = False
        self.broken: str | None = None  # the protocol error that condemned it
        self.seq = 0
        self.events: list[dict[str, Any]] = []  # at most MAX_EVENTS (+ the supervisor's notes)
        self.pending: dict[int, tuple[str, Future, float]] = {}  # seq -> (op, reply, deadline)
        self.queued: list[tuple[dict[str, Any], Future, float]] = []  # until it is ready
        self.status: int | None = None  # wait status once reaped
        # egress-policy audit records: handled as they come, never queued
        self.on_audit: Any = None
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            ctl.close()
            raise

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    def receive(self, block_until: float | None = None) -> dict[str, Any] | None:
        """One checked message from the forwarder, or None (nothing yet, or
        EOF: then ctl_eof is set).  Waits until block_until at most.
        Raises ProtocolError (and marks it broken) for a bad message."""
        if self.ctl_eof or self.broken:
            return None
        if block_until is not None:
            left = max(0.0, block_until - time.monotonic())
            r, _, _ = select.select([self.ctl], [], [], left)
            if not r:
                return None
        try:
            data = self.ctl.recv(proto.MAX_MSG + 1, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self.ctl_eof = True
            return None
        try:
            msg = proto.parse_message(data)
            if msg.get("event") == "audit":  # a stream: handled as it comes, never kept
                if self.on_audit is not None:
                    self.on_audit(msg)
            elif "event" in msg:
                self._count_event(msg)
            else:
                self._match_reply(msg)
        except ProtocolError as e:
            self.broken = str(e)
            raise
        return msg

    def _count_event(self, msg: dict[str, Any]) -> None:
        if len(self.events) >= proto.MAX_EVENTS:
            raise ProtocolError(f"more than {proto.MAX_EVENTS} events")
        if msg["event"] == "ready" and self.ready:
            raise ProtocolError("a second ready event")
        self.events.append(msg)

    def _match_reply(self, reply: dict[str, Any]) -> None:
        entry = self.pending.get(reply["reply_to"])
        if entry is None:
            raise ProtocolError(f"reply to {reply['reply_to']}, which is not pending")
        if any(seq < reply["reply_to"] for seq in self.pending):
            raise ProtocolError(f"reply to {reply['reply_to']} before an earlier request")
        proto.check_reply(reply, entry[0])

    def drain(self) -> None:
        """Keep every event still queued (what it said before dying):
        bounded by the event cap; a bad message ends the draining."""
        while True:
            try:
                msg = self.receive()
            except ProtocolError:
                return
            if msg is None:
                return

    def submit(self, msg: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> Future:
        """Send a request now (ready) or once it is ready (starting); its
        reply settles the Future (ForwardError if it never comes)."""
        fut = Future()
        if self.ready:
            self._send(msg, fut, time.monotonic() + timeout)
        else:
            self.queued.append((msg, fut, time.monotonic() + timeout))
        return fut

    def _send(self, msg: dict[str, Any], fut: Future, deadline: float) -> None:
        self.seq += 1
        fds = msg.get("__fds")  # a request with fds (start_capture's file)
        msg = {k: v for k, v in msg.items() if k != "__fds"}
        try:
            if fds:
                socket.send_fds(self.ctl, [wire.encode(dict(msg, seq=self.seq))], fds)
            else:
                self.ctl.send(wire.encode(dict(msg, seq=self.seq)))
        except OSError as e:
            fut.fail(ForwardError(f"forwarder: {e.strerror or e}"))
            return
        self.pending[self.seq] = (msg["op"], fut, deadline)

    def on_ready(self) -> None:
        """Send what was queued while it started."""
        queued, self.queued = self.queued, []
        for msg, fut, _deadline in queued:
            self._send(msg, fut, time.monotonic() + CONTROL_TIMEOUT)

    def settle(self, reply: dict[str, Any]) -> None:
        _op, fut, _deadline = self.pending.pop(reply["reply_to"])
        fut.resolve(reply)

    def next_deadline(self) -> float | None:
        times = [d for _, _, d in self.pending.values()] + [d for _, _, d in self.queued]
        return min(times) if times else None

    def fail_all(self, why: str) -> None:
        """Its requests will not be answered (it died, hung or broke)."""
        entries = [fut for _, fut, _ in self.pending.values()] + [fut for _, fut, _ in self.queued]
        self.pending.clear()
        self.queued.clear()
        for fut in entries:
            fut.fail(ForwardError(why))

    def error_text(self) -> str:
        return "; ".join(str(e["error"])[:200] for e in self.events if e.get("error"))

    def tap_error(self) -> str | None:
        """What the forwarder claims about the TAP (the supervisor checks
        the TAP itself before believing it: tap_state)."""
        for e in self.events:
            if e.get("event") == "tap_error":
                return str(e.get("error"))
        if (self.status is not None and os.WIFEXITED(self.status)
                and os.WEXITSTATUS(self.status) == FORWARDER_EXIT_TAP_ERROR):
            return "forwarder exit status 3"
        return None

    def close(self) -> None:
        for closer in (self.ctl.close, lambda: os.close(self.pidfd)):
            try:
                closer()
            except OSError:
                pass


TUNGETIFF = 0x800454D2


def tap_state(tap_fd: int) -> str | None:
    """None while the TAP behind tap_fd is attached to its interface; why
    not otherwise (EBADFD once the interface is deleted in the namespace).
    The supervisor's own look at the TAP: it does not take a child's word."""
    try:
        fcntl.ioctl(tap_fd, TUNGETIFF, bytes(40))
    except OSError as e:
        return f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}"
    return None



class ForwarderControl:
    """Supervisor methods that spawn, watch and restart the forwarder
    (mixed into supervisor.core.Supervisor)."""

    # -- the forwarder: spawning -------------------------------------------

    def _spawn_forwarder(self, with_tap: bool = True) -> _Forwarder:
        """Fork a forwarder; raises OSError if the fork or its sockets fail.
        with_tap False: it gets the TAP later over its control socket
        (see _start_first_forwarder)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        tap_fd = self.tap_fd if with_tap else None
        policy = self.policy.forwarder_arg() if self.policy is not None else None
        pcap = (self.pcap_fd, self.pcap_max) if self.pcap_fd >= 0 else None

        def forwarder() -> int:
            # The first forwarder imports its code itself, before any
            # sandboxing: libslirp's cffi module then loads while the
            # namespace helper makes the TAP.  Later ones inherit it
            # (signal_ready imports it into the supervisor).
            from ..host import forwarder as helper_host

            return helper_host.main(self.opts.net, tap_fd, child,
                                    self.forwards.libslirp_items(),
                                    sandbox=self.opts.sandbox, seccomp=self.opts.seccomp,
                                    policy=policy, pcap=pcap)

        keep = [child.fileno()] if tap_fd is None else [tap_fd, child.fileno()]
        if pcap is not None:
            keep.append(self.pcap_fd)  # inherited: the same open file, appended to
        try:
            pid = fork_child("nsnet-forwarder", forwarder, keep)
        except OSError:
            parent.close()
            child.close()
            raise
        child.close()
        try:
            fwd = _Forwarder(pid, parent, time.monotonic())
            if self.policy is not None:
                fwd.on_audit = self.policy.on_audit
            return fwd
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            parent.close()
            raise

    def _start_first_forwarder(self, helper: helper_ns.TapHelper) -> None:
        """The first start is synchronous and must succeed (exit 1 if not,
        as slirp4netns exits 1 when slirp_new fails).  It overlaps the
        namespace helper: the forwarder sets libslirp up while the helper
        makes the TAP, and gets the TAP when it is there."""
        try:
            fwd = self._spawn_forwarder(with_tap=False)
        except OSError as e:
            raise SetupError(f"cannot start the forwarder: {e.strerror or e}") from None
        try:
            self.tap_fd, self.ifindex, self.tap_mac = helper.result()
        except helper_ns.HelperError as e:
            self._stop_forwarder(fwd)
            raise SetupError(str(e)) from None
        try:
            fdpass.send_fds(fwd.ctl, {"op": "tap"}, [self.tap_fd])
        except OSError:
            pass  # it has failed already: its message or exit says why
        fwd.deadline = time.monotonic() + FORWARDER_START_TIMEOUT
        while not fwd.ready and not fwd.ctl_eof and time.monotonic() < fwd.deadline:
            try:
                msg = fwd.receive(block_until=fwd.deadline)
                if msg is None:
                    continue
                self._on_forwarder_message(fwd, msg)
            except ProtocolError as e:
                fwd.events.append({"event": "failed", "error": f"protocol error: {e}"})
                break
            if msg.get("event") == "failed":
                break
        if not fwd.ready:
            self._stop_forwarder(fwd)
            why = fwd.error_text() or (
                _describe_status(fwd.status) if fwd.status is not None else "no answer")
            raise SetupError(f"forwarder failed to start ({why})")
        self.fwd = fwd

    def _on_forwarder_message(self, fwd: _Forwarder, msg: dict[str, Any]) -> None:
        """A checked message (fwd.receive): settle a request, or act on an
        event; ProtocolError if its content does not fit."""
        if "reply_to" in msg:
            fwd.settle(msg)
            return
        if msg["event"] != "ready":
            return
        failed = msg["failed_forwards"]
        for fid in failed:
            if self.forwards.get(fid) is None:
                raise ProtocolError(f"ready: failed_forwards names {fid}, which it was not given")
        fwd.ready_at = time.monotonic()
        fwd.on_ready()
        self.inactive_forwards = set(failed)
        for fid in failed:
            f = self.forwards.get(fid)
            self.log.warning(f"port forward {fid} ({f}) could not be re-added")
        if fwd is not self.fwd or self.outage_since is None:
            return  # the first forwarder
        ms = (fwd.ready_at - self.outage_since) * 1000
        self.outage_since = None
        self.restart_latencies_ms.append(ms)
        self.restarts += 1
        self.log.info(
            f"forwarder restarted (pid {fwd.pid}, {ms:.1f} ms after the last one died, "
            f"{len(self.forwards) - len(failed)} of {len(self.forwards)} forwards re-added, "
            f"restart {self.restarts})",
            extra={"fields": {"event": "forwarder_restarted", "forwarder_pid": fwd.pid,
                              "restart_ms": round(ms, 3), "restarts": self.restarts,
                              "forwards": len(self.forwards),
                              "forwards_failed": len(failed)}})
        self.notify.send(f"STATUS=network ready on {self.opts.tapname}; forwarder restarted "
                         f"({self.restarts} restarts, last took {ms:.0f} ms)")

    def _stop_forwarder(self, fwd: _Forwarder, grace: float = 1.0) -> None:
        """Stop a forwarder (SIGTERM, then SIGKILL), reap it, close its fds."""
        if fwd.status is None:
            try:
                os.kill(fwd.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            r, _, _ = select.select([fwd.pidfd], [], [], grace)
            if not r:
                try:
                    os.kill(fwd.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                select.select([fwd.pidfd], [], [], 5.0)
            self._reap(fwd)
        fwd.drain()
        fwd.fail_all("forwarder: stopped")
        fwd.close()

    def _flush_forwarder(self, fwd: _Forwarder, timeout: float) -> None:
        """Teardown only (the loop is over): a ping, and what the forwarder
        sends before its reply (audit records) handled, for timeout at most."""
        fut = fwd.submit({"op": "ping"}, timeout)
        deadline = time.monotonic() + timeout
        while not fut.done and not fwd.ctl_eof and not fwd.broken:
            if time.monotonic() >= deadline:
                return
            try:
                msg = fwd.receive(block_until=deadline)
                if msg is not None:
                    self._on_forwarder_message(fwd, msg)
            except ProtocolError:
                return

    def _reap(self, fwd: _Forwarder) -> None:
        try:
            _, fwd.status = os.waitpid(fwd.pid, 0)
        except ChildProcessError:
            fwd.status = 0

    # -- the forwarder: deaths and restarts ---------------------------------

    def _on_forwarder_exit(self) -> None:
        fwd = self.fwd
        assert fwd is not None
        self.fwd = None
        now = time.monotonic()
        self._reap(fwd)
        fwd.drain()
        fwd.fail_all("forwarder: hung up")
        fwd.close()
        how = _describe_status(fwd.status or 0)
        # The supervisor looks at the TAP through its own fd; what the
        # forwarder said about it is only a hint.
        gone = tap_state(self.tap_fd)
        if gone is not None:
            self._finish(EXIT_FAILURE,
                         f"TAP {self.opts.tapname} failed ({gone}): the interface is gone "
                         "from the namespace")
            return
        claim = fwd.tap_error()
        if claim is not None:
            self.log.warning(f"forwarder (pid {fwd.pid}) reported a TAP failure ({claim}), "
                             "but the TAP is attached: handled as a crash")
        if self.outage_since is None:
            self.outage_since = now
        if fwd.ready:
            lived = now - fwd.ready_at  # type: ignore[operator]
            why = f"forwarder (pid {fwd.pid}) died ({how}) after {lived:.1f} s"
            if fwd.error_text():
                why += f": {fwd.error_text()}"
            quick = lived < STABLE_S
        else:
            detail = fwd.error_text() or how
            why = f"forwarder (pid {fwd.pid}) failed to start ({detail})"
            quick = True
        self._on_failure(why, quick, now)

    def _on_failure(self, why: str, quick: bool, now: float) -> None:
        """Count a failure; give up, or schedule the next start."""
        window = self.opts.restart_window
        self.failures = [t for t in self.failures if now - t < window] + [now]
        self.last_failure = why
        if len(self.failures) > self.opts.max_restarts:
            self._finish(EXIT_FAILURE,
                         f"forwarder failed {len(self.failures)} times within {window:g} s "
                         f"(--max-restarts={self.opts.max_restarts}); giving up; "
                         f"last failure: {why}")
            return
        if quick:
            delay = 0.0 if self.quick_failures == 0 else min(
                BACKOFF_FIRST_S * 2 ** (self.quick_failures - 1), BACKOFF_MAX_S)
            self.quick_failures += 1
        else:
            delay = 0.0
            self.quick_failures = 0
        self.log.warning(f"{why}; restarting" + (f" in {delay * 1000:.0f} ms" if delay else ""),
                         extra={"fields": {"event": "forwarder_failed", "reason": why,
                                           "restart_delay_ms": round(delay * 1000, 1)}})
        self.restart_at = now + delay

    def _restart_forwarder(self) -> None:
        self.restart_at = None
        try:
            self.fwd = self._spawn_forwarder()
        except OSError as e:
            now = time.monotonic()
            if e.errno in (errno.EMFILE, errno.ENFILE):
                # The supervisor is out of fds (its limit lowered from
                # outside): not the forwarder's failure, and no reason to
                # give up the forward table.  Again until fds are free.
                self._warn_fds(f"cannot start a forwarder: {fdlimit.exhausted(e)}; "
                               f"trying again every {FD_RETRY_S:g} s")
                self.restart_at = now + FD_RETRY_S
                return
            self._on_failure(f"cannot start a forwarder: {e.strerror or e}", True, now)

    MAX_MESSAGES_PER_TURN = 64  # then the loop serves the others

    def _on_forwarder_readable(self) -> None:
        fwd = self.fwd
        if fwd is None:
            return
        for _ in range(self.MAX_MESSAGES_PER_TURN):
            try:
                msg = fwd.receive()
                if msg is None:
                    return
                self._on_forwarder_message(fwd, msg)
            except ProtocolError as e:
                self._forwarder_broken(fwd, str(e))
                return

    def _forwarder_broken(self, fwd: _Forwarder, why: str) -> None:
        """A protocol error: kill it; its pidfd brings the restart, as for
        a crash.  Never an exception in the supervisor."""
        fwd.broken = fwd.broken or why
        self.log.warning(f"forwarder (pid {fwd.pid}) broke the control protocol ({why[:200]}); "
                         "killing it",
                         extra={"fields": {"event": "forwarder_protocol_error",
                                           "forwarder_pid": fwd.pid, "error": why[:200]}})
        fwd.events.append({"event": "failed", "error": f"protocol error: {why[:200]}"})
        fwd.fail_all("forwarder: protocol error")
        try:
            os.kill(fwd.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not fwd.ready:
            fwd.deadline = float("inf")

    def _check_start_timeout(self, now: float) -> None:
        fwd = self.fwd
        if fwd is not None and not fwd.ready and now >= fwd.deadline:
            fwd.events.append({"event": "failed", "error": "not ready within "
                               f"{FORWARDER_START_TIMEOUT:g} s"})
            try:
                os.kill(fwd.pid, signal.SIGKILL)  # its pidfd reports the death
            except ProcessLookupError:
                pass
            fwd.deadline = float("inf")
        if fwd is not None:
            self._check_request_deadlines(fwd, now)

    def _check_request_deadlines(self, fwd: _Forwarder, now: float) -> None:
        late = [m for m in fwd.queued if m[2] <= now]
        if late:
            fwd.queued = [m for m in fwd.queued if m[2] > now]
            for _msg, fut, _deadline in late:
                fut.fail(ForwardError("forwarder not running (starting)"))
        if any(d <= now for _, _, d in fwd.pending.values()):
            # Its loop answers between turns of at most a second: it hangs.
            # Kill it; its pidfd brings the restart.
            self.log.warning(f"forwarder (pid {fwd.pid}) did not answer within "
                             f"{CONTROL_TIMEOUT:g} s; killing it")
            fwd.events.append({"event": "failed", "error": "hung (no answer)"})
            fwd.broken = "hung (no answer)"
            fwd.fail_all("forwarder: did not answer")
            try:
                os.kill(fwd.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _forwarder_request(self, msg: dict[str, Any]) -> Future:
        """A request to the forwarder; the Future settles with its reply
        (a checked dict) or fails with ForwardError.  Never blocks: a
        request while it starts is sent once it is ready."""
        fwd = self.fwd
        if fwd is None:
            raise ForwardError("forwarder not running (restart pending)")
        if fwd.broken:
            raise ForwardError("forwarder not running (being replaced)")
        return fwd.submit(msg)
