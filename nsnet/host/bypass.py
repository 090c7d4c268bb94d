"""`nsnet run --bypass`: the socket bypass's notification handler, host side.

The command runs with a seccomp filter (nsnet/bypassfilter.py) whose
user-notification fd (the listener) comes to nsnet with the child's last
set-up message.  The supervisor keeps the listener and forks a handler
process that holds only it and a shared page of counters; the handler's
loop is C (csrc/bypass.c).  If the handler dies, the supervisor starts
another on the same listener: the notifications the dead one had taken
are answered ECONNABORTED (their ids are in the shared page), those that
came meanwhile wait in the kernel and are handled.  After MAX_RESTARTS
deaths in RESTART_WINDOW seconds the run ends (exit 125).  With
--enable-seccomp the handler loads its own allowlist (nsnet/seccomp.py,
profile "bypass") after its set-up, before the first notification; a call
outside it kills the handler (SIGSYS), which is replaced as above.

What is bypassed, and what falls back, is decided by scope() (which
classes of destination) and decide() in bypass.c (each connect).
docs/bypass.md has the whole design; SECURITY.md what it changes.
"""

from __future__ import annotations

import ipaddress
import mmap
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..netconfig import NetConfig

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
COUNTERS = ("notifications", "bypassed", "bypassed6", "failed", "fallback", "translated",
            "aborted", "errors", "pending", "audit_lost", "bytes_inexact", "bytes_untracked",
            "bytes_samples", "bytes_dumps")
# get_stats' byte counts (Handler.byte_counts): sums over handlers too
BYTE_COUNTS = ("bytes_sent", "bytes_received", "bytes_live")


class BypassError(Exception):
    """--bypass cannot work here; the message says why and what to do."""


def _lib() -> Any:
    from .. import _bypass_cffi  # type: ignore[attr-defined]

    return _bypass_cffi


def _allows_every_port(policy: Any, ip: Any) -> bool:
    """The policy allows TCP to ip on every port, whatever names DNS taught
    it (Decision.final).  Decisions change only where a rule's port range
    starts or ends: checking the start of each such interval covers all."""
    points = {1}
    for r in policy.rules:
        points.update((r.port_lo, r.port_hi + 1))
    for port in sorted(p for p in points if 1 <= p <= 65535):
        d = policy.decide("tcp", ip, port)
        if d.action != "allow" or not d.final:
            return False
    return True


def scope(net: "NetConfig", policy: Any = None) -> dict[str, bool]:
    """Which classes of destination the handler may bypass: the one place
    that applies the network's rules before bypass.c sees a connect.  A
    class is bypassed only when the network grants ALL of it, so that a
    host socket a hostile command holds can reach nothing the libslirp
    path would refuse it (SECURITY.md, "Socket bypass"):

    gateway: the gateway alias (10.0.2.2, fd00::2 with -6) -> the host's
             loopback (sockets bound to lo): unless --no-egress or
             --disable-host-loopback, and only if the egress policy allows
             TCP to the gateway on every port;
    egress:  other addresses outside the namespace, as libslirp sends them:
             unless --no-egress or --disable-host-loopback, and only with no
             policy or an open one (default allow, no rules).
    Everything else falls back to libslirp's path, which applies the policy
    per flow (and DNS-learned names).
    """
    if net.restricted or net.disable_host_loopback:
        return {"gateway": False, "egress": False}
    if policy is None or policy.is_open:
        return {"gateway": True, "egress": True}
    gws = [net.gateway] + ([net.gateway6] if net.ipv6 else [])
    return {"gateway": all(_allows_every_port(policy, gw) for gw in gws), "egress": False}


def check_kernel(listener: int) -> None:
    """BypassError unless the kernel has SECCOMP_IOCTL_NOTIF_ADDFD with
    SETFD and SEND (Linux 5.14)."""
    import errno

    err = _lib().lib.nsb_probe(listener)
    if err == 0:
        return
    if err == errno.EINVAL:
        raise BypassError("--bypass needs SECCOMP_ADDFD_FLAG_SEND (Linux 5.14 or later); "
                          f"this kernel is {os.uname().release}: run without --bypass")
    raise BypassError("--bypass needs SECCOMP_IOCTL_NOTIF_ADDFD (Linux 5.14 or later): "
                      f"{os.strerror(err)} on {os.uname().release}: run without --bypass")


