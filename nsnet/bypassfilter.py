"""`nsnet run --bypass`, the command's side: the seccomp filter that sends
connect(2), getsockname(2) and getpeername(2) to nsnet's bypass handler
(nsnet/host/bypass.py, csrc/bypass.c) through a user-notification fd.

Installed by the child of `nsnet run` in its namespaces, right before it
execs the command (no_new_privs is not needed: the child has
CAP_SYS_ADMIN in its fresh user namespace).  Every other syscall, and
every syscall of a foreign ABI (x32, i386 socketcall), is allowed as it
is: those connects take the namespace's normal path.  The filter only
accelerates; it is not a security boundary, the namespace stays one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SO_NETNS_COOKIE = 71

# machine: (AUDIT_ARCH_*, SYS_seccomp, connect, getsockname, getpeername, x32 bit)
ARCHES = {
    "x86_64": (0xC000003E, 317, 42, 51, 52, 0x40000000),
    "aarch64": (0xC00000B7, 277, 203, 204, 205, 0),
}

_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06


class FilterError(OSError):
    pass


def syscall_numbers() -> tuple[int, int, int]:
    """connect, getsockname, getpeername on this machine."""
    arch = ARCHES.get(platform.machine())
    if arch is None:
        raise FilterError(0, f"--bypass is not available on {platform.machine()} "
                             f"(only {', '.join(ARCHES)})")
    return arch[2], arch[3], arch[4]


def audit_arch() -> int:
    """AUDIT_ARCH_* of syscall_numbers(): seccomp_data.arch of the native ABI."""
    syscall_numbers()  # FilterError on another machine
    return ARCHES[platform.machine()][0]


def program() -> bytes:
    """The classic BPF program (struct sock_filter[])."""
    audit, _sys, nr_conn, nr_gsn, nr_gpn, x32 = ARCHES[platform.machine()]
    ins: list[tuple[int, int, int, int]] = []

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> None:
        ins.append((code, jt, jf, k))

    # offsets: seccomp_data.nr = 0, .arch = 4
    tail = 4 + (1 if x32 else 0)  # instructions between the arch check and RET ALLOW
    op(_LD_W_ABS, 4)
    op(_JEQ_K, audit, 0, tail)  # foreign arch -> ALLOW
    op(_LD_W_ABS, 0)
    if x32:
        op(_JGE_K, x32, 3, 0)  # x32 ABI -> ALLOW
    op(_JEQ_K, nr_conn, 2 + 1, 0)
    op(_JEQ_K, nr_gsn, 1 + 1, 0)
    op(_JEQ_K, nr_gpn, 0 + 1, 0)
    op(_RET_K, SECCOMP_RET_ALLOW)
    op(_RET_K, SECCOMP_RET_USER_NOTIF)
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


def install() -> int:
    """Install the filter on the calling thread; return the listener fd
    (close-on-exec).  FilterError with the errno on failure."""
    arch = ARCHES.get(platform.machine())
    if arch is None:
        syscall_numbers()  # raises
    prog = program()
    buf = ctypes.create_string_buffer(prog, len(prog))
    n = len(prog) // 8

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(n, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(arch[1]), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER),
                      ctypes.byref(fprog))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # the flag is unknown before Linux 5.0
            raise FilterError(err, "--bypass needs seccomp user notification "
                                   "(SECCOMP_FILTER_FLAG_NEW_LISTENER; all of --bypass: Linux "
                                   "5.14 or later): seccomp(SECCOMP_SET_MODE_FILTER): "
                                   f"{os.strerror(err)} on {os.uname().release}: "
                                   "run without --bypass")
        raise FilterError(err, f"--bypass: seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER): "
                               f"{os.strerror(err)}")
    os.set_inheritable(int(fd), False)
    return int(fd)


def namespace_facts() -> bytes:
    """What the handler needs to know about this network namespace, packed:
    its SO_NETNS_COOKIE and a fresh TCP socket's SO_SNDBUF/SO_RCVBUF."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as e:
            raise FilterError(e.errno, "--bypass needs SO_NETNS_COOKIE (Linux 5.14 or later): "
                                       f"getsockopt: {e.strerror} on {os.uname().release}: "
                                       "run without --bypass") from None
        cookie = struct.unpack("=Q", raw)[0]
        snd = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        rcv = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return struct.pack("=Qii", cookie, snd, rcv)


FACTS_SIZE = struct.calcsize("=Qii")


def unpack_facts(data: bytes) -> tuple[int, int, int]:
    return struct.unpack("=Qii", data[:FACTS_SIZE])  # type: ignore[return-value]
