"""Who may use the API socket: not the namespace nsnet serves.

The API socket is 0600, but under `nsnet run` (and with any target made by
the invoking user) the code inside the target runs with the user's uid and
sees the user's files, so the file mode alone lets it add forwards on the
host, remove the user's, and so on.  The supervisor therefore looks at each
client's credentials (SO_PEERCRED, and SO_PEERPIDFD to pin the process) and
refuses a client whose process lives in the target's user namespace or in a
user namespace below it.

Namespaces are compared by identity (the nsfs inode of /proc/PID/ns/user),
walking up from the client's user namespace with NS_GET_PARENT until the
target's (refuse) or the supervisor's own, or the top of what the
supervisor may see (allow).  A client that cannot be identified (it has
exited, its PID is not visible here, its /proc entry cannot be read) is
refused, unless its uid is mapped in the target's user namespace by no range
and is not its creator's (then no process of the target can have it: e.g.
root talking to an unprivileged user's nsnet).

The check is off when the target's user namespace is the supervisor's own
or not below it (nsnet run by root on a namespace of root's): then there is
no boundary for it to keep.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable

NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1)
NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2)
NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4)
SO_PEERPIDFD = 77  # Linux 6.5
MAX_DEPTH = 40  # user namespaces nest at most 32 deep


RESERVE_FDS = 4  # kept open so that the check can run when nsnet is out of fds


class _OutOfFds(Exception):
    pass


def _raise_if_out_of_fds(e: OSError) -> None:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        raise _OutOfFds(e.strerror) from None


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _parent(fd: int) -> int:
    """The fd of the parent user namespace; OSError(EPERM) above our scope."""
    return fcntl.ioctl(fd, NS_GET_PARENT)


def _below(fd: int, stop: tuple[int, int], guarded: "Iterable[tuple[int, int]]" = ()
           ) -> tuple[int, int] | None:
    """Walk up from the user namespace behind fd (not closed): the first of
    `guarded` met, or `stop` if reached first, or None when the walk leaves
    what this process may see."""
    guarded = set(guarded)
    cur = os.dup(fd)
    try:
        for _ in range(MAX_DEPTH):
            ident = _ident(cur)
            if ident in guarded or ident == stop:
                return ident
            try:
                nxt = _parent(cur)
            except PermissionError:
                return None  # EPERM: outside this process's namespace scope
            os.close(cur)
            cur = nxt
        return None
    finally:
        os.close(cur)


def _owner_uid(fd: int) -> int | None:
    """The uid (as seen here) of the user namespace's creator."""
    try:
        buf = fcntl.ioctl(fd, NS_GET_OWNER_UID, b"\0\0\0\0")
    except OSError:
        return None
    return struct.unpack("I", buf)[0]


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, not ours to signal
    return True


def _uid_ranges(pid: int) -> list[tuple[int, int]] | None:
    """The outer uid ranges of PID's user namespace, as seen from here."""
    try:
        with open(f"/proc/{pid}/uid_map") as f:
            text = f.read()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            out.append((int(parts[1]), int(parts[2])))
    return out