def check_access(pid: int) -> None:
    """BypassError unless this process may copy the command's fds and read
    its memory (pidfd_getfd, process_vm_readv: ptrace access)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise BypassError(f"pidfd_open({pid}): {e.strerror}") from None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fd = libc.syscall(ctypes.c_long(438), ctypes.c_long(pidfd), ctypes.c_long(0),
                          ctypes.c_long(0))
        if fd < 0:
            err = ctypes.get_errno()
            if err != 9:  # EBADF: no fd 0 there, but access was granted
                raise BypassError(
                    f"--bypass cannot reach the command's sockets: pidfd_getfd: "
                    f"{os.strerror(err)} (ptrace access to the command is needed; "
                    "check kernel.yama.ptrace_scope and LSM policy)")
        else:
            os.close(fd)
    finally:
        os.close(pidfd)


def load_filter(bpf: bytes) -> None:
    """Load a BPF seccomp program (nsnet.seccomp.export_bpf) on every thread
    of this process, as the handler does after its set-up (nsb_run); for
    `python -m nsnet.seccomp --profile=bypass check`."""
    mod = _lib()
    buf = mod.ffi.from_buffer(bpf)
    rc = mod.lib.nsb_load_filter(buf, len(bpf) // 8)
    if rc < 0:
        raise OSError(-rc, f"seccomp filter: {os.strerror(-rc)}")


def filter_program() -> bytes:
    """--enable-seccomp: the handler's allowlist (profile "bypass") as BPF;
    BypassError if libseccomp cannot build it."""
    from .. import seccomp

    try:
        return seccomp.export_bpf("bypass")
    except (seccomp.SeccompError, OSError) as e:
        raise BypassError(f"--enable-seccomp: the bypass handler's filter: {e}") from None


def _scope_bits(sc: dict[str, bool]) -> int:
    lib = _lib().lib
    return (lib.NSB_GATEWAY if sc["gateway"] else 0) | (lib.NSB_EGRESS if sc["egress"] else 0)


def _fill_config(cfg: Any, net: "NetConfig", facts: tuple[int, int, int],
                 guest6: str | None, sc: dict[str, bool], nrs: tuple[int, int, int]) -> None:
    lib = _lib().lib
    flags = _scope_bits(sc)
    if net.ipv6:
        flags |= lib.NSB_IPV6
    cidr = net.cidr
    cfg.net4 = list(cidr.network_address.packed)
    cfg.mask4 = list(cidr.netmask.packed)
    cfg.gw4 = list(net.gateway.packed)
    cfg.guest4 = list(net.guest.packed)
    if net.ipv6:
        cfg.prefix6 = list(net.prefix6.packed)
        cfg.gw6 = list(net.gateway6.packed)
        if guest6:
            cfg.guest6 = list(ipaddress.IPv6Address(guest6).packed)
            flags |= lib.NSB_GUEST6
    if net.outbound_addr:
        cfg.outbound4 = list(ipaddress.IPv4Address(net.outbound_addr).packed)
        flags |= lib.NSB_OUT4
    if net.outbound_addr6:
        cfg.outbound6 = list(ipaddress.IPv6Address(net.outbound_addr6).packed)
        flags |= lib.NSB_OUT6
    cfg.flags = flags
    cfg.ns_cookie, cfg.def_sndbuf, cfg.def_rcvbuf = facts
    cfg.nr_connect, cfg.nr_getsockname, cfg.nr_getpeername = nrs
    from ..bypassfilter import audit_arch

    cfg.audit_arch = audit_arch()


class Handler:
    """The handler process and the listener it works on.  Runs in the
    supervisor: start(), watch() for the poll loop, stats(), stop()."""

    def __init__(self, listener: int, net: "NetConfig", facts: tuple[int, int, int],
                 guest6: str | None, policy: Any = None, bytes_mode: str = "sampled",
                 on_give_up: Callable[[str], None] | None = None,
                 seccomp: bool = False) -> None:
        from ..bypassfilter import syscall_numbers

        mod = _lib()
        self.ffi, self.lib = mod.ffi, mod.lib
        self.listener = listener
        self.scope = scope(net, policy)
        self.cfg = self.ffi.new("struct nsb_config *")
        _fill_config(self.cfg, net, facts, guest6, self.scope, syscall_numbers())
        self.cfg.audit_fd = -1
        self.cfg.diag_fd = -1
        # --enable-seccomp: the handler loads this allowlist itself, after
        # its set-up and before the first notification (csrc/bypass.c)
        self.seccomp = seccomp
        if seccomp:
            bpf = filter_program()
            self._filter = self.ffi.new("char[]", bpf)
            self.cfg.filter = self._filter
            self.cfg.filter_len = len(bpf) // 8
        # --bypass-bytes: "sampled" (nothing subscribed), or "at-close" (a
        # socket subscribed to the TCP destroy notifications per handler)
        self.bytes_mode = bytes_mode
        self.bytes_warned = False
        size = self.ffi.sizeof("struct nsb_shared")
        self.shm = mmap.mmap(-1, (size + 4095) // 4096 * 4096,
                             mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.shared = self.ffi.cast("struct nsb_shared *", self.ffi.from_buffer(self.shm))
        self.shared.scope = _scope_bits(self.scope)
        self.net = net
        self.pid = -1
        self.pidfd = -1
        self.deaths: list[float] = []
        self.restarts = 0
        self.on_give_up = on_give_up
        self.gave_up = False
        # the audit stream (nsnet/proto/bypass.py): the supervisor's end,
        # a new socketpair per handler; on_audit gets the checked records
        self.audit_sock: socket.socket | None = None
        self.audit_rest = b""
        self.on_audit: Callable[[list[dict[str, Any]]], None] | None = None
        self.protocol_errors = 0
        self._bytes = (0, 0)
        self.stats_dumps = 0  # get_stats' walks of the host's TCP sockets (byte_counts)

    def set_audit(self, deny: bool, allow: bool) -> None:
        """Which decisions the handler reports from now on: the connects it
        refuses itself (deny), the ones it bypasses (allow: --audit=all)."""
        lib = self.lib
        self.shared.audit = (lib.NSB_AUDIT_DENY if deny else 0) | (
            lib.NSB_AUDIT_ALL if allow else 0)

    def start(self) -> None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self.drain_audit()  # what a dead predecessor wrote
        self.close_audit()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.cfg.audit_fd = theirs.fileno()
        self.cfg.diag_fd = self._subscribe() if self.bytes_mode == "at-close" else -1
        try:
            pid = os.fork()
            if pid == 0:  # the handler: the listener, the shared page, its audit socket
                code = 70
                try:
                    mine.close()
                    self._child(theirs.detach())
                    code = 0
                except BaseException:
                    pass
                os._exit(code)
        finally:
            if self.cfg.diag_fd >= 0:  # the handler's now
                os.close(self.cfg.diag_fd)
                self.cfg.diag_fd = -1
        theirs.close()
        mine.setblocking(False)
        self.audit_sock = mine
        self.audit_rest = b""
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)

    def _subscribe(self) -> int:
        """--bypass-bytes=at-close: a socket subscribed to the kernel's TCP
        destroy notifications for the next handler, or -1 where the kernel
        refuses it: the bytes are then sampled, and a warning says so
        (once)."""
        fd = self.lib.nsb_diag_subscribe()
        if fd >= 0:
            return fd
        if not self.bytes_warned:
            from .. import log
            from ..diag import why

            self.bytes_warned = True
            log.get().warning(
                "--bypass-bytes=at-close: the kernel refused the TCP destroy notifications "
                f"(sock_diag: {why(OSError(-fd, os.strerror(-fd)))}); the bytes of bypassed "
                "connections are sampled instead (get_stats: \"bytes_counted\": \"sampled\")")
        return -1

    def read_audit(self, _revents: int = 0) -> None:
        """The audit socket is readable: check and hand on what came (at most
        one handler burst per call).  A record that breaks the protocol gets
        the handler killed (and replaced, as a crashed one)."""
        from .. import log
        from ..proto.bypass import MAX_READ, ProtocolError, parse

        if self.audit_sock is None:
            return
        try:
            data = self.audit_sock.recv(MAX_READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the handler is gone: its pidfd says so
            self.close_audit()
            return
        try:
            records, self.audit_rest = parse(self.audit_rest + data)
        except ProtocolError as e:
            self.protocol_errors += 1
            log.get().error(f"the bypass handler broke its protocol ({e}); replacing it")
            self.close_audit()
            if self.pid > 0:
                try:
                    os.kill(self.pid, signal.SIGKILL)  # on_exit replaces it
                except ProcessLookupError:
                    pass
            return
        if records and self.on_audit is not None:
            self.on_audit(records)

    def drain_audit(self) -> None:
        for _ in range(64):  # bounded: a live handler could write forever
            sock = self.audit_sock
            if sock is None:
                return
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    self.close_audit()
                    return
            except BlockingIOError:
                return
            except OSError:
                self.close_audit()
                return
            self.read_audit()

    def close_audit(self) -> None:
        if self.audit_sock is not None:
            self.audit_sock.close()
            self.audit_sock = None

    def _child(self, audit_fd: int) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        libc.prctl(15, b"nsnet-bypass", 0, 0, 0)  # PR_SET_NAME
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        keep = sorted({self.listener, audit_fd, self.cfg.diag_fd} - {-1})
        from ..children import detach_stdio

        detach_stdio()  # /dev/null; stderr never the terminal (the log pipe)
        lo = 3
        for fd in keep:
            os.closerange(lo, fd)
            lo = fd + 1
        os.closerange(lo, 1 << 20)
        rc = self.lib.nsb_run(self.listener, self.cfg, self.shared)
        if rc < 0:
            os.write(2, f"nsnet: bypass handler: {os.strerror(-rc)}\n".encode())
            os._exit(71)

    def on_exit(self, _revents: int = 0) -> None:
        """The handler died (or finished: the command is gone)."""
        from .. import log

        if self.pid <= 0:
            return
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        os.close(self.pidfd)
        self.pidfd = -1
        self.pid = -1
        self.drain_audit()
        if status == 0:  # the listener hung up: every task of the command is gone
            return
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
        why = f"status {os.waitstatus_to_exitcode(status)}"
        if len(self.deaths) > MAX_RESTARTS:
            self.gave_up = True
            self.close_listener()
            msg = (f"the bypass handler died {len(self.deaths)} times in "
                   f"{RESTART_WINDOW:g} s (last: {why})")
            log.get().error(f"{msg}; giving up")
            if self.on_give_up is not None:
                self.on_give_up(msg)
            return
        log.get().warning(f"the bypass handler exited ({why}); starting another")
        self.restarts += 1
        self.start()

    def policy_changed(self, old: Any, new: Any, done: bool) -> None:
        """set_policy: before the forwarder switches (done False), bypass
        only what both policies grant; then (done True) what `new` grants.
        Connects from then on follow it; connections already bypassed stay
        (they are the command's own sockets: the policy cannot cut them)."""
        sc = scope(self.net, new)
        if not done:
            prev = scope(self.net, old)
            sc = {k: sc[k] and prev[k] for k in sc}
        self.scope = sc
        self.shared.scope = _scope_bits(sc)

    def stats(self, audit_capped: int = 0) -> dict[str, Any]:
        """get_stats' "bypass" section; audit_capped: records the supervisor
        left out over its own cap (counted in audit_lost)."""
        out: dict[str, Any] = {k: int(getattr(self.shared, k)) for k in COUNTERS}
        out["audit_lost"] += audit_capped
        out.update(self.byte_counts())
        out["bytes_dumps"] += self.stats_dumps  # the handler's walks, and get_stats' own
        out.update(handler_pid=self.pid if self.pid > 0 else None, restarts=self.restarts,
                   scope=dict(self.scope), protocol_errors=self.protocol_errors,
                   sync_wakeup=bool(self.shared.sync_wakeup))
        return out

    def byte_counts(self) -> dict[str, Any]:
        """The bytes of the bypassed connections (csrc/bypassdiag.c): those
        that are gone, plus the live ones now, read through sock_diag here.
        Never less than the last answer (a connection that ends while this
        reads is counted short once, not twice)."""
        lib = self.lib
        buf = self.ffi.new("uint64_t[4]")
        rc = lib.nsb_sample(self.shared, buf)
        self.stats_dumps += int(buf[3])
        sent = max(self._bytes[0], int(buf[0]))
        received = max(self._bytes[1], int(buf[1]))
        self._bytes = (sent, received)
        mode = int(self.shared.bytes_mode)
        out: dict[str, Any] = {
            "bytes_sent": sent, "bytes_received": received, "bytes_live": int(buf[2]),
            "bytes_counted": {lib.NSB_BYTES_AT_CLOSE: "at close",
                              lib.NSB_BYTES_SAMPLED: "sampled"}.get(mode, "no")}
        if rc < 0:
            out["bytes_error"] = f"sock_diag: {os.strerror(-rc)}"
        return out

    def close_listener(self) -> None:
        if self.listener >= 0:
            os.close(self.listener)
            self.listener = -1

    def stop(self) -> None:
        if self.pid > 0:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = -1
        self.drain_audit()  # the records of the last moments
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.close_audit()
        self.close_listener()
