"""The forwarder: libslirp in the host namespace, with no privilege.

A child of the supervisor.  It receives the TAP fd and a control socket,
creates the Slirp instance, re-adds the port forwards it is given, says
"ready", and then runs the C data path (slirp.Slirp.run) in turns.  Between
turns it answers the supervisor's control requests (add/remove forward,
statistics).  It never touches the API socket: a slow API client cannot
stall the data path.

Exit codes: 0 when the supervisor closes the control socket, 1 when
libslirp refuses the configuration, 3 when the TAP fails (interface
deleted inside the namespace), 4 when poll(2) fails.

Fault injection (tests, docs/lifecycle.md): when the environment variable
NSNET_FAULT_FORWARDER_START names a file that exists when a forwarder
starts, that forwarder reports a start failure and exits 1 (so a test can
make every restart fail from outside, by creating the file); when the file
holds the word "hang", the forwarder never gets ready (the supervisor's
start timeout kills it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any

from .. import fdlimit, linux, log
from ..forwards import Forward
from ..proto import forwarder as proto
from ..proto.wire import MAX_MSG, ProtocolError, encode
from ..netconfig import NetConfig
from .slirp import RUN_CONTROL, RUN_POLL_ERROR, RUN_TAP_ERROR, Slirp, SlirpError

EXIT_OK = 0
EXIT_SLIRP_FAILED = 1
EXIT_TAP_ERROR = 3
EXIT_POLL_ERROR = 4
EXIT_SANDBOX_FAILED = 5
EXIT_PROTOCOL = 6  # the supervisor sent something proto/forwarder.py refuses

FAULT_START_ENV = "NSNET_FAULT_FORWARDER_START"

# How long one C-loop turn may run before Python gets control back even
# when nothing happens on the control socket.
TURN_BUDGET_MS = 1000
# At most one line about connections refused at the fd limit this often.
FD_LOG_WINDOW = 10.0
# Sockets listed in a stats reply (a hostile namespace can open thousands).
STATS_MAX_CONNECTIONS = 512
# Egress-policy audit records per control message (one SEQPACKET message).
AUDIT_BATCH = 128


def _send(ctl: socket.socket, msg: dict[str, Any]) -> None:
    try:
        ctl.send(encode(msg))
    except OSError:
        pass  # the supervisor is gone; the next recv says so


# libslirp 4.7 listens on a TCP port forward with a backlog of 1: under a
# burst of connections the host's accept queue overflows and libslirp loses
# connections (measured: 50 of 200 concurrent clients failed; slirp4netns
# 1.2.0 123 of 200).  nsnet raises the backlog of the socket libslirp just
# created: the lowest fd that was free before slirp_add_hostfwd.
FORWARD_BACKLOG = 4096


def _lowest_free_fd() -> int:
    fd = 3
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            return fd
        fd += 1


def _raise_backlog(first: int, port: int) -> int | None:
    """The listener's fd, its backlog raised (None: not found)."""
    for fd in range(first, first + 8):
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if (s.type == socket.SOCK_STREAM
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and s.getsockname()[1] == port):
                s.listen(FORWARD_BACKLOG)
                return fd
        except OSError:
            pass
        finally:
            s.detach()
    return None


