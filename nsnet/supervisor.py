"""The supervisor: nsnet's lifecycle.

The `nsnet` process is the supervisor.  It runs the namespace helper once
and keeps the TAP fd; it runs the forwarder (helper_host) as a child that
gets the TAP fd; it owns the API socket and the canonical port-forward
table, so both outlive any one forwarder.  One poll loop, no sleeps: every
wait is a poll(2) on an fd (signal wakeup pipe, exit-fd, target pidfd,
forwarder pidfd and control socket, API sockets) with a timeout that is
the nearest deadline (a restart back-off, a start timeout, an API client's
deadline, the next watchdog ping).

  event                       action                                 exit
  exit-fd POLLHUP/ERR/NVAL    tear down                              0
  SIGTERM, SIGINT, SIGHUP     tear down                              0
  target PID exits            tear down (not with --ignore-target-exit) 0
  forwarder dies              new forwarder on the same TAP fd,
                              every forward re-added with its id     -
  more than --max-restarts
  forwarder failures within
  --restart-window seconds    tear down                              1
  TAP gone                    tear down                              1

docs/lifecycle.md has the full table and the restart policy.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import signal
import socket
import stat
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any, Callable

    from .fastpath import FastPath

from . import api, fdpass, helper_ns, log, sdnotify
from .children import fork_child
from .forwards import Forward, ForwardError, ForwardTable
from .netconfig import NetConfig, slaac_address

EXIT_OK = 0
EXIT_FAILURE = 1

# The forwarder's exit status when its TAP fails (helper_host.EXIT_TAP_ERROR;
# not imported: helper_host pulls in the cffi module).
FORWARDER_EXIT_TAP_ERROR = 3

FORWARDER_START_TIMEOUT = 10.0
CONTROL_TIMEOUT = 5.0
API_CLIENT_TIMEOUT = 5.0
API_DRAIN_LIMIT = 1 << 20

# Restart policy (docs/lifecycle.md).  A forwarder that was up and serving
# for STABLE_S before it died is restarted at once; one that failed to
# start, or died sooner, is restarted after a back-off that doubles from
# BACKOFF_FIRST_S up to BACKOFF_MAX_S.  Every death counts towards
# --max-restarts within --restart-window, however long the forwarder ran.
STABLE_S = 1.0
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0

POLL_IN = select.POLLIN
POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
TERM_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _median(values: list[float]) -> float:
    """statistics.median, without its 3 ms import on the path to ready."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


class SetupError(RuntimeError):
    """Setup failed; the message says why (exit 1)."""


class Options:
    """What to supervise and how (cli.py and run.py fill it in).

    on_ready is called in the supervisor once the network is ready (nsnet
    run uses it); watch_fds are extra fds for the poll loop, fd ->
    handler(revents) (nsnet run's signalfd).  A plain class: importing
    dataclasses costs ~10 ms on the path to ready."""

    def __init__(
        self,
        target: helper_ns.Target,
        tapname: str,
        net: NetConfig,
        *,
        configure: bool = False,
        exit_fd: int | None = None,
        ready_fd: int | None = None,
        api_socket: str | None = None,
        exit_with_target: bool = True,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        pidfile: str | None = None,
        sandbox: bool = False,
        seccomp: bool = False,
        initial_forwards: list[Forward] | None = None,
        on_ready: Callable[[Supervisor], None] | None = None,
        watch_fds: dict[int, Callable[[int], None]] | None = None,
    ) -> None:
        self.target = target
        self.tapname = tapname
        self.net = net
        self.configure = configure
        self.exit_fd = exit_fd
        self.ready_fd = ready_fd
        self.api_socket = api_socket
        self.exit_with_target = exit_with_target
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.pidfile = pidfile
        self.sandbox = sandbox
        self.seccomp = seccomp
        self.initial_forwards = initial_forwards if initial_forwards is not None else []
        self.on_ready = on_ready
        self.watch_fds = watch_fds if watch_fds is not None else {}


