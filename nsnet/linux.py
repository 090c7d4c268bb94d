"""Thin wrappers over the Linux calls the standard library lacks on 3.11:
setns and prctl (compiled: nsnet/_linux_build.py), TUN ioctls."""

from __future__ import annotations

import fcntl
import os
import signal
import struct

from ._linux_cffi import ffi, lib

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def setns(fd: int, nstype: int) -> None:
    """Join the namespace behind fd. CLONE_NEWUSER needs a single-threaded
    process: call it only in a freshly forked child."""
    _check(lib.nsnet_setns(fd, nstype), "setns")


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send sig to this process when its parent dies."""
    _check(lib.nsnet_prctl(PR_SET_PDEATHSIG, sig), "prctl(PR_SET_PDEATHSIG)")


def set_undumpable() -> None:
    """PR_SET_DUMPABLE 0: no ptrace, no /proc/PID/{mem,environ,fd,root,...}
    for anyone without CAP_SYS_PTRACE over the user namespace this process
    was created (or last exec'd) in, even after it joins another one.
    Before the first setns of every namespace-side process (issue 11)."""
    _check(lib.nsnet_prctl(PR_SET_DUMPABLE, 0), "prctl(PR_SET_DUMPABLE)")


def drop_capabilities() -> None:
    """NO_NEW_PRIVS, ambient and bounding sets cleared (as far as allowed),
    effective/permitted/inheritable emptied: for good."""
    _check(lib.nsnet_drop_caps(), "capset")


# Where the empty root's tmpfs is mounted (only in the caller's own, new
# mount namespace); the first that is a directory.
EMPTY_ROOT_BASES = ("/tmp", "/run", "/mnt", "/var/tmp", "/dev")


def empty_root() -> None:
    """Leave the host's filesystem for good: a new mount namespace whose
    root is an empty read-only tmpfs, the old root detached.  Raises
    OSError naming the step that failed."""
    base = next((b for b in EMPTY_ROOT_BASES
                 if os.path.isdir(b) and not os.path.islink(b)), None)
    if base is None:
        raise OSError(0, "no directory to mount the empty root on")
    step = ffi.new("const char **")
    if lib.nsnet_empty_root(base.encode(), step) != 0:
        err = ffi.errno
        raise OSError(err, f"{ffi.string(step[0]).decode()}: {os.strerror(err)}")


def set_no_new_privs() -> None:
    _check(lib.nsnet_prctl(PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")


def set_process_name(name: str) -> None:
    lib.nsnet_set_name(name.encode()[:15])


# TSO pays while a 64 KiB super-frame replaces many MTU-sized frames; at
# larger MTUs the namespace's frames are as big already, and completing
# their partial checksums would only move work from the sending process in
# the namespace into the forwarder (measured: ~6% of its CPU at MTU 65520).
TSO_MTU_LIMIT = 32768


def open_tap(name: str, vnet_hdr: bool = False, mtu: int | None = None) -> int:
    """Open /dev/net/tun and attach to (or create) the TAP device `name`.
    With vnet_hdr, enable IFF_VNET_HDR, and TSO with checksum offload
    unless mtu is TSO_MTU_LIMIT or more."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 10))
            if mtu is None or mtu < TSO_MTU_LIMIT:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except BaseException:
        os.close(fd)
        raise
    return fd


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: the forwarder and the
    relay hold several fds per connection of the namespace's.  Best effort."""
    lib.nsnet_raise_nofile()


def nofile_limits() -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE (unlimited: a very large number)."""
    soft = ffi.new("unsigned long long *")
    hard = ffi.new("unsigned long long *")
    _check(lib.nsnet_nofile(soft, hard), "getrlimit(RLIMIT_NOFILE)")
    return int(soft[0]), int(hard[0])


def set_nofile_soft(soft: int) -> None:
    """Set the soft RLIMIT_NOFILE (at most the hard limit)."""
    _check(lib.nsnet_set_nofile_soft(soft), "setrlimit(RLIMIT_NOFILE)")


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)
