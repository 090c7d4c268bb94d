"""The namespace helpers: short-lived children that join the target's user
and network namespaces; the TAP helper opens (or attaches to) the TAP
device, configures it when asked, hands the TAP fd to the host side over
SCM_RIGHTS, and exits; the interface helper reports the TAP as the
namespace sees it (get_info "interface").  spawn() also starts the fast
path's connector (connector.py).

Every process that enters the target's namespaces is reachable by the
namespace's root, who holds every capability there, CAP_SYS_PTRACE
included.  So each one (issue 11):
- is made non-dumpable before its first setns (linux.set_undumpable):
  the kernel then asks for CAP_SYS_PTRACE over the user namespace the
  process was created in (the host's), which the namespace's root lacks:
  no ptrace, pidfd_getfd, /proc/PID/{mem,environ,fd,root,cwd,maps};
- enters through namespace fds the supervisor opened once at start
  (NsFds), never through /proc/PID again (the PID may have been reused),
  and closes them once inside;
- holds only its socket back, stdin/stdout on /dev/null and stderr (the
  log);
- drops every capability once its namespace work is done;
- never has libslirp or glib mapped: it is forked from the supervisor
  while the supervisor has not loaded the libslirp binding (during
  set-up), and once it has, it execs a fresh interpreter before it does
  anything else (spawn(); the exec happens in the host's user namespace,
  before the process becomes undumpable and joins the target's).

Each is forked from the single-threaded supervisor, so setns(CLONE_NEWUSER)
is allowed, and it always leaves with os._exit: nothing of the parent's
Python state (atexit handlers, buffered files) runs twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
from collections import namedtuple

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Callable

from .. import fdpass, linux, log
from ..children import fork_child
from ..netconfig import NetConfig
from ..proto import helper as proto
from ..proto.wire import MAX_MSG, ProtocolError


SIOCGIFHWADDR = 0x8927


class HelperError(RuntimeError):
    """The helper failed; the reason has been printed on stderr."""


class Target(namedtuple("Target", ("netns", "userns", "pid"), defaults=(None,))):
    """Where the TAP goes: a PID's namespaces, or namespace paths: netns is
    the path of the network namespace file, userns that of the user
    namespace (or None), pid the target's PID (None in path mode)."""

    __slots__ = ()

    @classmethod
    def from_pid(cls, pid: int) -> "Target":
        return cls(f"/proc/{pid}/ns/net", f"/proc/{pid}/ns/user", pid)

    @classmethod
    def from_path(cls, netns: str, userns: str | None) -> "Target":
        return cls(netns, userns, None)


def _configure(tapname: str, net: NetConfig) -> None:
    """Plain rtnetlink (rtnl.py) on the path to ready: pyroute2's import
    alone would triple nsnet's time to ready."""
    from .rtnl import configure

    configure(tapname, net)


def _ifindex(tapname: str) -> int:
    try:
        return socket.if_nametoindex(tapname)
    except OSError:
        return 0


def _mac(tapname: str) -> str | None:
    """The TAP's MAC address (SIOCGIFHWADDR), as hex."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifr = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", tapname.encode()))
    except OSError:
        return None
    finally:
        s.close()
    return ifr[18:24].hex()


class NsFds:
    """The target's namespace files, opened once at start (open_namespaces)
    and kept by the supervisor, so that every later helper joins the same
    namespaces even if the target PID exits and the PID is reused.  Only
    namespace-side children get them (spawn() names them; fork_child
    closes every other fd, so the forwarder and the relay never hold
    them)."""

    __slots__ = ("net", "user")

    def __init__(self, net: int, user: int | None) -> None:
        self.net = net
        self.user = user

    def fds(self) -> list[int]:
        return [fd for fd in (self.net, self.user) if fd is not None and fd >= 0]

    def close(self) -> None:
        for fd in self.fds():
            try:
                os.close(fd)
            except OSError:
                pass
        self.net, self.user = -1, None


def open_namespaces(target: Target) -> NsFds:
    """Open the target's network (and user) namespace files.  Raises
    HelperError saying which file and the errno's text."""
    fds: list[int] = []
    try:
        for path in (target.netns, target.userns):
            if path:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise HelperError(f"cannot open {e.filename}: {e.strerror}") from None
    return NsFds(fds[0], fds[1] if len(fds) > 1 else None)


