"""The namespace helper: a short-lived child that joins the target's user
and network namespaces, opens (or attaches to) the TAP device, configures
it with pyroute2 when asked, hands the TAP fd to the host side over
SCM_RIGHTS, and exits.

It is forked from the single-threaded supervisor, so setns(CLONE_NEWUSER)
is allowed, and it always leaves with os._exit: nothing of the parent's
Python state (atexit handlers, buffered files) runs twice.
"""

from __future__ import annotations

import errno
import fcntl
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

from .. import fdpass, linux
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


def enter_namespaces(target: Target) -> bool:
    """Join the target's user (if any) and network namespaces; False, with
    the reason printed on stderr, if that failed.  Only in a freshly forked,
    single-threaded child (also used by the fast path's connector)."""
    try:
        netfd = os.open(target.netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        print(f"{target.netns}: {e.strerror}", file=sys.stderr)
        return False
    if target.userns:
        try:
            userfd = os.open(target.userns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            print(f"{target.userns}: {e.strerror}", file=sys.stderr)
            return False
        try:
            linux.setns(userfd, linux.CLONE_NEWUSER)
        except OSError as e:
            # Already in that user namespace (EINVAL), or the caller has
            # privilege in the network namespace anyway: go on, as
            # slirp4netns does; setns(net) below says if it matters.
            if e.errno not in (errno.EINVAL, errno.EPERM):
                print(f"setns(user): {e.strerror}", file=sys.stderr)
        os.close(userfd)
    try:
        linux.setns(netfd, linux.CLONE_NEWNET)
    except OSError as e:
        print(f"setns(net) {target.netns}: {e.strerror}", file=sys.stderr)
        return False
    os.close(netfd)
    return True


def _child(tapname: str, net: NetConfig, configure: bool, sock: socket.socket) -> int:
    try:
        tapfd = linux.open_tap(tapname, vnet_hdr=net.offload, mtu=net.mtu)
    except OSError as e:
        print(f"cannot open TAP {tapname!r} (/dev/net/tun): {e.strerror}", file=sys.stderr)
        return 1
    if configure:
        try:
            _configure(tapname, net)
        except OSError as e:
            print(f"cannot configure {tapname}: {e}", file=sys.stderr)
            return 1
    fdpass.send_fds(sock, {"ifindex": _ifindex(tapname), "mac": _mac(tapname)}, [tapfd])
    return 0


def _start_in_namespaces(target: Target,
                         body: Callable[[socket.socket], int]) -> tuple[int, socket.socket]:
    """Fork a child that enters the target's namespaces and runs body(sock);
    return its PID and the parent's end of the socket."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def helper() -> int:
        return body(child_sock) if enter_namespaces(target) else 1

    try:
        pid = fork_child("nsnet-nshelper", helper, [child_sock.fileno()])
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


def _in_namespaces(target: Target, body: Callable[[socket.socket], int],
                   timeout: float) -> tuple[bytes | None, list[int], int]:
    """Run body(sock) in a child inside the target's namespaces; return (its
    message, the fds it sent, its exit status)."""
    pid, sock = _start_in_namespaces(target, body)
    msg, fds = _receive(sock, timeout)
    return msg, fds, _reap(pid, timeout)


class TapHelper:
    """The helper that creates the TAP, started: the caller can do other
    set-up while it works, then take the TAP with result().

        helper = TapHelper(target, tapname, net, configure)
        ...                       # runs in parallel with the helper
        fd, ifindex, mac = helper.result()
        ...
        helper.reap()             # once the helper is of no more use
    """

    def __init__(self, target: Target, tapname: str, net: NetConfig, configure: bool,
                 timeout: float = 30.0) -> None:
        self.timeout = timeout
        pid, self._sock = _start_in_namespaces(
            target, lambda sock: _child(tapname, net, configure, sock))
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


def start_describe(target: Target, tapname: str) -> tuple[int, socket.socket]:
    """The interface helper, started (the supervisor waits for it in its
    loop: supervisor/interface.py): its PID and the socket its one message
    (proto/helper.py) comes on."""
    return _start_in_namespaces(target, lambda sock: _describe(tapname, sock))


def describe_interface(target: Target, tapname: str, timeout: float = 10.0) -> dict:
    """Report the TAP's state inside the namespace, waiting for it (a
    blocking call; the supervisor uses start_describe). Raises HelperError
    when it cannot be read."""
    data, fds, status = _in_namespaces(target, lambda sock: _describe(tapname, sock), timeout)
    try:
        msg = proto.parse_interface(data or b"", len(fds))
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
