"""`nsnet run [OPTION]... [--] COMMAND [ARG]...`: run a command with its own
network, for an unprivileged user.

The nsnet process forks a child that unshares a user, a network, a mount
and (unless --share-pid) a PID namespace and then waits on a socketpair;
with a PID namespace the child forks its init (PID 1, nsnet/runinit.py),
which goes on with the set-up while the child waits outside for it.
nsnet itself (the supervisor) attaches to the init's (or the child's) PID
exactly as `nsnet PID tap0` would, publishes the requested ports, has it
configure lo and tap0, and only then lets it start COMMAND: COMMAND's
first instruction already has a configured network.

  nsnet (supervisor, host namespaces)          child
  ------------------------------------         -----------------------------
  block INT/TERM/HUP/QUIT, signalfd
  fork                                   -->   unshare(USER|NET|NS|PID)
                                               uid/gid map (self), "U"
  [newuidmap/newgidmap]             "M"  -->
                                               mounts: rslave /, resolv.conf
                                               fork init; "P" + its PID
                                               (the child: waiter, outside)
                                         <--   init: mount /proc; "N"
  helper_ns: TAP in the init's netns
  forwarder (libslirp) + --publish
                                    "C"  -->   configure lo + tap0 (rtnetlink), "c"
  ready-fd "1"; on_ready            "G"  -->   init: fork COMMAND (PID 2), which
                                               restores signals and execs
  poll loop: API socket, forwarder, signals (forwarded to the init, on to COMMAND)
  COMMAND exits -> init exits -> waiter exits -> teardown -> exit with
  COMMAND's status (128+N on signal N)

COMMAND stays in nsnet's process group, so the terminal, job control and
stdin/stdout/stderr pass through untouched.  Signals are forwarded as
sudo(8) does: not those the terminal generated (COMMAND's process group
got them already), not those COMMAND sent itself.

Exit status: COMMAND's; 125 when nsnet itself fails (bad options, namespace
or network set-up, network lost while COMMAND runs); 126 when COMMAND
cannot be executed; 127 when it is not found.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from . import fdlimit
from .proto import run as handshake  # the parent <-> child handshake's bytes

if TYPE_CHECKING:
    from .netconfig import NetConfig
    from .portspec import PortSpec
    from .host.bypass import Handler
    from .supervisor import Supervisor

PROG = "nsnet run"
EXIT_SETUP = 125
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127

SETUP_TIMEOUT = 30.0  # for each step of the child's set-up
STOP_GRACE = 5.0  # SIGTERM to SIGKILL when nsnet has to stop COMMAND

# How --publish ports are implemented (publish() is the one place that
# knows):
#   "splice"  TCP through the fast path (nsnet/supervisor/fastpath.py: the host side
#             accepts, a connector inside connects to the port on the
#             namespace's TAP address, splice(2) in between; the server sees
#             that address as peer); UDP through libslirp.  The default.
#   "slirp"   everything through libslirp's host forwards (the kind the
#             slirp4netns API adds; the server sees the gateway as peer).
PUBLISH_MODES = ("splice", "slirp")
DEFAULT_PUBLISH_MODE = "splice"

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = os.O_CLOEXEC

MAP_ROOT = "root"  # current uid/gid -> 0 (default)
MAP_CURRENT = "current"  # current uid/gid -> the same ids
MAP_SUBIDS = "subids"  # 0 -> current, 1.. -> /etc/subuid, /etc/subgid (newuidmap)

USAGE_HEAD = f"""\
Usage: {PROG} [OPTION]... [--] COMMAND [ARG]...
Run COMMAND in new user, network and mount namespaces with user-mode
networking (libslirp): the network is configured before COMMAND starts.
Without COMMAND, runs $SHELL.