def enter_namespaces(ns: NsFds) -> bool:
    """Become non-dumpable, then join the target's user (if any) and
    network namespaces through ns, and close ns; False, with the reason
    printed on stderr, if that failed.  Only in a freshly forked,
    single-threaded child (also used by the fast path's connector)."""
    try:
        linux.set_undumpable()  # before anything in the namespace can see us
    except OSError as e:
        log.say(f"{e}")
        return False
    if ns.user is not None:
        try:
            linux.setns(ns.user, linux.CLONE_NEWUSER)
        except OSError as e:
            # Already in that user namespace (EINVAL), or the caller has
            # privilege in the network namespace anyway: go on, as
            # slirp4netns does; setns(net) below says if it matters.
            if e.errno not in (errno.EINVAL, errno.EPERM):
                log.say(f"setns(user): {e.strerror}")
    try:
        linux.setns(ns.net, linux.CLONE_NEWNET)
    except OSError as e:
        log.say(f"setns(net): {e.strerror}")
        return False
    finally:
        ns.close()
    return True


def drop_capabilities() -> bool:
    """Every capability given up (the namespace work is done); False, with
    the reason on stderr, if that failed."""
    try:
        linux.drop_capabilities()
    except OSError as e:
        log.say(f"cannot drop capabilities: {e.strerror}")
        return False
    return True


def _tap(ns: NsFds, sock: socket.socket, tapname: str, net: NetConfig,
         configure: bool) -> int:
    if not enter_namespaces(ns):
        return 1
    try:
        tapfd = linux.open_tap(tapname, vnet_hdr=net.offload, mtu=net.mtu)
    except OSError as e:
        from ..diag import tap_error

        log.say(tap_error(tapname, e))
        return 1
    if configure:
        try:
            _configure(tapname, net)
        except OSError as e:
            log.say(f"cannot configure {tapname}: {e}")
            return 1
    if not drop_capabilities():
        return 1
    fdpass.send_fds(sock, {"ifindex": _ifindex(tapname), "mac": _mac(tapname)}, [tapfd])
    return 0


def _interface(ns: NsFds, sock: socket.socket, tapname: str) -> int:
    if not enter_namespaces(ns) or not drop_capabilities():
        return 1
    return _describe(tapname, sock)


def _netfacts(ns: NsFds, sock: socket.socket) -> int:
    """What the bypass handler must know of the namespace (--bypass-listener):
    its SO_NETNS_COOKIE, a fresh TCP socket's buffer sizes."""
    if not enter_namespaces(ns) or not drop_capabilities():
        return 1
    from ..bypassfilter import FilterError, namespace_facts, unpack_facts

    try:
        cookie, snd, rcv = unpack_facts(namespace_facts())
    except FilterError as e:
        fdpass.send_fds(sock, {"error": str(e)}, [])
        return 0
    fdpass.send_fds(sock, {"cookie": cookie, "sndbuf": snd, "rcvbuf": rcv}, [])
    return 0


def netfacts(ns: NsFds, timeout: float = 10.0) -> tuple[int, int, int]:
    """(netns cookie, SO_SNDBUF, SO_RCVBUF) of the target's namespace, read
    by a helper inside it.  HelperError when that fails."""
    msg = _ask("netfacts", ns, {}, timeout, proto.parse_netfacts)
    return msg["cookie"], msg["sndbuf"], msg["rcvbuf"]


def _connector(ns: NsFds, sock: socket.socket, seccomp: bool = False) -> int:
    from .connector import connector_main

    return connector_main(ns, sock, seccomp)


# What spawn() can start after an exec (their arguments are JSON): the TAP
# helper is not among them, it runs before the supervisor loads libslirp.
_EXEC_KINDS = {"interface": _interface, "connector": _connector, "netfacts": _netfacts}

# The fresh interpreter's first code (started with -I -S: no site, no
# environment): the parent's import path, so that it imports this very
# nsnet (and pyroute2) without site's work, then _exec_main(argv).
_BOOT = ("import sys; sys.path[:] = sys.argv[1].split('\\n'); "
         "from nsnet.ns.helper import _exec_main; _exec_main(sys.argv[2:])")