class PeerCheck:
    """Built once at set-up from the target's namespace files; refusal(sock)
    for each accepted client."""

    def __init__(self, userns: int | None, netns: int | None, pid: int | None) -> None:
        """userns, netns: fds of the target's namespace files (the
        supervisor's NsFds; not closed here); pid: the target's PID, if any
        (for its uid map)."""
        self.guarded: set[tuple[int, int]] = set()
        self.uid_ranges: list[tuple[int, int]] | None = None
        owners: list[int | None] = []
        with open("/proc/self/ns/user", "rb", buffering=0) as f:
            self.own = _ident(f.fileno())
        for nsfd, owner in ((userns, False), (netns, True)):
            if nsfd is None or nsfd < 0:
                continue
            if owner:  # the user namespace that owns the network namespace
                try:
                    fd = fcntl.ioctl(nsfd, NS_GET_USERNS)
                except OSError:
                    continue
            else:
                fd = os.dup(nsfd)
            try:
                ident = _ident(fd)
                try:
                    below = _below(fd, self.own) == self.own
                except OSError:
                    below = True  # when in doubt, keep the boundary
                if ident != self.own and below:
                    self.guarded.add(ident)
                    owners.append(_owner_uid(fd))
            finally:
                os.close(fd)
        if self.guarded and pid is not None:
            self.uid_ranges = _uid_ranges(pid)
        if self.uid_ranges is not None:
            # The creator keeps its uid inside even with no map written.
            for uid in owners:
                if uid is None:
                    self.uid_ranges = None  # unknown: no shortcut
                    break
                self.uid_ranges.append((uid, 1))
        self.reserve: list[int] = []
        if self.guarded:
            self._fill_reserve()

    @property
    def active(self) -> bool:
        return bool(self.guarded)

    def _uid_outside(self, uid: int) -> bool:
        """True if uid is mapped in no range of the target's user namespace."""
        if self.uid_ranges is None:
            return False
        return not any(start <= uid < start + count for start, count in self.uid_ranges)

    def refusal(self, sock: socket.socket) -> tuple[int, str] | None:
        """None to serve the client, or (pid, why) to refuse it."""
        if not self.guarded:
            return None
        try:
            return self._refusal(sock)
        except _OutOfFds:
            pass
        # The check needs a few fds: use the reserve kept for it.
        self._release_reserve()
        try:
            return self._refusal(sock)
        except _OutOfFds as e:
            return -1, f"nsnet is out of file descriptors ({e}); try again"
        finally:
            self._fill_reserve()

    def _refusal(self, sock: socket.socket) -> tuple[int, str] | None:
        try:
            pid, uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError as e:
            return 0, f"cannot read the client's credentials (SO_PEERCRED: {e.strerror})"
        if self._uid_outside(uid):
            return None  # no process of the target's namespace has this uid
        if pid <= 0:
            return pid, "the client's process is not visible in nsnet's PID namespace"
        pidfd = self._pidfd(sock, pid)
        if isinstance(pidfd, str):
            return pid, pidfd
        try:
            try:
                nsfd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                _raise_if_out_of_fds(e)
                if not _alive(pidfd):
                    return pid, "the client's process has exited"
                return pid, f"cannot read /proc/{pid}/ns/user: {e.strerror}"
            try:
                if not _alive(pidfd):  # else the PID named the process that connected
                    return pid, "the client's process has exited"
                try:
                    met = _below(nsfd, self.own, self.guarded)
                except OSError as e:
                    _raise_if_out_of_fds(e)
                    return pid, f"cannot walk the client's user namespaces: {e.strerror}"
            finally:
                os.close(nsfd)
        finally:
            os.close(pidfd)
        if met is not None and met in self.guarded:
            return pid, "the client runs inside the namespace nsnet serves"
        return None

    def _release_reserve(self) -> None:
        for fd in self.reserve:
            os.close(fd)
        self.reserve = []

    def _fill_reserve(self) -> None:
        while len(self.reserve) < RESERVE_FDS:
            try:
                self.reserve.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def close(self) -> None:
        self._release_reserve()

    @staticmethod
    def _pidfd(sock: socket.socket, pid: int) -> int | str:
        """A pidfd for the process that connected, or why there is none.
        SO_PEERPIDFD pins that process (Linux 6.5); before that,
        pidfd_open(pid) (a PID reused between connect and now would go
        unnoticed there)."""
        try:
            return struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        except OSError as e:
            _raise_if_out_of_fds(e)
            if e.errno == errno.ESRCH:
                return "the client's process has exited"
            if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                return f"cannot identify the client's process (SO_PEERPIDFD: {e.strerror})"
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            return "the client's process has exited"
        except OSError as e:
            _raise_if_out_of_fds(e)
            return f"cannot identify the client's process (pidfd_open: {e.strerror})"
