"""The supervisor: nsnet's lifecycle.

The `nsnet` process is the supervisor.  It runs the namespace helper once
and keeps the TAP fd; it runs the forwarder (host/forwarder.py) as a child that
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
import os
import select
import signal
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any, Callable

    from .apiserver import _ApiClient
    from .peercheck import PeerCheck
    from .fastpath import FastPath
    from .forwarder import _Forwarder
    from .interface import InterfaceQuery
    from .policy import PolicyControl

from .. import children, fdlimit, linux, log, sdnotify
from ..forwards import Forward, ForwardError, ForwardTable
from ..netconfig import NetConfig
from ..ns import helper as helper_ns
from ..proto.exitcodes import EXIT_FAILURE, EXIT_OK
from .apiserver import ApiServer
from .errors import SetupError
from .forwarder import ForwarderControl

POLL_IN = select.POLLIN
POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
TERM_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)




def _holds_capabilities() -> bool:
    """Whether this process has any effective or permitted capability."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("CapEff:", "CapPrm:")) and int(line.split()[1], 16):
                    return True
    except (OSError, ValueError, IndexError):
        return True  # cannot tell: the full path decides
    return False


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
        policy: Any = None,
        audit_all: bool = False,
        audit_log: str | None = None,
        pcap: str | None = None,
        pcap_max_bytes: int = 0,
        bypass_listener: str | None = None,
        bypass_bytes: str = "sampled",
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
        # the egress policy (nsnet/policy.py: a Policy or None), its audit
        self.policy = policy
        self.audit_all = audit_all
        self.audit_log = audit_log
        # --pcap: the capture file (opened here, written by the forwarder)
        self.pcap = pcap
        self.pcap_max_bytes = pcap_max_bytes
        # --bypass-listener: the socket OCI runtimes send seccomp listeners to
        self.bypass_listener = bypass_listener
        self.bypass_bytes = bypass_bytes  # --bypass-bytes: sampled or at-close