class _ApiClient:
    """One connection to the API socket, until it is answered or expires."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.answered = False
        self.drained = 0


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
    """A forwarder child (starting or running), seen from the supervisor."""

    def __init__(self, pid: int, ctl: socket.socket, started: float) -> None:
        self.pid = pid
        self.ctl = ctl
        self.started = started  # when it was spawned
        self.ready_at: float | None = None  # when it said "ready"
        self.deadline = started + FORWARDER_START_TIMEOUT
        self.ctl_eof = False
        self.seq = 0
        self.events: list[dict[str, Any]] = []
        self.status: int | None = None  # wait status once reaped
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            ctl.close()
            raise

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    def receive(self, block_until: float | None = None) -> dict[str, Any] | None:
        """One message from the forwarder, or None (nothing yet, or EOF:
        then ctl_eof is set).  Waits until block_until at most."""
        if self.ctl_eof:
            return None
        if block_until is not None:
            left = max(0.0, block_until - time.monotonic())
            r, _, _ = select.select([self.ctl], [], [], left)
            if not r:
                return None
        try:
            data = self.ctl.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self.ctl_eof = True
            return None
        try:
            msg = json.loads(data)
        except ValueError:
            msg = {"event": "garbage"}
        return msg if isinstance(msg, dict) else {"event": "garbage"}

    def drain(self) -> None:
        """Keep every event still queued (what it said before dying)."""
        while True:
            msg = self.receive()
            if msg is None:
                return
            self.events.append(msg)

    def request(self, msg: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        """One request/reply round trip over the control socket."""
        self.seq += 1
        msg = dict(msg, seq=self.seq)
        self.ctl.send(json.dumps(msg).encode())
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() >= deadline:
                raise TimeoutError("forwarder did not answer")
            reply = self.receive(block_until=deadline)
            if reply is None:
                if self.ctl_eof:
                    raise ConnectionError("forwarder hung up")
                continue
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("reply_to") == self.seq:
                return reply

    def error_text(self) -> str:
        return "; ".join(str(e["error"]) for e in self.events if e.get("error"))

    def tap_error(self) -> str | None:
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


class Supervisor:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.log = log.get("nsnet.supervisor")
        self.forwards = ForwardTable()
        self.tap_fd = -1
        self.ifindex = 0
        self.tap_mac: bytes | None = None
        self.fwd: _Forwarder | None = None
        self.restarts = 0  # forwarders started after the first one
        self.failures: list[float] = []  # forwarder deaths and failed starts
        self.quick_failures = 0  # consecutive, for the back-off
        self.last_failure = ""
        self.restart_at: float | None = None  # a restart waiting for its back-off
        self.outage_since: float | None = None  # when the last forwarder died
        self.restart_latencies_ms: list[float] = []
        self.inactive_forwards: set[int] = set()  # ids the forwarder could not re-add
        self.started = time.monotonic()
        self.api_sock: socket.socket | None = None
        self.api_ino: tuple[int, int] | None = None
        self.api_clients: dict[int, _ApiClient] = {}
        self.target_pidfd: int | None = None
        self.sigpipe_r = -1
        self.sigpipe_w = -1
        self.pending_signal: int | None = None
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.exit_since: float | None = None  # when the exit event was seen
        self.notify = sdnotify.Notifier.from_env()
        self.ready = False
        self.pidfile_written = False
        self.fastpath: FastPath | None = None  # splice forwards, from the first one on
        # get_stats sections of other parts (nsnet run --bypass: "bypass")
        self.stats_sources: dict[str, Callable[[], dict[str, Any]]] = {}

    # -- set-up ------------------------------------------------------------

    def setup(self) -> None:
        o = self.opts
        self._install_signals()
        if o.target.pid is not None:
            try:
                self.target_pidfd = os.pidfd_open(o.target.pid)
            except ProcessLookupError:
                raise SetupError(f"target PID {o.target.pid} does not exist") from None
            except OSError:
                self.target_pidfd = None  # e.g. not permitted: namespaces decide
        # The namespace helper creates the TAP while this process binds the
        # API socket and starts the forwarder, which loads libslirp, sets it
        # up and then waits for the TAP.
        helper = helper_ns.TapHelper(o.target, o.tapname, o.net, o.configure)
        try:
            if o.api_socket:
                self._bind_api(o.api_socket)
            for f in o.initial_forwards:
                self.forwards.add(f)
            self._start_first_forwarder(helper)
        finally:
            helper.reap()
        try:  # fast-path (splice) forwards: nsnet/fastpath.py
            if any(f.is_splice for _, f in self.forwards.items()):
                self._fastpath().add_initial(self.forwards.items())
        except ForwardError as e:
            raise SetupError(f"cannot publish a port: {e}") from None
        if o.pidfile:
            self._write_pidfile(o.pidfile)

    def _fastpath(self) -> FastPath:
        """The fast path (nsnet/fastpath.py), imported and created when the
        first splice forward needs it: not on the path to ready."""
        if self.fastpath is None:
            from .fastpath import FastPath

            self.fastpath = FastPath(self.opts.target)
        return self.fastpath

    def _bind_api(self, path: str) -> None:
        if len(path.encode()) >= 108:
            raise SetupError(f"API socket path too long ({len(path.encode())} bytes, max 107)")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise SetupError(f"API socket path {path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # stale socket of a dead process
            except OSError as e:
                raise SetupError(f"API socket {path}: {e.strerror}") from None
            else:
                raise SetupError(f"API socket {path} is in use by another process")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600: only the invoking user may talk to it
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise SetupError(f"cannot bind API socket {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        sock.listen(1024)  # bursts of clients wait in the queue, not EAGAIN
        sock.setblocking(False)
        st = os.lstat(path)  # never follow a symlink swapped in after bind
        self.api_sock = sock
        self.api_ino = (st.st_dev, st.st_ino)

    def _install_signals(self) -> None:
        """Termination signals only set a flag and wake the poll loop (the
        wakeup fd); they are installed first, so a SIGTERM during set-up
        still ends in a clean teardown."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sigpipe_r, self.sigpipe_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

        def on_signal(signum: int, _frame: object) -> None:
            if self.pending_signal is None:
                self.pending_signal = signum

        for s in TERM_SIGNALS:
            signal.signal(s, on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _write_pidfile(self, path: str) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise SetupError(f"cannot write pidfile {path}: {e.strerror}") from None
        self.pidfile_written = True

    def _remove_pidfile(self) -> None:
        path = self.opts.pidfile
        if not path or not self.pidfile_written:
            return
        try:
            with open(path) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(path)
        except OSError:
            pass

    # -- the forwarder: spawning -------------------------------------------

    def _spawn_forwarder(self, with_tap: bool = True) -> _Forwarder:
        """Fork a forwarder; raises OSError if the fork or its sockets fail.
        with_tap False: it gets the TAP later over its control socket
        (see _start_first_forwarder)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        tap_fd = self.tap_fd if with_tap else None

        def forwarder() -> int:
            # The first forwarder imports its code itself, before any
            # sandboxing: libslirp's cffi module then loads while the
            # namespace helper makes the TAP.  Later ones inherit it
            # (signal_ready imports it into the supervisor).
            from . import helper_host

            return helper_host.main(self.opts.net, tap_fd, child,
                                    self.forwards.libslirp_items(),
                                    sandbox=self.opts.sandbox, seccomp=self.opts.seccomp)

        keep = [child.fileno()] if tap_fd is None else [tap_fd, child.fileno()]
        try:
            pid = fork_child("nsnet-forwarder", forwarder, keep)
        except OSError:
            parent.close()
            child.close()
            raise
        child.close()
        try:
            return _Forwarder(pid, parent, time.monotonic())
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
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
            msg = fwd.receive(block_until=fwd.deadline)
            if msg is None:
                continue
            self._on_forwarder_message(fwd, msg)
            if msg.get("event") == "failed":
                break
        if not fwd.ready:
            self._stop_forwarder(fwd)
            why = fwd.error_text() or (
                _describe_status(fwd.status) if fwd.status is not None else "no answer")
            raise SetupError(f"forwarder failed to start ({why})")
        self.fwd = fwd

    def _on_forwarder_message(self, fwd: _Forwarder, msg: dict[str, Any]) -> None:
        fwd.events.append(msg)
        if msg.get("event") != "ready" or fwd.ready:
            return
        fwd.ready_at = time.monotonic()
        failed = msg.get("failed_forwards", [])
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
        fwd.close()

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
        fwd.close()
        how = _describe_status(fwd.status or 0)
        tap = fwd.tap_error()
        if tap is not None:
            self._finish(EXIT_FAILURE,
                         f"TAP {self.opts.tapname} failed ({tap}): the interface is gone "
                         "from the namespace")
            return
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
            self._on_failure(f"cannot start a forwarder: {e.strerror or e}", True,
                             time.monotonic())

    def _on_forwarder_readable(self) -> None:
        fwd = self.fwd
        if fwd is None:
            return
        msg = fwd.receive()
        if msg is not None:
            self._on_forwarder_message(fwd, msg)

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

    def _ready_forwarder(self) -> _Forwarder:
        """The running forwarder for an API request.  If one is starting,
        wait for it (bounded): a request during a restart is answered once
        the new forwarder is up."""
        fwd = self.fwd
        if fwd is None:
            raise ForwardError("forwarder not running (restart pending)")
        while not fwd.ready and not fwd.ctl_eof and time.monotonic() < fwd.deadline:
            msg = fwd.receive(block_until=min(fwd.deadline, time.monotonic() + CONTROL_TIMEOUT))
            if msg is not None:
                self._on_forwarder_message(fwd, msg)
        if not fwd.ready:
            raise ForwardError("forwarder not running (starting)")
        return fwd

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

    def _forwarder_request(self, msg: dict[str, Any]) -> dict[str, Any]:
        fwd = self._ready_forwarder()
        try:
            return fwd.request(msg)
        except TimeoutError:
            # Its loop answers between turns of at most a second: it hangs.
            # Kill it; its pidfd brings the restart.
            self.log.warning(f"forwarder (pid {fwd.pid}) did not answer within "
                             f"{CONTROL_TIMEOUT:g} s; killing it")
            fwd.events.append({"event": "failed", "error": "hung (no answer)"})
            try:
                os.kill(fwd.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise ForwardError("forwarder: did not answer") from None
        except (OSError, ValueError) as e:
            raise ForwardError(f"forwarder: {e}") from None

    def api_add_forward(self, fwd: Forward) -> int:
        if fwd.is_splice:  # the fast path: nsnet/fastpath.py
            self._fastpath().add(fwd)
            return self.forwards.add(fwd)
        reply = self._forwarder_request({"op": "add", "forward": fwd.to_dict()})
        if not reply.get("ok"):
            raise ForwardError(reply.get("error", "failed"))
        fid = self.forwards.add(fwd)
        self.log.debug(f"forward {fid} added: {fwd}")
        return fid

    def api_remove_forward(self, fid: int) -> None:
        fwd = self.forwards.get(fid)
        if fwd is None:
            raise KeyError(fid)
        if fwd.is_splice:  # the fast path: nsnet/fastpath.py
            self._fastpath().remove(fwd)
            self.forwards.remove(fid)
            return
        if fid not in self.inactive_forwards:  # else libslirp does not have it
            reply = self._forwarder_request({"op": "remove", "forward": fwd.to_dict()})
            if not reply.get("ok"):
                raise ForwardError(reply.get("error", "failed"))
        self.inactive_forwards.discard(fid)
        self.forwards.remove(fid)

    def api_list_forwards(self) -> list[tuple[int, Forward]]:
        return self.forwards.items()

    def _forwarder_state(self) -> str:
        if self.fwd is not None:
            return "running" if self.fwd.ready else "starting"
        return "restarting" if self.restart_at is not None else "stopped"

    def api_info(self, interface: bool = False) -> dict[str, Any]:
        from . import __version__, slirp

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
            try:
                info["interface"] = helper_ns.describe_interface(self.opts.target,
                                                                 self.opts.tapname)
            except helper_ns.HelperError as e:
                info["interface"] = {"error": str(e)}
        return info

    def api_stats(self) -> dict[str, Any]:
        try:
            reply = self._forwarder_request({"op": "stats"})
        except ForwardError as e:
            raise api.ApiError(f"get_stats: {e}") from None
        if not reply.get("ok"):
            raise api.ApiError(f"get_stats: {reply.get('error', 'failed')}")
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
        if self.fastpath is not None:  # splice forwards: the relay's own counters
            try:
                out["fastpath"] = self.fastpath.stats()
            except ForwardError as e:
                out["fastpath"] = {"error": str(e)}
        return out

    # -- API socket handling (non-blocking, in the poll loop) --------------

    def _api_accept(self) -> None:
        assert self.api_sock is not None
        while True:
            try:
                conn, _ = self.api_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self.log.warning(f"API: cannot accept: {e.strerror}")
                return
            conn.setblocking(False)
            self.api_clients[conn.fileno()] = _ApiClient(conn, time.monotonic() + API_CLIENT_TIMEOUT)

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
        if eof or len(c.buf) >= api.MAX_REQUEST or api.is_complete(bytes(c.buf)):
            self._api_answer(fd, bytes(c.buf), eof)

    def _api_answer(self, fd: int, request: bytes, eof: bool) -> None:
        c = self.api_clients[fd]
        try:
            reply = api.handle(request, self)
        except Exception as e:  # a bug must not take the network down
            self.log.error(f"API: internal error answering {request[:200]!r}: {e!r}")
            reply = api.error_reply(f"internal error: {e}")
        c.answered = True
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
        if c is not None:
            try:
                c.sock.close()
            except OSError:
                pass

    def _api_expire(self, now: float) -> None:
        for fd, c in list(self.api_clients.items()):
            if now >= c.deadline:
                if not c.answered and c.buf:
                    self._api_answer(fd, bytes(c.buf), True)
                self._api_close(fd)

    # -- main loop ---------------------------------------------------------

    def signal_ready(self) -> None:
        o = self.opts
        if o.ready_fd is not None:
            try:
                os.write(o.ready_fd, b"1")
            except OSError as e:
                self.log.warning(f"ready-fd {o.ready_fd}: {e.strerror}")
            try:
                os.close(o.ready_fd)
            except OSError:
                pass
            o.ready_fd = None
        self.ready = True
        self.notify.send(f"READY=1\nSTATUS=network ready on {o.tapname}\nMAINPID={os.getpid()}")
        if o.on_ready is not None:
            o.on_ready(self)
        # Restarted forwarders are forked from this process: load their
        # code now, off the path to ready, so that a restart runs the code
        # this supervisor started with even if the package is replaced.
        from . import helper_host  # noqa: F401

    def _finish(self, code: int, reason: str) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.exit_reason = reason
            self.exit_since = time.monotonic()

    def loop(self) -> int:
        o = self.opts
        if o.exit_fd is not None:
            try:
                os.fstat(o.exit_fd)
            except OSError:
                self._finish(EXIT_OK, f"exit-fd {o.exit_fd} is not open")
        self._drain_signals()  # one that came during set-up
        watchdog = self.notify.watchdog_interval()
        next_ping = time.monotonic() if watchdog else None
        while self.exit_code is None:
            poller = select.poll()
            handlers: dict[int, Callable[[int], None]] = {}

            def watch(fd: int, events: int, fn: Callable[[int], None]) -> None:
                poller.register(fd, events)
                handlers[fd] = fn

            watch(self.sigpipe_r, POLL_IN, lambda ev: self._drain_signals())
            for fd, fn in o.watch_fds.items():
                watch(fd, POLL_IN, fn)
            if o.exit_fd is not None:
                # events=0: only POLLHUP/POLLERR/POLLNVAL, as slirp4netns
                watch(o.exit_fd, 0, lambda ev: self._finish(EXIT_OK, "exit-fd closed"))
            if self.target_pidfd is not None and o.exit_with_target:
                watch(self.target_pidfd, POLL_IN,
                      lambda ev: self._finish(EXIT_OK, f"target PID {o.target.pid} exited"))
            fwd = self.fwd
            if fwd is not None:
                watch(fwd.pidfd, POLL_IN, lambda ev: self._on_forwarder_exit())
                if not fwd.ready and not fwd.ctl_eof:
                    watch(fwd.ctl.fileno(), POLL_IN, lambda ev: self._on_forwarder_readable())
            if self.api_sock is not None:
                watch(self.api_sock.fileno(), POLL_IN, lambda ev: self._api_accept())
            for fd in self.api_clients:
                watch(fd, POLL_IN, self._make_api_reader(fd))
            if self.fastpath is not None:
                for fd, events, fn in self.fastpath.watch():  # relay/connector deaths
                    watch(fd, events, fn)

            deadlines = [c.deadline for c in self.api_clients.values()]
            if next_ping is not None:
                deadlines.append(next_ping)
            if self.restart_at is not None:
                deadlines.append(self.restart_at)
            if fwd is not None and not fwd.ready:
                deadlines.append(fwd.deadline)
            timeout_ms = None
            if deadlines:
                timeout_ms = max(0.0, min(deadlines) - time.monotonic()) * 1000
                timeout_ms = min(timeout_ms, 24 * 3600 * 1000)

            events = poller.poll(timeout_ms)
            self._drain_signals()
            for fd, ev in events:
                if self.exit_code is not None:
                    break
                fn = handlers.get(fd)
                if fn is not None:
                    fn(ev)
            if self.exit_code is not None:
                break
            now = time.monotonic()
            self._api_expire(now)
            self._check_start_timeout(now)
            if self.restart_at is not None and now >= self.restart_at and self.fwd is None:
                self._restart_forwarder()
            if next_ping is not None and now >= next_ping:
                self.notify.send("WATCHDOG=1")
                next_ping = now + watchdog  # type: ignore[operator]
        return self.exit_code  # type: ignore[return-value]

    def _make_api_reader(self, fd: int) -> Callable[[int], None]:
        def reader(ev: int) -> None:
            if fd in self.api_clients:
                self._api_read(fd)
        return reader

    def _drain_signals(self) -> None:
        try:
            while os.read(self.sigpipe_r, 64):
                pass
        except OSError:
            pass
        sig = self.pending_signal
        if sig is not None:
            self._finish(EXIT_OK, f"received {signal.Signals(sig).name}")

    # -- teardown ----------------------------------------------------------

    def teardown(self) -> None:
        """Stop the forwarder, close every fd, remove the API socket file
        and the pidfile.  Safe to call after a partial set-up."""
        if self.ready:
            self.notify.send(f"STOPPING=1\nSTATUS=stopping: {self.exit_reason or 'set-up failed'}")
        if self.fwd is not None:
            self._stop_forwarder(self.fwd)
            self.fwd = None
        self.restart_at = None
        if self.fastpath is not None:
            self.fastpath.close()
        for fd in list(self.api_clients):
            self._api_close(fd)
        if self.api_sock is not None:
            self.api_sock.close()
            self.api_sock = None
            self._unlink_api()
        self._remove_pidfile()
        if self.sigpipe_w >= 0:
            signal.set_wakeup_fd(-1)
        for fd in (self.tap_fd, self.target_pidfd, self.sigpipe_r, self.sigpipe_w,
                   self.opts.exit_fd, self.opts.ready_fd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.tap_fd = self.sigpipe_r = self.sigpipe_w = -1
        self.target_pidfd = None
        self.opts.exit_fd = self.opts.ready_fd = None
        self.notify.close()

    def _unlink_api(self) -> None:
        path = self.opts.api_socket
        if not path or self.api_ino is None:
            return
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self.api_ino:
                os.unlink(path)
        except OSError:
            pass


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


def run(opts: Options) -> int:
    """Set up, signal readiness, serve until told to stop, tear down.
    Exactly one log line says why it stopped."""
    logger = log.get("nsnet.supervisor")
    sup = Supervisor(opts)
    code = EXIT_FAILURE
    reason = ""
    try:
        try:
            sup.setup()
        except SetupError as e:
            reason = str(e)
            return EXIT_FAILURE
        if sup.pending_signal is None:
            sup.signal_ready()
        code = sup.loop()
        reason = sup.exit_reason
        return code
    except Exception as e:  # a bug: still tear down, and say what happened
        logger.debug("internal error", exc_info=True)
        code, reason = EXIT_FAILURE, f"internal error: {e!r}"
        return code
    finally:
        t0 = sup.exit_since or time.monotonic()
        sup.teardown()
        ms = (time.monotonic() - t0) * 1000
        fields = {"event": "exit", "exit_code": code, "reason": reason,
                  "teardown_ms": round(ms, 3), "restarts": sup.restarts}
        if code == EXIT_OK:
            logger.info(f"exiting: {reason} (exit {code})", extra={"fields": fields})
        else:
            logger.error(f"exiting: {reason} (exit {code})" if sup.ready else reason,
                         extra={"fields": fields})