def _libslirp_loaded() -> bool:
    """The libslirp binding (and with it libslirp and glib) is mapped in
    this process: the supervisor loads it after ready (get_info's version,
    the forwarder's code preloaded for restarts)."""
    return "nsnet._slirp_cffi" in sys.modules


def _quiet_stdio() -> None:
    """stdin and stdout on /dev/null (stderr stays: it is the log)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if null > 2:
        os.close(null)


def spawn(name: str, kind: str, ns: NsFds, sock: socket.socket, args: dict,
          body: Callable[[], int] | None = None) -> int:
    """Start a namespace-side child named `name` that keeps only `sock`,
    the namespace fds and stderr.  While this process has not loaded the
    libslirp binding, the child is a plain fork that runs body() (or the
    kind's function); afterwards it execs a fresh interpreter that runs
    _EXEC_KINDS[kind](ns, sock, **args).  Returns its PID."""
    keep = [sock.fileno(), *ns.fds()]
    execs = _libslirp_loaded()
    if body is not None and not execs:
        run = body
    elif not execs:
        def run() -> int:
            return _EXEC_KINDS[kind](ns, sock, **args)
    else:
        def run() -> int:
            for fd in keep:
                os.set_inheritable(fd, True)
            path = "\n".join(p for p in sys.path if "\n" not in p)
            os.execv(sys.executable, [
                sys.executable, "-I", "-S", "-c", _BOOT, path, name, kind, json.dumps(args),
                str(sock.fileno()), str(ns.net), str(-1 if ns.user is None else ns.user)])

    def child() -> int:
        _quiet_stdio()
        return run()

    # an exec'd child names itself (_exec_main), once libslirp is unmapped
    return fork_child(name, child, keep, rename=not execs)


def _exec_main(argv: list[str]) -> None:
    """A fresh interpreter started by spawn(): run the kind and exit."""
    code = 1
    try:
        name, kind, args, sockfd, netfd, userfd = argv
        linux.set_process_name(name)
        ns = NsFds(int(netfd), None if int(userfd) < 0 else int(userfd))
        for fd in ns.fds():
            os.set_inheritable(fd, False)
        sock = socket.socket(fileno=int(sockfd))
        sock.set_inheritable(False)
        code = _EXEC_KINDS[kind](ns, sock, **json.loads(args))
    except BaseException as e:
        log.say(f"nsnet {argv[:2]}: {e!r}")
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def _start_in_namespaces(name: str, kind: str, ns: NsFds, args: dict,
                         body: Callable[[socket.socket], int] | None = None,
                         ) -> tuple[int, socket.socket]:
    """Spawn a namespace-side child (spawn()) with a socket back; return its
    PID and the parent's end of the socket."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = spawn(name, kind, ns, child_sock, args,
                    None if body is None else (lambda: body(child_sock)))
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    return pid, parent_sock


def _receive(sock: socket.socket, timeout: float) -> tuple[bytes | None, list[int]]:
    """The child's one message (raw: proto/helper.py checks it) and the fds
    with it; (None, []) if it closed the socket (it failed) or said nothing
    within the timeout."""
    try:
        sock.settimeout(timeout)
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG + 1, 1)
        except OSError:
            return None, []
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        return data, fds
    finally:
        sock.close()


def _in_namespaces(name: str, kind: str, ns: NsFds, args: dict,
                   timeout: float) -> tuple[bytes | None, list[int], int]:
    """Run a kind in a child inside the target's namespaces; return (its
    message, the fds it sent, its exit status)."""
    pid, sock = _start_in_namespaces(name, kind, ns, args)
    msg, fds = _receive(sock, timeout)
    return msg, fds, _reap(pid, timeout)