def open_pcap(path: str) -> int:
    """--pcap=FILE: the capture file, created (mode 0600) or truncated,
    never through a symbolic link; a regular file only (a FIFO would stall
    the data path).  The forwarder, which has no filesystem once
    sandboxed, writes to this fd."""
    import stat

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        hint = (" (it is a symbolic link: give the file itself)" if e.errno == errno.ELOOP
                else " (give a path in a directory you may write)")
        raise SetupError(f"--pcap={path}: cannot open it for writing: {e.strerror} "
                         f"({name}){hint}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SetupError(f"--pcap={path}: not a regular file (give a file path)")
    os.set_blocking(fd, True)
    return fd


class Supervisor(ForwarderControl, ApiServer):
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
        self.api_paused_until: float | None = None  # out of fds: listener not polled
        self.peer_check: PeerCheck | None = None  # set with the API socket
        self.target_pidfd: int | None = None
        self.nsfds: helper_ns.NsFds | None = None  # the target's namespace files
        self.sigpipe_r = -1
        self.sigpipe_w = -1
        self.pending_signal: int | None = None
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.exit_since: float | None = None  # when the exit event was seen
        self.notify = sdnotify.Notifier.from_env()
        self.ready = False
        self.pidfile_written = False
        self.log_pipe: int | None = None  # children's stderr when ours is a terminal
        self.fastpath: FastPath | None = None  # splice forwards, from the first one on
        self.policy: PolicyControl | None = None  # the egress policy (policy.py)
        self.pcap_fd = -1  # --pcap: every forwarder gets this fd and appends
        self.pcap_max = opts.pcap_max_bytes
        self.pcap_path: str | None = None  # get_info's "capture"
        # get_stats sections of other parts (nsnet run --bypass: "bypass")
        self.stats_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        # told of set_policy: fn(old policy, new policy, done)
        self.policy_listeners: list[Callable[[Any, Any, bool], None]] = []
        # Children answering requests in the loop (supervisor/interface.py)
        self.io_sources: list[InterfaceQuery] = []
        self.poller = fdlimit.Poller(self.log)  # survives an fd limit below what it holds

    # -- set-up ------------------------------------------------------------

    def setup(self) -> None:
        o = self.opts
        if o.policy is not None or o.audit_all or o.audit_log:
            from .policy import PolicyControl, PolicyControlError

            try:
                self.policy = PolicyControl(o.policy, o.audit_all, o.audit_log)
            except PolicyControlError as e:
                raise SetupError(str(e)) from None
        if o.pcap is not None:
            self.pcap_fd = open_pcap(o.pcap)
            self.pcap_path = o.pcap
        self._install_signals()
        # Every API client and splice connection holds fds: the soft limit
        # up to the hard one (the forwarder and relay raise theirs too).
        linux.raise_fd_limit()
        if o.sandbox:
            self._confine()
        # Children never get the terminal: their log lines come through
        # this pipe when stderr is one (children.py).
        self.log_pipe = children.open_log_pipe()
        if o.target.pid is not None:
            try:
                self.target_pidfd = os.pidfd_open(o.target.pid)
            except ProcessLookupError:
                raise SetupError(f"target PID {o.target.pid} does not exist") from None
            except OSError:
                self.target_pidfd = None  # e.g. not permitted: namespaces decide
        # The target's namespace files, opened once: every namespace-side
        # child joins through these fds, never through /proc/PID again.
        try:
            self.nsfds = helper_ns.open_namespaces(o.target)
        except helper_ns.HelperError as e:
            raise SetupError(str(e)) from None
        if o.bypass_listener:  # its errors before the TAP exists
            self._start_oci_listener(o.bypass_listener)
        # The namespace helper creates the TAP while this process binds the
        # API socket and starts the forwarder, which loads libslirp, sets it
        # up and then waits for the TAP.  (This process has not loaded the
        # libslirp binding yet: the helper is a plain fork of it.)
        helper = helper_ns.TapHelper(self.nsfds, o.tapname, o.net, o.configure)
        try:
            if o.api_socket:
                self._bind_api(o.api_socket)
            for f in o.initial_forwards:
                self.forwards.add(f)
            self._start_first_forwarder(helper)
        finally:
            helper.reap()
        try:  # fast-path (splice) forwards: nsnet/supervisor/fastpath.py
            if any(f.is_splice for _, f in self.forwards.items()):
                self._fastpath().add_initial(self.forwards.items())
        except ForwardError as e:
            raise SetupError(f"cannot publish a port: {e}") from None
        if o.pidfile:
            self._write_pidfile(o.pidfile)

    def _start_oci_listener(self, path: str) -> None:
        """--bypass-listener (supervisor/ocilistener.py): the namespace's
        facts for the handlers, then the socket, served by the loop."""
        from ..bypassfilter import FilterError, syscall_numbers
        from .ocilistener import OciListener

        assert self.nsfds is not None
        try:
            syscall_numbers()
            facts = helper_ns.netfacts(self.nsfds)
        except (FilterError, helper_ns.HelperError) as e:
            raise SetupError(f"--bypass-listener: {e}") from None
        oci = OciListener(path, self.nsfds.net, self.opts.net, facts,
                          lambda: self.default_guest_addr6,
                          lambda: self.policy, bytes_mode=self.opts.bypass_bytes,
                          seccomp=self.opts.seccomp)
        self.io_sources.append(oci)
        self.stats_sources["bypass"] = oci.stats
        self.policy_listeners.append(oci.policy_changed)

        def blocked_by() -> str | None:
            if not oci.may_have_bypassed():
                return None
            return ("--bypass-listener: connections that bypass libslirp cannot be cut by a "
                    "policy set at run time; give keep_established: true (connects from "
                    "then on follow the new policy), or start nsnet with the policy")

        self.policy_blocked_by = blocked_by

    def _confine(self) -> None:
        """--enable-sandbox: the supervisor too, as far as its job allows
        (nsnet/sandbox.py confine_supervisor; SECURITY.md).  Without a
        capability there is only NO_NEW_PRIVS to set: no import on the
        path to ready for that."""
        if not _holds_capabilities():
            from .. import linux

            try:
                linux.set_no_new_privs()
            except OSError as e:
                raise SetupError(f"sandbox: {e.strerror}") from None
            return
        from .. import sandbox

        try:
            done = sandbox.confine_supervisor([self.opts.api_socket, self.opts.pidfile,
                                               self.opts.bypass_listener])
        except sandbox.SandboxError as e:
            raise SetupError(str(e)) from None
        self.log.debug(f"supervisor confined: {done}")

    def _fastpath(self) -> FastPath:
        """The fast path (nsnet/supervisor/fastpath.py), imported and created when the
        first splice forward needs it: not on the path to ready."""
        if self.fastpath is None:
            from .fastpath import FastPath

            self.fastpath = FastPath(self.nsfds, self.opts.sandbox, self.opts.seccomp)
        return self.fastpath

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
        """Write PATH through a fresh file of an unpredictable name in the
        same directory (O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file or
        a planted symlink), then rename it over PATH (which replaces a
        symlink there instead of following it)."""
        d, base = os.path.split(path)
        tmp = None
        try:
            for _ in range(100):
                cand = os.path.join(d, f".{base}.{os.urandom(6).hex()}.tmp")
                try:
                    fd = os.open(cand, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    continue
                tmp = cand
                break
            else:
                raise OSError(errno.EEXIST, "no unused temporary name")
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
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
        try:
            from ..host import forwarder  # noqa: F401  (preloaded for restarts)
        except OSError as e:  # out of fds (the limit lowered meanwhile): a restart loads it
            self.log.warning(f"cannot preload the forwarder's code: {e.strerror}")

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
            entries: list[tuple[int, int]] = []
            handlers: dict[int, Callable[[int], None]] = {}

            def watch(fd: int, events: int, fn: Callable[[int], None]) -> None:
                entries.append((fd, events))
                handlers[fd] = fn

            watch(self.sigpipe_r, POLL_IN, lambda ev: self._drain_signals())
            if self.log_pipe is not None:
                watch(self.log_pipe, POLL_IN, lambda ev: children.copy_log())
            for fd, fn in o.watch_fds.items():
                watch(fd, POLL_IN, fn)
            if o.exit_fd is not None:
                # events=0: only POLLHUP/POLLERR/POLLNVAL, as slirp4netns
                watch(o.exit_fd, 0, lambda ev: self._finish(EXIT_OK, "exit-fd closed"))
            if self.target_pidfd is not None and o.exit_with_target:
                watch(self.target_pidfd, POLL_IN,
                      lambda ev: self._finish(EXIT_OK, f"target PID {o.target.pid} exited"))
            # The children before the API clients: over the fd limit, the
            # first fds are polled most often (fdlimit.Poller).
            for fd, events, fn in self._child_watchers():
                watch(fd, events, fn)
            if self.api_sock is not None and self._api_listening(time.monotonic()):
                watch(self.api_sock.fileno(), POLL_IN, lambda ev: self._api_accept())
            for fd, client in self.api_clients.items():
                if not client.waiting:  # one waiting for a child is not read meanwhile
                    watch(fd, POLL_IN, self._make_api_reader(fd))

            deadlines = [c.deadline for c in self.api_clients.values()]
            if self.api_paused_until is not None:
                deadlines.append(self.api_paused_until)
            if next_ping is not None:
                deadlines.append(next_ping)
            if self.restart_at is not None:
                deadlines.append(self.restart_at)
            deadlines += self._pending_deadlines()
            timeout_ms = None
            if deadlines:
                timeout_ms = max(0.0, min(deadlines) - time.monotonic()) * 1000
                timeout_ms = min(timeout_ms, 24 * 3600 * 1000)

            events = self.poller.poll(entries, timeout_ms)
            self._drain_signals()
            for fd, ev in events:
                if self.exit_code is not None:
                    break
                fn = handlers.get(fd)
                if fn is not None:
                    try:
                        fn(ev)
                    except OSError as e:
                        if e.errno not in (errno.EMFILE, errno.ENFILE):
                            raise
                        # Out of fds: that event's work is lost (a client, a
                        # child's request), not nsnet.
                        self._warn_fds(f"cannot serve an event: {fdlimit.exhausted(e)}")
            if self.exit_code is not None:
                break
            now = time.monotonic()
            self._api_expire(now)
            self._check_start_timeout(now)
            self._check_pending(now)
            if self.restart_at is not None and now >= self.restart_at and self.fwd is None:
                self._restart_forwarder()
            if next_ping is not None and now >= next_ping:
                self.notify.send("WATCHDOG=1")
                next_ping = now + watchdog  # type: ignore[operator]
        return self.exit_code  # type: ignore[return-value]

    def _child_watchers(self) -> list[tuple[int, int, Callable[[int], None]]]:
        """(fd, events, handler): the children's deaths, replies and events."""
        out: list[tuple[int, int, Callable[[int], None]]] = []
        fwd = self.fwd
        if fwd is not None:
            out.append((fwd.pidfd, POLL_IN, lambda ev: self._on_forwarder_exit()))
            if not fwd.ctl_eof and not fwd.broken:  # replies and events, checked
                out.append((fwd.ctl.fileno(), POLL_IN, lambda ev: self._on_forwarder_readable()))
        if self.fastpath is not None:  # relay/connector: deaths, replies
            out += self.fastpath.watch()
        for src in self.io_sources:  # children answering requests (interface.py)
            out += src.watch()
        return out

    def run_blocking(self, task: Any, timeout: float = 30.0) -> Any:
        """Set-up only (loop() does not run yet; nsnet run's --publish): run
        a task (e.g. api_add_forward) to its end, serving the children it
        waits for.  Its result, or its exception."""
        from .tasks import run_task

        out: list[tuple[Any, BaseException | None]] = []
        run_task(task, lambda v, e: out.append((v, e)))
        give_up = time.monotonic() + timeout
        while not out and time.monotonic() < give_up:
            handlers = {fd: fn for fd, _ev, fn in self._child_watchers()}
            entries = [(fd, ev) for fd, ev, _fn in self._child_watchers()]
            deadlines = [give_up] + self._pending_deadlines()
            timeout_ms = max(0.0, min(deadlines) - time.monotonic()) * 1000
            for fd, ev in self.poller.poll(entries, timeout_ms):
                if not out and fd in handlers:
                    handlers[fd](ev)
            now = time.monotonic()
            self._check_start_timeout(now)
            self._check_pending(now)
        if not out:
            raise ForwardError(f"no answer from nsnet's children in {timeout:g} s")
        value, error = out[0]
        if error is not None:
            raise error
        return value

    def _pending_deadlines(self) -> list[float]:
        """Deadlines of requests to children, of a forwarder's start."""
        out = [d for d in (src.deadline() for src in self.io_sources) if d is not None]
        fwd = self.fwd
        if fwd is not None and not fwd.ready:
            out.append(fwd.deadline)
        if fwd is not None and fwd.next_deadline() is not None:
            out.append(fwd.next_deadline())  # type: ignore[arg-type]
        if self.fastpath is not None:
            d = self.fastpath.deadline()
            if d is not None:
                out.append(d)
        return out

    def _check_pending(self, now: float) -> None:
        for src in list(self.io_sources):
            src.check(now)
        self.io_sources = [src for src in self.io_sources if not src.finished]
        if self.fastpath is not None:
            self.fastpath.check(now)

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
            if self.policy is not None and self.fwd.ready and not self.fwd.ctl_eof:
                self._flush_forwarder(self.fwd, 0.5)  # the audit records of the last moments
            self._stop_forwarder(self.fwd)
            self.fwd = None
        self.restart_at = None
        if self.fastpath is not None:
            self.fastpath.close()
        for src in self.io_sources:
            src.close()
        self.io_sources = []
        for fd in list(self.api_clients):
            self._api_close(fd)
        if self.api_sock is not None:
            self.api_sock.close()
            self.api_sock = None
            self._unlink_api()
        self._remove_pidfile()
        children.close_log_pipe()  # what the children said last
        self.log_pipe = None
        if self.nsfds is not None:
            self.nsfds.close()
        if self.policy is not None:
            self.policy.close()
        if self.sigpipe_w >= 0:
            signal.set_wakeup_fd(-1)
        for fd in (self.tap_fd, self.target_pidfd, self.sigpipe_r, self.sigpipe_w,
                   self.opts.exit_fd, self.opts.ready_fd, self.pcap_fd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.tap_fd = self.sigpipe_r = self.sigpipe_w = self.pcap_fd = -1
        self.target_pidfd = None
        self.opts.exit_fd = self.opts.ready_fd = None
        self.notify.close()


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
    except OSError as e:
        logger.debug("internal error", exc_info=True)
        code = EXIT_FAILURE
        if e.errno in (errno.EMFILE, errno.ENFILE):  # not a bug: the operator's to fix
            reason = fdlimit.exhausted(e)
        else:
            reason = f"internal error: {e!r}"
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
