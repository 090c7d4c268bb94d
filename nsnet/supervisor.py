"""The supervisor: nsnet's lifecycle.

The `nsnet` process is the supervisor.  It runs the namespace helper once
and keeps the TAP fd; it runs the forwarder (helper_host) as a child that
gets the TAP fd; it owns the API socket and the canonical port-forward
table, so both outlive any one forwarder.  One poll loop, no sleeps:

  event                     action                                  exit
  exit-fd POLLHUP/ERR/NVAL  tear down                               0
  SIGTERM, SIGINT, SIGHUP   tear down                               0
  target PID exits          tear down (unless --keep-after-target)  0
  forwarder dies            new forwarder on the same TAP fd,
                            every forward re-added with its id      -
  too many forwarder deaths tear down                               1
  TAP gone                  tear down                               1
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import api, helper_ns, linux, log, sdnotify
from .forwards import Forward, ForwardError, ForwardTable
from .netconfig import NetConfig, slaac_address

EXIT_OK = 0
EXIT_FAILURE = 1

FORWARDER_START_TIMEOUT = 10.0
CONTROL_TIMEOUT = 5.0
API_CLIENT_TIMEOUT = 5.0
API_DRAIN_LIMIT = 1 << 20

POLL_IN = select.POLLIN
POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class SetupError(RuntimeError):
    """Setup failed; the message says why (exit 1)."""


@dataclass
class Options:
    target: helper_ns.Target
    tapname: str
    net: NetConfig
    configure: bool = False
    exit_fd: int | None = None
    ready_fd: int | None = None
    api_socket: str | None = None
    exit_with_target: bool = True
    max_restarts: int = 5
    restart_window: float = 60.0
    pidfile: str | None = None
    sandbox: bool = False
    seccomp: bool = False
    initial_forwards: list[Forward] = field(default_factory=list)
    # Called in the supervisor once the network is ready (nsnet run uses it).
    on_ready: Callable[["Supervisor"], None] | None = None


@dataclass
class _ApiClient:
    sock: socket.socket
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    answered: bool = False
    drained: int = 0


class _Forwarder:
    """The running forwarder child, seen from the supervisor."""

    def __init__(self, pid: int, ctl: socket.socket, started: float) -> None:
        self.pid = pid
        self.ctl = ctl
        self.pidfd = os.pidfd_open(pid)
        self.started = started
        self.seq = 0
        self.events: list[dict[str, Any]] = []

    def request(self, msg: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        """One request/reply round trip over the control socket."""
        self.seq += 1
        msg = dict(msg, seq=self.seq)
        self.ctl.send(json.dumps(msg).encode())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("forwarder did not answer")
            r, _, _ = select.select([self.ctl], [], [], left)
            if not r:
                continue
            data = self.ctl.recv(65536)
            if not data:
                raise ConnectionError("forwarder hung up")
            reply = json.loads(data)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("reply_to") == self.seq:
                return reply

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
        self.restarts = 0
        self.restart_times: list[float] = []
        self.restart_latencies_ms: list[float] = []
        self.started = time.monotonic()
        self.api_sock: socket.socket | None = None
        self.api_ino: tuple[int, int] | None = None
        self.api_clients: dict[int, _ApiClient] = {}
        self.target_pidfd: int | None = None
        self.sigpipe_r = -1
        self.pending_signal: int | None = None
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.notify = sdnotify.Notifier.from_env()
        self.ready = False

    # -- set-up ------------------------------------------------------------

    def setup(self) -> None:
        o = self.opts
        if o.target.pid is not None:
            try:
                self.target_pidfd = os.pidfd_open(o.target.pid)
            except ProcessLookupError:
                raise SetupError(f"target PID {o.target.pid} does not exist") from None
            except OSError:
                self.target_pidfd = None  # e.g. not permitted: namespaces decide
        try:
            self.tap_fd, self.ifindex, self.tap_mac = helper_ns.open_tap(
                o.target, o.tapname, o.net, o.configure
            )
        except helper_ns.HelperError as e:
            raise SetupError(str(e)) from None
        if o.api_socket:
            self._bind_api(o.api_socket)
        for f in o.initial_forwards:
            self.forwards.add(f)
        self._install_signals()
        self._start_forwarder(initial=True)
        if o.pidfile:
            self._write_pidfile(o.pidfile)

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
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sigpipe_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

        def on_signal(signum: int, _frame: object) -> None:
            if self.pending_signal is None:
                self.pending_signal = signum

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _write_pidfile(self, path: str) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)

    # -- the forwarder -----------------------------------------------------

    def _spawn_forwarder(self) -> _Forwarder:
        from . import helper_host

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                parent.close()
                self._close_in_child()
                code = helper_host.main(self.opts.net, self.tap_fd, child, self.forwards.items(),
                                        sandbox=self.opts.sandbox, seccomp=self.opts.seccomp)
            except BaseException as e:
                try:
                    print(f"nsnet: forwarder: {e!r}", file=sys.stderr)
                except BaseException:
                    pass
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        child.close()
        return _Forwarder(pid, parent, time.monotonic())

    def _close_in_child(self) -> None:
        """What the forwarder must not hold: the API socket, the signal
        pipe, the caller's fds."""
        signal.set_wakeup_fd(-1)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        fds = [self.sigpipe_r, self.target_pidfd, self.opts.exit_fd, self.opts.ready_fd]
        if self.api_sock is not None:
            fds.append(self.api_sock.fileno())
        fds += list(self.api_clients)
        for fd in fds:
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _start_forwarder(self, initial: bool) -> None:
        t0 = time.monotonic()
        fwd = self._spawn_forwarder()
        ready = self._await_ready(fwd)
        if ready is None:
            status = self._kill_and_reap(fwd)
            reason = "; ".join(e.get("error", "") for e in fwd.events if e.get("error"))
            fwd.close()
            raise SetupError(f"forwarder failed to start ({reason or status})")
        self.fwd = fwd
        for fid in ready.get("failed_forwards", []):
            f = self.forwards.get(fid)
            self.log.warning(f"port forward {fid} ({f}) could not be re-added")
        if not initial:
            self.restart_latencies_ms.append((time.monotonic() - t0) * 1000)

    def _await_ready(self, fwd: _Forwarder) -> dict[str, Any] | None:
        deadline = time.monotonic() + FORWARDER_START_TIMEOUT
        while time.monotonic() < deadline:
            r, _, _ = select.select([fwd.ctl], [], [], deadline - time.monotonic())
            if not r:
                break
            try:
                data = fwd.ctl.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            msg = json.loads(data)
            fwd.events.append(msg)
            if msg.get("event") == "ready":
                return msg
            if msg.get("event") == "failed":
                return None
        return None

    def _kill_and_reap(self, fwd: _Forwarder, grace: float = 1.0) -> str:
        """Stop a forwarder (SIGTERM, then SIGKILL) and reap it."""
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
        return self._reap(fwd)

    def _reap(self, fwd: _Forwarder) -> str:
        try:
            _, status = os.waitpid(fwd.pid, 0)
        except ChildProcessError:
            return "already reaped"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return f"killed by {name}"
        return f"exit status {os.WEXITSTATUS(status)}"

    def _on_forwarder_exit(self) -> None:
        fwd = self.fwd
        assert fwd is not None
        self.fwd = None
        how = self._reap(fwd)
        # Collect what it said before dying.
        try:
            while True:
                data = fwd.ctl.recv(65536, socket.MSG_DONTWAIT)
                if not data:
                    break
                fwd.events.append(json.loads(data))
        except (OSError, ValueError):
            pass
        fwd.close()
        tap_errors = [e for e in fwd.events if e.get("event") == "tap_error"]
        if tap_errors:
            self._finish(EXIT_FAILURE,
                         f"TAP {self.opts.tapname} failed ({tap_errors[0].get('error')}): "
                         "the interface is gone from the namespace")
            return
        now = time.monotonic()
        lived = now - fwd.started
        self.restart_times = [t for t in self.restart_times if now - t < self.opts.restart_window]
        self.restart_times.append(now)
        if len(self.restart_times) > self.opts.max_restarts:
            self._finish(EXIT_FAILURE,
                         f"forwarder died {len(self.restart_times)} times in "
                         f"{self.opts.restart_window:g} s (last: {how}); giving up")
            return
        self.log.warning(f"forwarder (pid {fwd.pid}) died ({how}) after {lived:.1f} s; restarting")
        if lived < 1.0 and len(self.restart_times) > 1:
            # A crash loop: back off a little before the next attempt.
            time.sleep(min(0.05 * 2 ** (len(self.restart_times) - 2), 2.0))
        try:
            self._start_forwarder(initial=False)
        except SetupError as e:
            self._on_restart_failed(str(e))
            return
        self.restarts += 1
        self.log.info(f"forwarder restarted (pid {self.fwd.pid if self.fwd else '?'}, "
                      f"{self.restart_latencies_ms[-1]:.1f} ms, {len(self.forwards)} forwards)")
        self.notify.send(f"STATUS=forwarder restarted ({self.restarts} restarts)")

    def _on_restart_failed(self, why: str) -> None:
        now = time.monotonic()
        self.restart_times.append(now)
        recent = [t for t in self.restart_times if now - t < self.opts.restart_window]
        if len(recent) > self.opts.max_restarts:
            self._finish(EXIT_FAILURE, f"forwarder cannot start: {why}; giving up")
            return
        self.log.warning(f"forwarder restart failed: {why}; retrying")
        time.sleep(min(0.05 * 2 ** (len(recent) - 1), 2.0))
        try:
            self._start_forwarder(initial=False)
            self.restarts += 1
        except SetupError as e:
            self._on_restart_failed(str(e))

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
        if self.fwd is None:
            raise ForwardError("forwarder not running")
        try:
            return self.fwd.request(msg)
        except (OSError, TimeoutError, ValueError) as e:
            raise ForwardError(f"forwarder: {e}") from None

    def api_add_forward(self, fwd: Forward) -> int:
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
        reply = self._forwarder_request({"op": "remove", "forward": fwd.to_dict()})
        if not reply.get("ok"):
            raise ForwardError(reply.get("error", "failed"))
        self.forwards.remove(fid)

    def api_list_forwards(self) -> list[tuple[int, Forward]]:
        return self.forwards.items()

    def api_info(self) -> dict[str, Any]:
        from . import __version__, slirp

        net = self.opts.net
        info: dict[str, Any] = {
            "version": __version__,
            "libslirp": slirp.version(),
            "supervisor_pid": os.getpid(),
            "forwarder_pid": self.fwd.pid if self.fwd else None,
            "target": {
                "pid": self.opts.target.pid,
                "netns": self.opts.target.netns,
                "userns": self.opts.target.userns,
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
            "restarts": self.restarts,
            "uptime_s": round(time.monotonic() - self.started, 3),
        }
        if net.ipv6:
            info.update(gateway6=str(net.gateway6), dns6=str(net.dns6),
                        prefix6=f"{net.prefix6}/64", guest6=self.default_guest_addr6)
        return info

    def api_stats(self) -> dict[str, Any]:
        reply = self._forwarder_request({"op": "stats"})
        if not reply.get("ok"):
            raise ForwardError(reply.get("error", "failed"))
        conns = [line for line in reply.get("connections", "").splitlines()[1:] if line.strip()]
        return dict(reply["stats"], active_connections=reply.get("connections_total", len(conns)),
                    connections=conns, restarts=self.restarts)

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
        reply = api.handle(request, self)
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

    def _finish(self, code: int, reason: str) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.exit_reason = reason

    def loop(self) -> int:
        o = self.opts
        exit_fd_ok = True
        if o.exit_fd is not None:
            try:
                os.fstat(o.exit_fd)
            except OSError:
                exit_fd_ok = False
        if not exit_fd_ok:
            self._finish(EXIT_OK, f"exit-fd {o.exit_fd} is not open")
        watchdog = self.notify.watchdog_interval()
        next_ping = time.monotonic() + watchdog if watchdog else None
        while self.exit_code is None:
            poller = select.poll()
            handlers: dict[int, Callable[[int], None]] = {}

            def watch(fd: int, events: int, fn: Callable[[int], None]) -> None:
                poller.register(fd, events)
                handlers[fd] = fn

            watch(self.sigpipe_r, POLL_IN, lambda ev: self._drain_signals())
            if o.exit_fd is not None:
                watch(o.exit_fd, 0, lambda ev: self._finish(EXIT_OK, "exit-fd closed"))
            if self.target_pidfd is not None and o.exit_with_target:
                watch(self.target_pidfd, POLL_IN,
                      lambda ev: self._finish(EXIT_OK, f"target PID {o.target.pid} exited"))
            if self.fwd is not None:
                watch(self.fwd.pidfd, POLL_IN, lambda ev: self._on_forwarder_exit())
            if self.api_sock is not None:
                watch(self.api_sock.fileno(), POLL_IN, lambda ev: self._api_accept())
            for fd in self.api_clients:
                watch(fd, POLL_IN, self._make_api_reader(fd))
            now = time.monotonic()
            timeout_s: float | None = None
            if self.api_clients:
                timeout_s = max(0.0, min(c.deadline for c in self.api_clients.values()) - now)
            if next_ping is not None:
                t = max(0.0, next_ping - now)
                timeout_s = t if timeout_s is None else min(timeout_s, t)
            events = poller.poll(None if timeout_s is None else timeout_s * 1000)
            if self.pending_signal is not None:
                self._drain_signals()
            for fd, ev in events:
                if self.exit_code is not None:
                    break
                fn = handlers.get(fd)
                if fn is not None and (fd in handlers):
                    fn(ev)
            now = time.monotonic()
            self._api_expire(now)
            if next_ping is not None and now >= next_ping:
                self.notify.send("WATCHDOG=1")
                next_ping = now + watchdog
        return self.exit_code

    def _make_api_reader(self, fd: int) -> Callable[[int], None]:
        def reader(ev: int) -> None:
            if fd in self.api_clients:
                self._api_read(fd)
        return reader

    def _drain_signals(self) -> None:
        try:
            while os.read(self.sigpipe_r, 64):
                pass
        except (BlockingIOError, OSError):
            pass
        sig = self.pending_signal
        if sig is not None:
            self._finish(EXIT_OK, f"received {signal.Signals(sig).name}")

    # -- teardown ----------------------------------------------------------

    def teardown(self) -> None:
        self.notify.send("STOPPING=1")
        if self.fwd is not None:
            self._kill_and_reap(self.fwd)
            self.fwd.close()
            self.fwd = None
        for fd in list(self.api_clients):
            self._api_close(fd)
        if self.api_sock is not None:
            self.api_sock.close()
            self.api_sock = None
            self._unlink_api()
        if self.opts.pidfile:
            try:
                os.unlink(self.opts.pidfile)
            except OSError:
                pass
        for fd in (self.tap_fd, self.target_pidfd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.tap_fd = -1
        self.target_pidfd = None

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


def run(opts: Options) -> int:
    """Set up, signal readiness, serve until told to stop, tear down."""
    logger = log.get("nsnet.supervisor")
    sup = Supervisor(opts)
    try:
        try:
            sup.setup()
        except SetupError as e:
            logger.error(str(e))
            return EXIT_FAILURE
        sup.signal_ready()
        code = sup.loop()
        if code == EXIT_OK:
            logger.info(f"exiting: {sup.exit_reason}")
        else:
            logger.error(f"exiting: {sup.exit_reason}")
        return code
    finally:
        sup.teardown()