class TapHelper:
    """The helper that creates the TAP, started: the caller can do other
    set-up while it works, then take the TAP with result().

        helper = TapHelper(nsfds, tapname, net, configure)
        ...                       # runs in parallel with the helper
        fd, ifindex, mac = helper.result()
        ...
        helper.reap()             # once the helper is of no more use
    """

    def __init__(self, ns: NsFds, tapname: str, net: NetConfig, configure: bool,
                 timeout: float = 30.0) -> None:
        self.timeout = timeout
        # Forked, never exec'd: the supervisor has not loaded libslirp yet.
        pid, self._sock = _start_in_namespaces(
            "nsnet-nshelper", "tap", ns, {},
            lambda sock: _tap(ns, sock, tapname, net, configure))
        self.pid: int | None = pid

    def result(self) -> tuple[int, int, bytes | None]:
        """(TAP fd, ifindex, MAC).  Raises HelperError if the helper failed
        or timed out (it has been reaped then).  Once the fd is here the
        helper is only exiting: reap() it later, off the path to ready."""
        data, fds = _receive(self._sock, self.timeout)
        try:
            if data is None:
                raise ProtocolError("no message")
            ifindex, mac = proto.parse_tap_result(data, len(fds))
        except ProtocolError as e:
            for fd in fds:
                os.close(fd)
            how = self.reap()
            raise HelperError(f"child failed({how})" if data is None else
                              f"namespace helper: protocol error: {e} (killed: {how})") from None
        return fds[0], ifindex, mac

    def reap(self) -> int:
        """Wait for the helper's exit (bounded; killed if it hangs); its
        exit status."""
        if self._sock.fileno() >= 0:  # result() not taken: drop the TAP
            self._sock.close()
        if self.pid is None:
            return 0
        pid, self.pid = self.pid, None
        return _reap(pid, self.timeout)


def _describe(tapname: str, sock: socket.socket) -> int:
    """The interface as the namespace sees it, read with pyroute2 (off the
    path to ready: its import costs ~90 ms)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=tapname)
        if not links:
            fdpass.send_fds(sock, {"error": f"no interface {tapname} in the namespace"}, [])
            return 0
        idx = links[0]
        link = ipr.get_links(idx)[0]
        addrs = [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)]
        routes = []
        for r in ipr.get_routes(oif=idx, table=254):
            dst = r.get("RTA_DST")
            routes.append({
                "dst": f"{dst}/{r['dst_len']}" if dst else "default",
                "gateway": r.get("RTA_GATEWAY"),
                "family": "inet6" if r["family"] == socket.AF_INET6 else "inet",
            })
        fdpass.send_fds(sock, {
            "ifname": tapname,
            "ifindex": idx,
            "mtu": link.get("IFLA_MTU"),
            "mac": link.get("IFLA_ADDRESS"),
            "operstate": link.get("IFLA_OPERSTATE"),
            "up": bool(link["flags"] & 1),
            "addresses": addrs,
            "routes": routes,
        }, [])
    return 0


def start_describe(ns: NsFds, tapname: str) -> tuple[int, socket.socket]:
    """The interface helper, started (the supervisor waits for it in its
    loop: supervisor/interface.py): its PID and the socket its one message
    (proto/helper.py) comes on."""
    return _start_in_namespaces("nsnet-nshelper", "interface", ns, {"tapname": tapname})


def describe_interface(ns: NsFds, tapname: str, timeout: float = 10.0) -> dict:
    """Report the TAP's state inside the namespace, waiting for it (a
    blocking call; the supervisor uses start_describe). Raises HelperError
    when it cannot be read."""
    return _ask("interface", ns, {"tapname": tapname}, timeout, proto.parse_interface)


def _ask(kind: str, ns: NsFds, args: dict, timeout: float,
         parse: Callable[[bytes, int], dict]) -> dict:
    """Run a helper of `kind` in the namespaces and wait for its one answer,
    checked by `parse` (proto/helper.py); HelperError when it failed, broke
    the protocol or answered an error."""
    data, fds, status = _in_namespaces("nsnet-nshelper", kind, ns, args, timeout)
    try:
        msg = parse(data or b"", len(fds))
    except ProtocolError as e:
        raise HelperError(f"namespace helper failed({status})" if data is None
                          else f"namespace helper: protocol error: {e}") from None
    finally:
        for fd in fds:
            os.close(fd)
    if status != 0:
        raise HelperError(f"namespace helper failed({status})")
    if "error" in msg:
        raise HelperError(msg["error"])
    return msg


def _reap(pid: int, timeout: float) -> int:
    """Wait for the helper (through a pidfd, bounded); kill it if it hangs."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