"""
USAGE_TAIL = """
Exit status: COMMAND's (128+N when killed by signal N); 125 if nsnet fails,
126 if COMMAND cannot be executed, 127 if it is not found.
SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to nsnet are forwarded to COMMAND.
"""


def usage() -> str:
    from . import options as O

    return USAGE_HEAD + O.usage_rows(O.RUN) + USAGE_TAIL


class RunError(Exception):
    """nsnet run cannot go on; the message is printed, exit 125."""


class UsageError(RunError):
    """A bad command line (the usage is printed too)."""


@dataclass
class RunOptions:
    argv: list[str]
    net: "NetConfig"
    publish: list["PortSpec"] = field(default_factory=list)
    publish_mode: str = DEFAULT_PUBLISH_MODE
    dns: bool = True  # COMMAND's /etc/resolv.conf names nsnet's DNS
    dns_explicit: bool = False  # --dns given: a failure to do it is an error
    api_socket: str | None = None
    ready_fd: int | None = None
    map_mode: str = MAP_ROOT
    log_level: str = "warning"
    log_format: str = "text"
    tapname: str = "tap0"
    pidfile: str | None = None
    sandbox: bool = False
    seccomp: bool = False
    max_restarts: int = 5
    restart_window: float = 60.0
    policy: Any = None  # policy.Policy
    audit_all: bool = False
    audit_log: str | None = None
    pcap: str | None = None
    pcap_max_bytes: int = 0
    error_fd: int | None = None
    name: str | None = None
    registry_socket: bool = False
    bypass: bool = False
    bypass_bytes: str = "sampled"  # --bypass-bytes
    share_pid: bool = False


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def parse_args(argv: list[str]) -> RunOptions | None:
    """RunOptions, or None for --help. Raises UsageError."""
    from . import options as O
    from .getopt_long import GetoptError
    from .netconfig import (ConfigError, NetConfig, check_mtu, check_tapname, parse_cidr,
                            parse_cidr6)
    from .portspec import PortSpecError
    from .portspec import parse_many

    try:
        # POSIX mode: options end at COMMAND, whose own options stay its own.
        v, args, stop = O.parse(O.RUN, argv, posix=True)
    except GetoptError as e:
        raise UsageError(str(e)) from None
    except O.OptionError as e:
        raise UsageError(str(e)) from None
    if stop == "help":
        return None
    ro = RunOptions(argv=[], net=NetConfig())
    for text in v["publish"]:  # type: ignore[union-attr]
        try:
            ro.publish += parse_many(text)
        except PortSpecError as e:
            raise UsageError(f"--publish {e}") from None
    ro.publish_mode = v["publish_mode"]
    # Names resolve through nsnet by default (as with pasta); --no-dns, or
    # --disable-dns (no DNS to point at), keeps the host's resolv.conf.
    ro.dns = (not v["disable_dns"]) if v["dns"] is None else bool(v["dns"])
    ro.dns_explicit = v["dns"] is True
    ro.api_socket = v["api_socket"]
    ro.name = v["name"]
    if ro.name is not None:
        from . import registry

        try:
            sock = registry.claim_name(ro.name)
            if ro.api_socket is None:
                ro.api_socket = O.socket_path(sock)
                ro.registry_socket = True
        except (registry.RegistryError, O.OptionError) as e:
            raise UsageError(str(e)) from None
    if ro.api_socket is not None:
        from .diag import DiagError, check_socket_dir

        try:
            check_socket_dir(ro.api_socket)
        except DiagError as e:
            raise UsageError(str(e)) from None
    for name in ("ready_fd", "error_fd"):
        if v[name] is not None:
            setattr(ro, name, v[name])
            try:
                os.fstat(v[name])  # type: ignore[arg-type]
            except OSError:
                raise UsageError(f"--{name.replace('_', '-')}: fd {v[name]} is not open"
                                 ) from None
    ro.map_mode = v["map_user"]
    ro.log_level = v["log_level"]
    ro.log_format = v["log_format"]
    ro.pidfile = v["pidfile"]
    ro.sandbox = v["sandbox"]
    ro.seccomp = v["seccomp"]
    ro.max_restarts = v["max_restarts"]
    ro.restart_window = float(v["restart_window"])
    if v["egress"] or v["policy_rules"] or v["policy_file"]:  # else not on the path to ready
        from .policy import PolicyError, from_options

        try:
            ro.policy = from_options(v["egress"], v["policy_rules"], v["policy_file"])
        except PolicyError as e:
            raise UsageError(str(e)) from None
    ro.audit_all = v["audit"] == "all"
    ro.audit_log = v["audit_log"]
    ro.pcap = v["pcap"]
    ro.pcap_max_bytes = v["pcap_max_bytes"]
    ro.bypass = v["bypass"]
    if v["bypass_bytes"] is not None and not ro.bypass:
        raise UsageError("--bypass-bytes needs --bypass (it says how the bytes of bypassed "
                         "connections are counted)")
    ro.bypass_bytes = v["bypass_bytes"] or O.BYPASS_BYTES_DEFAULT
    ro.share_pid = v["share_pid"]
    if v["dns"] is True and v["disable_dns"]:
        raise UsageError("--dns names the built-in DNS, which --disable-dns turns off: "
                         "give one of them")
    if v["cidr6"] and not v["ipv6"]:
        raise UsageError("--cidr6 needs -6 (--enable-ipv6)")
    try:
        ro.tapname = check_tapname(v["tapname"])
        net = NetConfig(cidr=parse_cidr(v["cidr"]), mtu=check_mtu(v["mtu"]), ipv6=v["ipv6"],
                        disable_host_loopback=v["disable_host_loopback"],
                        restricted=v["no_egress"], offload=v["offload"],
                        disable_dns=v["disable_dns"],
                        cidr6=parse_cidr6(v["cidr6"]) if v["cidr6"] else None)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if v["outbound4"] or v["outbound6"]:
        from .cli import BadOption, resolve_outbound

        try:
            net = net._replace(
                outbound_addr=resolve_outbound(v["outbound4"], 4) if v["outbound4"] else None,
                outbound_addr6=resolve_outbound(v["outbound6"], 6) if v["outbound6"] else None)
        except BadOption as e:
            raise UsageError(str(e)) from None
    for spec in ro.publish:
        if ":" in spec.host_addr and not net.ipv6:
            raise UsageError(f"--publish {spec}: an IPv6 host address needs -6 (--enable-ipv6)")
    ro.net = net
    ro.argv = args or [os.environ.get("SHELL") or "/bin/sh"]
    return ro


def find_command(name: str) -> str:
    """The file execvp(name) would run; RunError(126/127) if there is none."""
    if "/" in name:
        candidates = [name]
    else:
        path = os.environ.get("PATH", os.defpath)
        candidates = [os.path.join(d or ".", name) for d in path.split(os.pathsep)]
    denied = None
    for c in candidates:
        if os.path.isfile(c):
            if os.access(c, os.X_OK):
                return c
            denied = c
    if denied is not None:
        raise _ExecError(EXIT_CANNOT_EXEC, f"{name}: Permission denied")
    raise _ExecError(EXIT_NOT_FOUND, f"{name}: command not found")


class _ExecError(RunError):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


# --------------------------------------------------------------------------
# libc calls the standard library lacks on 3.11
# --------------------------------------------------------------------------

class _Libc:
    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(self.ctypes.c_int(flags)), "unshare")

    def mount(self, src: str | None, target: str, flags: int, fstype: str | None = None) -> None:
        c = self.ctypes
        self._check(self.lib.mount(c.c_char_p(src.encode() if src else None),
                                   c.c_char_p(target.encode()),
                                   c.c_char_p(fstype.encode() if fstype else None),
                                   c.c_ulong(flags), c.c_void_p(None)),
                    f"mount {target}")

    def signalfd(self, signals: tuple[int, ...]) -> int:
        c = self.ctypes
        mask = (c.c_ulong * (1024 // (8 * c.sizeof(c.c_ulong))))()
        bits = 8 * c.sizeof(c.c_ulong)
        for s in signals:
            mask[(s - 1) // bits] |= 1 << ((s - 1) % bits)
        fd = self.lib.signalfd(-1, c.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC)
        self._check(fd, "signalfd")
        return int(fd)

    def set_pdeathsig(self, sig: int) -> None:
        self._check(self.lib.prctl(1, self.ctypes.c_ulong(sig), 0, 0, 0), "prctl")

    def set_dumpable(self, on: bool) -> None:
        self._check(self.lib.prctl(4, self.ctypes.c_ulong(int(on)), 0, 0, 0), "prctl")

    def set_name(self, name: str) -> None:
        self.lib.prctl(15, self.ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


# --------------------------------------------------------------------------
# User namespace maps
# --------------------------------------------------------------------------

def _subid_range(path: str, uid: int) -> tuple[int, int]:
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RunError(f"--map-subids: cannot read {path}: {e.strerror}") from None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (name, str(uid)):
            try:
                start, count = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            if count > 0:
                return start, count
    raise RunError(f"--map-subids: no range for {name or uid} in {path}")


def _newidmap(tool: str, pid: int, outer: int, rng: tuple[int, int]) -> None:
    import subprocess

    argv = [tool, str(pid), "0", str(outer), "1", "1", str(rng[0]), str(rng[1])]
    try:
        cp = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=SETUP_TIMEOUT)
    except FileNotFoundError:
        raise RunError(f"--map-subids needs {tool} (Debian: apt-get install uidmap)") from None
    except OSError as e:
        from .diag import why

        path = getattr(e, "filename", None) or tool
        raise RunError(f"--map-subids: cannot run {path}: {why(e)}; {tool} must be "
                       "executable by you (and setuid root, or have cap_setuid/cap_setgid "
                       "file capabilities)") from None
    except subprocess.TimeoutExpired:
        raise RunError(f"{tool} did not finish in {SETUP_TIMEOUT:g} s") from None
    if cp.returncode != 0:
        msg = cp.stderr.decode(errors="replace").strip()
        raise RunError(f"{' '.join(argv)} failed ({cp.returncode}): {msg}")


# --------------------------------------------------------------------------
# The child (becomes COMMAND)
# --------------------------------------------------------------------------

IPV6_WAIT = 10.0  # seconds -6 waits for the SLAAC address before COMMAND starts
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40


def _ipv6_sysctls(tapname: str) -> None:
    """No duplicate-address detection on the TAP (only libslirp is on that
    link) and an immediate router solicitation: the SLAAC address is usable
    as soon as libslirp's router advertisement arrives.  Best effort."""
    for name, value in (("accept_dad", "0"), ("router_solicitation_delay", "0")):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{tapname}/{name}", "w") as f:
                f.write(value)
        except OSError:
            pass