class Forwarder:
    def __init__(self, net: NetConfig, tap_fd: int, ctl: socket.socket) -> None:
        self.net = net
        self.ctl = ctl
        self.slirp = Slirp(net, tap_fd, ctl.fileno())
        self.listeners: dict[tuple[str, int], int] = {}  # TCP forwards' listening fds
        self.fd_refused_logged = 0  # connections refused at the fd limit, logged
        self.fd_refused_at = float("-inf")
        self.policy: Any = None  # policy.Policy in force
        self._policy_parts: list[str] = []
        self.pcap_on = False
        self.pcap_fd = -1  # this process's copy of the capture file
        self.pcap_max = 0
        self.pcap_logged = False

    def set_pcap(self, fd: int, max_bytes: int) -> None:
        """--pcap: the supervisor's open capture file.  A restarted
        forwarder appends where its predecessor stopped (the offset of the
        open file it shares)."""
        offset = os.lseek(fd, 0, os.SEEK_END)
        self.stop_pcap()
        self.pcap_fd = fd
        self.pcap_on = True
        self.pcap_max = max_bytes
        self.pcap_logged = offset >= max_bytes > 0  # its predecessor said so
        self.slirp.set_pcap(fd, offset, max_bytes)

    def start_pcap(self, fd: int, max_bytes: int) -> None:
        """start_capture: a file the supervisor just created (empty: no
        lseek, which seccomp does not allow)."""
        self.stop_pcap()
        self.pcap_fd = fd
        self.pcap_on = True
        self.pcap_max = max_bytes
        self.pcap_logged = False
        self.slirp.set_pcap(fd, 0, max_bytes)

    def stop_pcap(self) -> None:
        if self.pcap_fd >= 0:
            self.slirp.set_pcap(-1, 0, 0)
            os.close(self.pcap_fd)
        self.pcap_fd = -1
        self.pcap_on = False

    def check_pcap(self) -> None:
        """Say once that the capture stopped."""
        full = self.slirp.pcap_full()
        if full:
            self.pcap_logged = True
            log.get("nsnet.forwarder").warning(
                f"--pcap: capture stopped: the file reached --pcap-max-bytes={self.pcap_max}"
                if full == 1 else
                "--pcap: capture stopped: a write to the capture file failed (disk full?)")

    def set_policy(self, req: dict[str, Any]) -> None:
        """Enforce a policy from the next frame on.  At start: {"policy":
        its JSON form, "audit_all": bool}.  From the supervisor's
        set_policy: {"op": "policy", "last_part": text, "parts": n,
        "keep_established": bool, "audit_all": bool}, after n-1
        "policy_part" requests (one control message is at most 64 KiB)."""
        from ..policy import Policy  # imported before any sandbox (main)

        self.send_audit()  # records of the old policy name its rules
        if "policy" in req:
            pol = Policy.parse_json(req["policy"])
        else:
            parts = self._policy_parts + [req.get("last_part", "")]
            self._policy_parts = []
            if len(parts) != req.get("parts"):
                raise ValueError("policy parts missing")
            pol = Policy.parse_json("".join(parts))
        self.policy = pol
        self.slirp.set_policy(pol, keep_established=bool(req.get("keep_established")),
                              audit_all=bool(req.get("audit_all")))

    def send_audit(self) -> None:
        rules = self.policy.rules if self.policy is not None else []
        while True:
            records = self.slirp.audit_records(AUDIT_BATCH)
            if not records:
                return
            for r in records:
                i = r.get("rule")
                r["rule_text"] = (f"{rules[i].action} {rules[i].text()}"
                                  if i is not None and 0 <= i < len(rules)
                                  else "dns: no rule allows this name" if r.get("dns_refused")
                                  else f"default {r['action']}")
            _send(self.ctl, {"event": "audit", "records": records})

    def add(self, fwd: Forward) -> None:
        if fwd.is_udp:
            self.slirp.set_udp_forward(fwd.guest_port, True)
        lowest = _lowest_free_fd()
        self.slirp.add_hostfwd(fwd.is_udp, fwd.host_addr, fwd.host_port,
                               fwd.guest_addr, fwd.guest_port)
        if not fwd.is_udp:
            fd = _raise_backlog(lowest, fwd.host_port)
            if fd is not None:  # refused, not spun on, at the fd limit
                self.slirp.set_listener(fd, True)
                self.listeners[(fwd.host_addr, fwd.host_port)] = fd

    def handle(self, req: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        """One request; fds: what came with it (a "pcap" request's file;
        any other is closed)."""
        fds = list(fds or [])
        try:
            return self._handle(req, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _handle(self, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = req.get("op")
        try:
            if op == "add":
                self.add(Forward(**req["forward"]))
                return {"ok": True}
            if op == "remove":
                f = Forward(**req["forward"])
                fd = None if f.is_udp else self.listeners.pop((f.host_addr, f.host_port), None)
                if fd is not None:
                    self.slirp.set_listener(fd, False)
                self.slirp.remove_hostfwd(f.is_udp, f.host_addr, f.host_port)
                if f.is_udp:
                    self.slirp.set_udp_forward(f.guest_port, False)
                return {"ok": True}
            if op == "policy_part":
                if req.get("index") == 0:
                    self._policy_parts = []
                if req.get("index") != len(self._policy_parts):
                    raise ValueError("policy part out of order")
                self._policy_parts.append(str(req["data"]))
                return {"ok": True}
            if op == "policy":
                self.set_policy(req)
                return {"ok": True}
            if op == "stats":
                # One SEQPACKET message must hold the reply: list at most
                # STATS_MAX_CONNECTIONS sockets, count them all.
                lines = self.slirp.connection_info().splitlines()
                return {"ok": True, "stats": self.slirp.stats(),
                        "policy": self.slirp.policy_stats(),
                        "connections": "\n".join(lines[:1 + STATS_MAX_CONNECTIONS]),
                        "connections_total": max(0, len(lines) - 1)}
            if op == "ping":
                return {"ok": True}
            if op == "pcap":
                if not fds:
                    return {"ok": False, "error": "pcap: no file descriptor came with it"}
                self.start_pcap(fds.pop(), int(req["max_bytes"]))
                return {"ok": True}
            if op == "pcap_stop":
                self.stop_pcap()
                return {"ok": True}
        except (SlirpError, KeyError, TypeError, ValueError) as e:  # PolicyError too
            return {"ok": False, "error": str(e)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def check_fd_refused(self) -> None:
        """A warning when the C loop refused forwarded connections at the fd
        limit: at most one every FD_LOG_WINDOW seconds, with the count."""
        n = self.slirp.fd_refused()
        now = time.monotonic()
        if n == self.fd_refused_logged or now - self.fd_refused_at < FD_LOG_WINDOW:
            return
        log.get("nsnet.forwarder").warning(
            f"forwarder: refused {n - self.fd_refused_logged} connection(s) to port forwards: "
            f"{fdlimit.exhausted(OSError(errno.EMFILE, os.strerror(errno.EMFILE)), False)}")
        self.fd_refused_logged = n
        self.fd_refused_at = now

    def serve(self) -> int:
        """Run until the supervisor hangs up or the TAP fails."""
        self.ctl.setblocking(False)
        while True:
            rc = self.slirp.run(TURN_BUDGET_MS)
            self.check_fd_refused()
            if self.pcap_on and not self.pcap_logged:
                self.check_pcap()
            if self.policy is not None:
                self.send_audit()  # RUN_EVENTS, or what a turn left
            if rc == RUN_CONTROL:
                while True:
                    try:
                        data, fds, _flags, _addr = socket.recv_fds(self.ctl, MAX_MSG + 1, 1)
                    except BlockingIOError:
                        break
                    except OSError:
                        return EXIT_OK
                    if not data:
                        return EXIT_OK
                    try:
                        req = proto.parse_request(data)
                    except ProtocolError as e:
                        for fd in fds:
                            os.close(fd)
                        log.get("nsnet.forwarder").error(
                            f"forwarder: bad request from the supervisor ({e}); exiting")
                        return EXIT_PROTOCOL
                    reply = self.handle(req, fds)
                    reply["reply_to"] = req["seq"]
                    _send(self.ctl, reply)
            elif rc == RUN_TAP_ERROR:
                err = self.slirp.tap_error()
                _send(self.ctl, {"event": "tap_error", "error": err})
                log.get("nsnet.forwarder").error(
                    f"forwarder: TAP failed ({err}): the interface is gone")
                return EXIT_TAP_ERROR
            elif rc == RUN_POLL_ERROR:
                _send(self.ctl, {"event": "poll_error"})
                return EXIT_POLL_ERROR


def _receive_tap(ctl: socket.socket) -> int | None:
    """The TAP fd the supervisor sends once the namespace helper has it
    ({"op": "tap"} with the fd); None if the supervisor gave up."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(ctl, MAX_MSG + 1, 1)
    except OSError:
        return None
    try:
        proto.parse_tap(data, len(fds))
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        return None
    return fds[0]


def main(net: NetConfig, tap_fd: int | None, ctl: socket.socket,
         forwards: list[tuple[int, Forward]], sandbox: bool = False,
         seccomp: bool = False, policy: dict[str, Any] | None = None,
         pcap: tuple[int, int] | None = None) -> int:
    """Entry point in the forked forwarder process.  tap_fd None: the TAP
    comes over ctl once the namespace helper has made it (the first
    forwarder sets libslirp up meanwhile).  policy: {"policy": the egress
    policy's JSON form, "audit_all": bool} (the supervisor's current one:
    a restarted forwarder enforces what its predecessor did).  pcap: (the
    capture file's fd, opened by the supervisor; its size cap, 0 none)."""
    # fork_child (children.py) has set PR_SET_PDEATHSIG, the process name,
    # and the signals: terminal signals go to the whole process group, so
    # SIGINT and SIGHUP are ignored (the supervisor decides what happens),
    # SIGPIPE too; the forwarder dies on SIGTERM/SIGKILL.
    fault = os.environ.get(FAULT_START_ENV)
    if fault and os.path.exists(fault):
        with open(fault) as f:
            if f.read().strip() == "hang":  # never ready: the start timeout's case
                while True:
                    select.select([], [], [])
        _send(ctl, {"event": "failed", "error": f"injected start failure ({FAULT_START_ENV})"})
        return EXIT_SLIRP_FAILED
    linux.raise_fd_limit()  # every guest connection is a host socket
    try:
        fw = Forwarder(net, -1 if tap_fd is None else tap_fd, ctl)
    except SlirpError as e:
        _send(ctl, {"event": "failed", "error": str(e)})
        return EXIT_SLIRP_FAILED
    if policy is not None:
        # Before the TAP: no frame passes unjudged.
        try:
            fw.set_policy(policy)
        except (SlirpError, ValueError) as e:
            _send(ctl, {"event": "failed", "error": f"egress policy: {e}"})
            return EXIT_SLIRP_FAILED
    if pcap is not None:
        try:
            fw.set_pcap(*pcap)
        except OSError as e:
            _send(ctl, {"event": "failed", "error": f"--pcap: {e.strerror or e}"})
            return EXIT_SLIRP_FAILED
    if tap_fd is None:
        tap_fd = _receive_tap(ctl)
        if tap_fd is None:
            return EXIT_SLIRP_FAILED  # the supervisor is stopping this one
        fw.slirp.set_tap(tap_fd)
    os.set_blocking(tap_fd, False)
    if sandbox or seccomp:
        # A policy set later (set_policy) is parsed in here, where a
        # sandboxed forwarder can no longer read modules.
        from .. import policy as _policy  # noqa: F401
        from .. import sandbox as sandbox_mod

        try:
            sandbox_mod.enter(sandbox=sandbox, seccomp=seccomp, forwards=forwards)
        except sandbox_mod.SandboxError as e:
            _send(ctl, {"event": "failed", "error": str(e)})
            return EXIT_SANDBOX_FAILED
    failed = []
    for fid, fwd in forwards:
        try:
            fw.add(fwd)
        except SlirpError:
            failed.append(fid)
    _send(ctl, {"event": "ready", "pid": os.getpid(), "failed_forwards": failed})
    return fw.serve()
