"""Run a program as if on a kernel older than --bypass needs.

    python3 oldkernel.py MODE PROGRAM [ARG...]

loads a seccomp filter (inherited by everything PROGRAM starts) that makes
one kernel feature fail with the errno an older kernel gives, then execs
PROGRAM.  MODE:

  addfd     ioctl(SECCOMP_IOCTL_NOTIF_ADDFD) fails EINVAL: Linux 5.9-5.13
            refuse SECCOMP_ADDFD_FLAG_SEND with it, Linux 5.0-5.8 have no
            such ioctl (seccomp_notify_ioctl's default: EINVAL)
  cookie    getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) fails ENOPROTOOPT:
            before Linux 5.14 sock_getsockopt does not know the option
  listener  seccomp(SECCOMP_SET_MODE_FILTER) with FILTER_FLAG_NEW_LISTENER
            fails EINVAL: before Linux 5.0 the flag is unknown
  nodestroy setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP) fails EPERM, as
            where the TCP destroy notifications are refused (a kernel
            before 4.9, an LSM): --bypass then counts bytes by sampling
  syncwake  ioctl(SECCOMP_IOCTL_NOTIF_SET_FLAGS) fails EINVAL: before Linux
            6.6 there is no such ioctl (no SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)

Only x86_64 and aarch64 (the machines --bypass supports)."""
import ctypes
import errno
import os
import platform
import struct
import sys

# machine: (AUDIT_ARCH_*, ioctl, getsockopt, seccomp, setsockopt)
ARCHES = {"x86_64": (0xC000003E, 16, 55, 317, 54), "aarch64": (0xC00000B7, 29, 209, 277, 208)}
ADDFD = 0x40182103  # _IOW('!', 3, struct seccomp_notif_addfd)
SET_FLAGS = 0x40082104  # _IOW('!', 4, __u64)
SOL_SOCKET, SO_NETNS_COOKIE = 1, 71
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
SECCOMP_SET_MODE_FILTER, NEW_LISTENER = 1, 1 << 3
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
NR, ARCH, ARG0, ARG1, ARG2 = 0, 4, 16, 24, 32  # seccomp_data offsets (low halves)


def program(mode):
    audit, nr_ioctl, nr_getsockopt, nr_seccomp, nr_setsockopt = ARCHES[platform.machine()]
    # (syscall, [(offset, test, value)], errno): every test must hold
    nr, checks, err = {
        "addfd": (nr_ioctl, [(ARG1, JEQ_K, ADDFD)], errno.EINVAL),
        "cookie": (nr_getsockopt, [(ARG1, JEQ_K, SOL_SOCKET), (ARG2, JEQ_K, SO_NETNS_COOKIE)],
                   errno.ENOPROTOOPT),
        "listener": (nr_seccomp, [(ARG0, JEQ_K, SECCOMP_SET_MODE_FILTER),
                                  (ARG1, JSET_K, NEW_LISTENER)], errno.EINVAL),
        "nodestroy": (nr_setsockopt, [(ARG1, JEQ_K, SOL_NETLINK),
                                      (ARG2, JEQ_K, NETLINK_ADD_MEMBERSHIP)], errno.EPERM),
        "syncwake": (nr_ioctl, [(ARG1, JEQ_K, SET_FLAGS)], errno.EINVAL),
    }[mode]
    # a jump skips that many instructions after its own: to RET ALLOW, the last
    n = 2 * len(checks)
    ins = [(LD_W_ABS, 0, 0, ARCH), (JEQ_K, 0, n + 3, audit),
           (LD_W_ABS, 0, 0, NR), (JEQ_K, 0, n + 1, nr)]
    for i, (off, test, value) in enumerate(checks):
        ins += [(LD_W_ABS, 0, 0, off), (test, 0, n - 2 * i - 1, value)]
    ins += [(RET_K, 0, 0, RET_ERRNO | err), (RET_K, 0, 0, RET_ALLOW)]
    return b"".join(struct.pack("=HBBI", *i) for i in ins), len(ins)


def main():
    mode, argv = sys.argv[1], sys.argv[2:]
    prog, n = program(mode)
    buf = ctypes.create_string_buffer(prog, len(prog))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: needed without CAP_SYS_ADMIN
        sys.exit(f"oldkernel: prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    fprog = Fprog(n, ctypes.addressof(buf))
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        sys.exit(f"oldkernel: prctl(PR_SET_SECCOMP): {os.strerror(ctypes.get_errno())}")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