def _ipv6_ready(tapname: str) -> bool:
    """A global IPv6 address on tapname that is no longer tentative
    (/proc/net/if_inet6 of this network namespace)."""
    try:
        with open("/proc/net/if_inet6") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        if len(parts) == 6 and parts[5] == tapname and int(parts[3], 16) == 0 and \
                not int(parts[4], 16) & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            return True
    return False


def _wait_ipv6(tapname: str, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not _ipv6_ready(tapname):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _resolv_conf(net: "NetConfig") -> bytes:
    lines = ["# nsnet run: the built-in DNS of nsnet's virtual network, which",
             "# forwards queries to the host's resolver (--no-dns keeps the host's file).",
             f"nameserver {net.dns}"]
    if net.ipv6:
        lines.append(f"nameserver {net.dns6}")
    try:
        with open("/etc/resolv.conf") as f:
            lines += [ln.strip() for ln in f if ln.split()[:1] in (["search"], ["domain"])]
    except OSError:
        pass
    return ("\n".join(lines) + "\n").encode()


def _bind_resolv_conf(libc: _Libc, net: "NetConfig") -> None:
    """Bind-mount a resolv.conf naming nsnet's DNS over /etc/resolv.conf
    (in this mount namespace).  RunError says why not."""
    if not os.path.exists("/etc/resolv.conf"):
        raise RunError("/etc/resolv.conf does not exist (nothing to mount over)")
    base = os.environ.get("TMPDIR") or "/tmp"
    for _ in range(100):
        d = os.path.join(base, f"nsnet-run.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            os.mkdir(d, 0o700)
            break
        except FileExistsError:
            continue
        except OSError as e:
            from .diag import why

            raise RunError(f"cannot make a directory in {base} (TMPDIR): {why(e)}") from None
    else:
        raise RunError(f"cannot make a directory in {base}")
    path = os.path.join(d, "resolv.conf")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, _resolv_conf(net))
        finally:
            os.close(fd)
        libc.mount(path, "/etc/resolv.conf", MS_BIND)
    except OSError as e:
        from .diag import why

        raise RunError(f"cannot bind-mount a resolv.conf over /etc/resolv.conf: {why(e)}"
                       ) from None
    finally:
        # The mount keeps the file; nothing is left in TMPDIR.
        for rm, p in ((os.unlink, path), (os.rmdir, d)):
            try:
                rm(p)
            except OSError:
                pass


class _Child:
    """The code between fork and exec. Every failure ends in os._exit."""

    def __init__(self, runner: "Runner", sock: socket.socket) -> None:
        self.r = runner
        self.sock = sock

    def send(self, msg: bytes) -> None:
        self.sock.send(msg)

    def expect(self, want: bytes) -> None:
        msg = self.sock.recv(4096)
        if msg != want:  # EOF: nsnet gave up or died
            os._exit(EXIT_SETUP)

    def fail(self, msg: str) -> NoReturn:
        try:
            self.send(b"E" + msg.encode(errors="replace"))
        finally:
            os._exit(EXIT_SETUP)

    def main(self) -> NoReturn:
        r = self.r
        libc = r.libc
        try:
            libc.set_pdeathsig(signal.SIGKILL)
            if os.getppid() != r.parent_pid:
                os._exit(EXIT_SETUP)
            flags = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS
            if not r.opts.share_pid:
                flags |= CLONE_NEWPID  # for the children: the init forked below
            try:
                libc.unshare(flags)
            except OSError as e:
                self.fail(f"cannot create user, network, mount and PID namespaces: {e.strerror} "
                          "(are unprivileged user namespaces disabled? see the sysctls "
                          "kernel.unprivileged_userns_clone and user.max_user_namespaces)")
            if r.opts.map_mode != MAP_SUBIDS:
                inner_uid = 0 if r.opts.map_mode == MAP_ROOT else r.uid
                inner_gid = 0 if r.opts.map_mode == MAP_ROOT else r.gid
                try:
                    for name, text in (("setgroups", "deny"),
                                       ("uid_map", f"{inner_uid} {r.uid} 1\n"),
                                       ("gid_map", f"{inner_gid} {r.gid} 1\n")):
                        with open(f"/proc/self/{name}", "w") as f:
                            f.write(text)
                except OSError as e:
                    self.fail(f"cannot write the user namespace's {name}: {e.strerror}")
            self.send(b"U")
            self.expect(b"M")
            try:
                libc.mount(None, "/", MS_REC | MS_SLAVE)
            except OSError as e:
                self.fail("cannot make the mount namespace a slave of the host's: "
                          f"{e.strerror}")
            # (No file, or a dangling symlink, in the default mode: nothing to
            # mount over, and nsnet's warning about the resolver has said it.)
            if r.opts.dns and (r.opts.dns_explicit or os.path.exists("/etc/resolv.conf")):
                try:
                    _bind_resolv_conf(libc, r.opts.net)
                except RunError as e:
                    if r.opts.dns_explicit:
                        self.fail(f"--dns: {e}")
                    from . import log

                    log.say(f"{PROG}: warning: {r.opts.argv[0]} keeps the host's "
                            f"/etc/resolv.conf: {e}", "warning")
            if not r.opts.share_pid:
                self.become_init()  # the rest runs as PID 1 of the new namespace
            self.send(b"N")
            self.expect(b"C")
            from .ns import rtnl

            if r.opts.net.ipv6:
                _ipv6_sysctls(r.opts.tapname)
            try:
                rtnl.configure(r.opts.tapname, r.opts.net)
            except OSError as e:
                self.fail(f"cannot configure the network: {e}")
            if r.opts.net.ipv6 and not _wait_ipv6(r.opts.tapname, IPV6_WAIT):
                from . import log

                log.say(f"{PROG}: warning: no usable IPv6 address on {r.opts.tapname} after "
                        f"{IPV6_WAIT:g} s; starting {r.opts.argv[0]} anyway", "warning")
            if r.opts.bypass:
                self.send_bypass_listener()
            else:
                self.send(b"c")
            self.expect(b"G")
            self.exec()
        except BaseException as e:  # never return into the parent's code
            try:
                from . import log

                log.fail(PROG, f"setting up {r.opts.argv[0]} failed: {e!r}")
            finally:
                os._exit(EXIT_SETUP)

    def become_init(self) -> None:
        """Fork the PID namespace's init (nsnet/runinit.py), which returns
        here and goes on with the set-up; this process tells nsnet the
        init's PID and stays outside as the waiter."""
        from . import runinit

        libc = self.r.libc
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(go_r)
            self.send(b"P%d" % pid)
            os.close(go_w)
            runinit.waiter(pid)
        os.close(go_w)
        libc.set_pdeathsig(signal.SIGKILL)  # the waiter dies: so does the namespace
        os.read(go_r, 1)  # the waiter has sent the PID (or died: EOF either way)
        os.close(go_r)
        if os.getpid() != 1:
            os._exit(EXIT_SETUP)
        libc.set_name("nsnet-init")
        try:
            # COMMAND's /proc: its PID namespace's, not the host's.
            libc.mount("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "proc")
        except OSError as e:
            self.fail(f"cannot mount /proc for COMMAND's PID namespace: {e.strerror} "
                      "(--share-pid keeps the caller's PID namespace)")

    def send_bypass_listener(self) -> None:
        """--bypass: install the seccomp filter (the last thing before exec
        that nsnet's code does here makes no connect) and send its listener
        with "c", with what the handler needs to know about this netns."""
        from . import bypassfilter

        try:
            facts = bypassfilter.namespace_facts()
            listener = bypassfilter.install()
        except bypassfilter.FilterError as e:
            self.fail(str(e.strerror))
        except OSError as e:
            self.fail(f"--bypass: {e.strerror or e}")
        try:
            socket.send_fds(self.sock, [b"c" + facts], [listener])
        finally:
            os.close(listener)

    def exec(self) -> NoReturn:
        r = self.r
        for fd in (r.opts.ready_fd, r.opts.error_fd):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        if not r.opts.share_pid:
            from . import runinit

            self.sock.close()
            runinit.init(FORWARDED_SIGNALS, self._fork_command, r.libc.signalfd)
        self._exec_command()

    def _fork_command(self) -> int:
        pid = os.fork()
        if pid == 0:
            self._exec_command()
        return pid

    def _exec_command(self) -> NoReturn:
        r = self.r
        # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec.
        for s in (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, r.saved_mask)
        fdlimit.restore_soft(r.nofile_soft)  # nsnet raised its own (fdlimit.py)
        argv = r.opts.argv
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            from . import log
            from .diag import why

            hint = ""
            if isinstance(e, FileNotFoundError):
                try:
                    find_command(argv[0])
                    hint = " (the file is there: is the interpreter its #! line names missing?)"
                except RunError:
                    pass
            log.fail(PROG, f"{argv[0]}: {why(e)}{hint}")  # a JSON line with --log-format=json
            os._exit(EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_CANNOT_EXEC)


# --------------------------------------------------------------------------
# The parent: supervisor of the network, and of COMMAND
# --------------------------------------------------------------------------

def publish(sup: "Supervisor", specs: list["PortSpec"], mode: str) -> None:
    """Publish --publish ports (the one place that knows publish modes)."""
    from .forwards import publish_forward
    from .forwards import ForwardError, make_forward
    from .portspec import port_in_use

    if mode not in PUBLISH_MODES:
        raise RunError(f"publish mode {mode!r} is not available")
    for spec in specs:
        try:
            if mode == "splice":
                fwd = publish_forward(spec.host_port, spec.guest_port, spec.proto,
                                      spec.host_addr, spec.guest_addr,
                                      default_guest=sup.default_guest_addr,
                                      default_guest6=sup.default_guest_addr6)
            else:
                fwd = make_forward(spec.proto, spec.host_port, spec.guest_port,
                                   spec.host_addr, spec.guest_addr,
                                   default_guest=sup.default_guest_addr,
                                   default_guest6=sup.default_guest_addr6)
        except ForwardError as e:
            raise RunError(f"cannot publish {spec}: bad {e}") from None
        try:
            fid = sup.run_blocking(sup.api_add_forward(fwd))  # set-up: before the loop
        except ForwardError as e:
            why = str(e)
            if fwd.host_port and port_in_use(fwd.proto, fwd.host_addr, fwd.host_port):
                why = "address already in use"
            raise RunError(f"cannot publish {spec}: {why}") from None
        if spec.host_port == 0:  # the kernel picked it: the user needs to know
            got = sup.forwards.get(fid)
            if got is not None:
                host = f"[{got.host_addr}]" if ":" in got.host_addr else got.host_addr
                from . import log

                log.fail(PROG, f"published {host}:{got.host_port} -> port "
                               f"{got.guest_port}/{got.proto}",
                         {"event": "published", "level": "info", "host_addr": got.host_addr,
                          "host_port": got.host_port, "guest_port": got.guest_port,
                          "proto": got.proto})


class Runner:
    def __init__(self, opts: RunOptions, nofile_soft: int) -> None:
        self.opts = opts
        self.nofile_soft = nofile_soft  # COMMAND's soft RLIMIT_NOFILE
        self.libc = _Libc()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.parent_pid = os.getpid()
        self.saved_mask: set[int | signal.Signals] = set()
        self.sigfd = -1
        self.child = -1
        self.child_pidfd = -1
        # COMMAND's side for signals and the network: the child itself with
        # --share-pid, else the init of COMMAND's PID namespace (nsnet/runinit.py)
        self.cmd = -1
        self.cmd_pidfd = -1
        self.sock: socket.socket | None = None
        self.unblock_in_children = False
        self.go_sent = False
        import time

        self.t0 = time.monotonic()
        self.entry = None
        self.bypass_listener = -1
        self.bypass_facts = b""
        self.bypass: "Handler | None" = None

    # -- messages from the child ---------------------------------------------

    def send(self, msg: bytes) -> None:
        assert self.sock is not None
        self.sock.send(msg)

    def expect(self, want: bytes, step: str) -> None:
        assert self.sock is not None
        try:
            msg = self.sock.recv(65536)
        except socket.timeout:
            raise RunError(f"{step}: no answer from the child in {SETUP_TIMEOUT:g} s") from None
        text = handshake.error_text(msg)  # proto/run.py: bounded, printable
        if text is not None:
            raise RunError(text)
        if msg != want:
            raise RunError(f"{step}: the child exited ({self._reap_now()})")
        sig = self.pending_signal()
        if sig:
            raise _Interrupted(sig)

    def _reap_now(self) -> str:
        try:
            _, status = os.waitpid(self.child, 0)
        except ChildProcessError:
            return "already reaped"
        self.child = -1
        return f"status {os.waitstatus_to_exitcode(status)}"

    # -- signals -----------------------------------------------------------------

    def pending_signal(self) -> int:
        """The first terminating signal received so far (before COMMAND runs)."""
        first = 0
        for signo, _code, _pid in self._read_signals():
            first = first or signo
        return first

    def _read_signals(self) -> list[tuple[int, int, int]]:
        from .runinit import read_signals

        return read_signals(self.sigfd)

    def on_signals(self, _revents: int) -> None:
        from .runinit import should_forward

        for signo, code, sender in self._read_signals():
            if should_forward(code, sender, self.cmd):
                try:
                    os.kill(self.cmd, signo)
                except ProcessLookupError:
                    pass

    def _after_fork_in_child(self) -> None:
        # The helper and forwarder processes get the default signal mask.
        if self.unblock_in_children:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.saved_mask)

    # -- the run -------------------------------------------------------------------

    def run(self) -> int:
        from .ns import rtnl  # noqa: F401  (imported here so the child does not pay for it)

        sub_ranges = None
        if self.opts.map_mode == MAP_SUBIDS:
            sub_ranges = (_subid_range("/etc/subuid", self.uid),
                          _subid_range("/etc/subgid", self.uid))
        self.saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        self.sigfd = self.libc.signalfd(FORWARDED_SIGNALS)
        parent_sock, child_sock = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            parent_sock.close()
            os.close(self.sigfd)
            _Child(self, child_sock).main()
        child_sock.close()
        self.child = self.cmd = pid
        self.child_pidfd = os.pidfd_open(pid)
        self.sock = parent_sock
        parent_sock.settimeout(SETUP_TIMEOUT)
        self.unblock_in_children = True
        os.register_at_fork(after_in_child=self._after_fork_in_child)
        # When COMMAND is a shell that takes the terminal's foreground, nsnet
        # is in a background group: its warnings must not stop it (TOSTOP).
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        # While the child unshares, load what the next steps need.  Not the
        # libslirp binding: the namespace helpers forked during set-up must
        # never have it mapped (nsnet/ns/helper.py); the forwarder loads it
        # itself after its fork, and this process once they are started.
        from . import supervisor  # noqa: F401
        sup = None
        try:
            try:
                self.expect(b"U", "user namespace")
                if sub_ranges is not None:
                    _newidmap("newuidmap", pid, self.uid, sub_ranges[0])
                    _newidmap("newgidmap", pid, self.gid, sub_ranges[1])
                self.send(b"M")
                if not self.opts.share_pid:
                    self._expect_init()
                self.expect(b"N", "mount namespace")
                sup = self._start_supervisor()
                publish(sup, self.opts.publish, self.opts.publish_mode)
                self.send(b"C")
                # While the child configures its network: the forwarder's
                # code (libslirp's binding) for restarts, which signal_ready
                # would load otherwise.  Only now: the TAP helper and the
                # first connector, forked above, must never have it mapped
                # (nsnet/ns/helper.py; later ones exec a fresh interpreter).
                from .host import forwarder  # noqa: F401
                if self.opts.bypass:
                    self._expect_listener()
                    self._start_bypass(sup)
                else:
                    self.expect(b"c", "network configuration")
                sup.signal_ready()  # ready-fd, then on_ready: the child execs
            except _Interrupted as e:
                self._stop_child()
                return 128 + e.signo
            except RunError as e:
                _fail(str(e))
                self._stop_child()
                return EXIT_SETUP
            sup.loop()
            if self._child_running():
                _fail(f"network lost: {sup.exit_reason}; stopping {self.opts.argv[0]}")
                self._stop_child()
                return EXIT_SETUP
            return self._child_status()
        finally:
            if self.bypass is not None:
                self.bypass.stop()
            elif self.bypass_listener >= 0:
                os.close(self.bypass_listener)
            if self.entry is not None:
                self.entry.remove()
            if sup is not None:
                sup.teardown()
            if self.child > 0:
                self._stop_child()
            for fd in (self.child_pidfd, self.cmd_pidfd, self.sigfd):
                if fd >= 0:
                    os.close(fd)
            parent_sock.close()

    def _expect_init(self) -> None:
        """"P" and the host PID of the init of COMMAND's PID namespace."""
        assert self.sock is not None
        try:
            msg = self.sock.recv(65536)
        except socket.timeout:
            raise RunError("PID namespace: no answer from the child in "
                           f"{SETUP_TIMEOUT:g} s") from None
        if msg.startswith(b"E"):
            raise RunError(msg[1:].decode(errors="replace"))
        if not msg.startswith(b"P") or not msg[1:].isdigit():
            raise RunError(f"PID namespace: the child exited ({self._reap_now()})")
        self.cmd = int(msg[1:])
        try:
            self.cmd_pidfd = os.pidfd_open(self.cmd)
        except OSError as e:
            raise RunError(f"PID namespace: the init exited ({e.strerror})") from None

    def _expect_listener(self) -> None:
        """--bypass: "c" comes with the seccomp listener and the netns facts."""
        from .bypassfilter import FACTS_SIZE

        assert self.sock is not None
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 1)
        except socket.timeout:
            raise RunError("network configuration: no answer from the child in "
                           f"{SETUP_TIMEOUT:g} s") from None
        for fd in fds[1:]:
            os.close(fd)
        if fds:
            self.bypass_listener = fds[0]
        text = handshake.error_text(msg)
        if text is not None:
            raise RunError(text)
        if not msg.startswith(b"c") or len(msg) != 1 + FACTS_SIZE or not fds:
            raise RunError(f"network configuration: the child exited ({self._reap_now()})")
        self.bypass_facts = msg[1:]
        sig = self.pending_signal()
        if sig:
            raise _Interrupted(sig)

    def _start_bypass(self, sup: "Supervisor") -> None:
        from .bypassfilter import unpack_facts
        from .host.bypass import BypassError, Handler, check_access, check_kernel

        try:
            check_kernel(self.bypass_listener)
            check_access(self.cmd)
            h = Handler(self.bypass_listener, self.opts.net, unpack_facts(self.bypass_facts),
                        sup.default_guest_addr6, policy=self.opts.policy,
                        bytes_mode=self.opts.bypass_bytes,
                        on_give_up=lambda why: sup._finish(EXIT_SETUP, why),
                        seccomp=self.opts.seccomp)
        except BypassError as e:
            raise RunError(str(e)) from None
        self.bypass_listener = -1
        self.bypass = h

        # The egress policy's audit log records the handler's decisions
        # (docs/policy.md): which ones depends on the policy, which
        # set_policy can create at run time.
        def audit_settings(*_args: Any) -> None:
            pc = sup.policy
            h.set_audit(pc is not None and pc.active, pc is not None and pc.audit_all)

        def on_audit(records: list[dict[str, Any]]) -> None:
            if sup.policy is not None:
                sup.policy.on_bypass_audit(records)

        audit_settings()
        h.on_audit = on_audit
        h.start()
        watch = sup.opts.watch_fds
        mine: dict[int, Any] = {}

        def rewatch() -> None:  # the handler's fds change with a restart
            for fd, fn in mine.items():
                if watch.get(fd) is fn:
                    del watch[fd]
            mine.clear()
            if h.pidfd >= 0:
                mine[h.pidfd] = on_exit
            if h.audit_sock is not None:
                mine[h.audit_sock.fileno()] = on_audit_readable
            watch.update(mine)

        def on_exit(ev: int) -> None:
            h.on_exit(ev)
            rewatch()

        def on_audit_readable(ev: int) -> None:
            h.read_audit(ev)
            rewatch()

        rewatch()
        sup.stats_sources["bypass"] = lambda: h.stats(
            sup.policy.bypass_audit_capped if sup.policy is not None else 0)
        sup.policy_listeners.append(audit_settings)
        # set_policy: new connects follow it (policy_changed narrows the
        # scope); connections already bypassed cannot be cut, so a
        # set_policy that would cut established flows is refused once
        # anything may have been bypassed.
        sup.policy_listeners.append(h.policy_changed)

        def blocked_by() -> str | None:
            if not any(h.scope.values()) and not h.stats()["bypassed"]:
                return None
            return ("--bypass: connections that bypass libslirp cannot be cut by a policy "
                    "set at run time; give keep_established: true (connects from then on "
                    "follow the new policy), or start nsnet run with the policy (--egress, "
                    "--allow, --deny)")

        sup.policy_blocked_by = blocked_by

    def _start_supervisor(self) -> "Supervisor":
        from .ns.helper import Target
        from .supervisor import Options, SetupError, Supervisor

        from . import diag, log

        o = self.opts
        line, fields = diag.start_line(o.net, target=f"pid {self.cmd}", tapname=o.tapname,
                                       api_socket=o.api_socket, pcap=o.pcap,
                                       pcap_max_bytes=o.pcap_max_bytes,
                                       extra={"publish": [str(p) for p in o.publish],
                                              "resolv_conf": "nsnet" if o.dns else "host"})
        log.get("nsnet").info(line, extra={"fields": fields})
        warn = diag.dns_warning(o.net, rewrite=o.dns, policy=o.policy,
                                why_not="--disable-dns" if o.net.disable_dns else "--no-dns")
        if warn is not None:
            log.get("nsnet").warning(warn[0], extra={"fields": warn[1]})
        sopts = Options(target=Target.from_pid(self.cmd), tapname=o.tapname, net=o.net,
                        configure=False, ready_fd=o.ready_fd, api_socket=o.api_socket,
                        exit_with_target=True, pidfile=o.pidfile, sandbox=o.sandbox,
                        seccomp=o.seccomp, max_restarts=o.max_restarts,
                        restart_window=o.restart_window, on_ready=self._release,
                        watch_fds={self.sigfd: self.on_signals}, policy=o.policy,
                        audit_all=o.audit_all, audit_log=o.audit_log,
                        pcap=o.pcap, pcap_max_bytes=o.pcap_max_bytes)
        sup = Supervisor(sopts)
        try:
            sup.setup()
        except SetupError as e:
            sup.teardown()
            raise RunError(f"cannot set up the network: {e}") from None
        except BaseException:
            sup.teardown()
            raise
        return sup

    def _release(self, _sup: "Supervisor") -> None:
        """The network is ready: let the child exec COMMAND."""
        import time

        from . import log

        ms = (time.monotonic() - self.t0) * 1000
        log.get("nsnet").info(
            f"ready in {ms:.1f} ms: {self.opts.tapname} configured; starting "
            f"{self.opts.argv[0]}", extra={"fields": {"event": "ready", "ms": round(ms, 3),
                                                      "tap": self.opts.tapname,
                                                      "command": self.opts.argv}})
        from . import registry

        self.entry = registry.Entry(
            name=self.opts.name, kind="run", target=f"pid {self.cmd}",
            tapname=self.opts.tapname, api_socket=self.opts.api_socket,
            command=self.opts.argv, registry_socket=self.opts.registry_socket)
        try:
            self.entry.add()
        except (OSError, registry.RegistryError) as e:
            log.get("nsnet").warning(f"not listed by nsnet ps: {e}")
        self.go_sent = True
        try:
            self.send(b"G")
        except OSError:
            pass  # the child is gone: the loop sees it exit

    def _child_running(self) -> bool:
        """COMMAND's side still runs (the child, or the init of its PID
        namespace: the waiter outlives it by a moment)."""
        import select

        if self.child <= 0:
            return False
        fd = self.cmd_pidfd if self.cmd_pidfd >= 0 else self.child_pidfd
        r, _, _ = select.select([fd], [], [], 0)
        return not r

    def _child_status(self) -> int:
        _, status = os.waitpid(self.child, 0)
        self.child = -1
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def _stop_child(self) -> None:
        """SIGTERM (SIGKILL before COMMAND runs, or after STOP_GRACE), reap.
        With a PID namespace, the signal goes to its init, which forwards
        SIGTERM to COMMAND; its death ends everything in the namespace."""
        import select

        if self.child <= 0:
            return
        # Before "G" the child is nsnet's own code with the signals blocked.
        sig = signal.SIGTERM if self.go_sent else signal.SIGKILL
        try:
            os.kill(self.cmd, sig)
            r, _, _ = select.select([self.child_pidfd], [], [], STOP_GRACE)
            if not r:
                os.kill(self.cmd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.cmd != self.child:
            try:
                os.kill(self.child, signal.SIGKILL)  # the waiter, if still there
            except ProcessLookupError:
                pass
        try:
            os.waitpid(self.child, 0)
        except ChildProcessError:
            pass
        self.child = -1


class _Interrupted(RunError):
    def __init__(self, signo: int) -> None:
        super().__init__(f"interrupted by signal {signo}")
        self.signo = signo


_error_fd: int | None = None


def _fail(msg: str) -> None:
    """nsnet run's last words: on stderr (a JSON line with
    --log-format=json), and on --error-fd for a program that keeps stderr
    for COMMAND (the Python API's Popen)."""
    global _error_fd
    from . import log

    log.fail(PROG, msg)
    if _error_fd is not None:
        try:
            os.write(_error_fd, msg.encode(errors="replace") + b"\n")
            os.close(_error_fd)
        except OSError:
            pass
        _error_fd = None


def main(argv: list[str]) -> int:
    global _error_fd
    from . import log

    if log.wants_json(argv):
        log.setup("warning", "json")
    try:
        opts = parse_args(argv)
    except UsageError as e:
        _fail(f"{e}" if log.wants_json(argv) else f"{e}\nTry 'nsnet run --help'.")
        return EXIT_SETUP
    if opts is None:
        sys.stdout.write(usage())
        sys.stdout.flush()
        return 0
    _error_fd = opts.error_fd
    log.setup(opts.log_level, opts.log_format)
    try:
        find_command(opts.argv[0])
    except _ExecError as e:
        _fail(str(e))
        return e.code
    try:
        nofile_soft = fdlimit.raise_at_start()
    except fdlimit.FdLimitError as e:
        _fail(str(e))
        return EXIT_SETUP
    try:
        return Runner(opts, nofile_soft).run()
    except RunError as e:
        _fail(str(e))
        return EXIT_SETUP
