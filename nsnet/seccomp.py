"""--enable-seccomp: the forwarder's syscall ALLOWLIST (libseccomp), and
the fast path's relay's and connector's and the bypass handler's own lists
(PROFILES).

slirp4netns 1.2.0 installs a blocklist (a few dangerous calls return an
error, everything else is allowed).  nsnet does the opposite: the filter
allows the syscalls below and KILLS the process on anything else
(SCMP_ACT_KILL_PROCESS; a foreign architecture is killed too).  The
supervisor sees the forwarder die (SIGSYS), restarts it, and gives up
after --max-restarts deaths in the restart window.

The list was derived from real runs: `strace -ff` over the forwarder
while the e2e suite, the hostile-frame fuzzer, the API abuse test and
the load test ran (every syscall the forwarder made after the point
where the filter is installed), then each entry was checked against
what libslirp, glib and the Python interpreter can do in the forwarder.
docs/HARDENING.md ("--enable-seccomp: an allowlist") has the method and the per-syscall reasons.

The filter is installed by sandbox.enter() after libslirp is set up and
after the sandbox (when both are asked for): mount(2), pivot_root(2),
unshare(2) and capset(2) are needed to build the sandbox and are not on
the list.

Check it by hand (a forked child enters the same sandbox and filter as
the forwarder, then makes one syscall):

    python -m nsnet.seccomp [--profile=forwarder|relay|connector|bypass] list
    python -m nsnet.seccomp [--profile=...] check [--no-sandbox] SYSCALL[:ARG0,ARG1,...]...
        (bypass: no sandbox; the handler's own loader, nsb_load_filter)
        (an argument s:TEXT is a pointer to the string TEXT, e.g. a path)
    python -m nsnet.seccomp derive STRACE_FILES...   (strace -ff output)
"""

from __future__ import annotations

import os
import re
import signal
import sys

# Every syscall the sandboxed forwarder may make, grouped by who needs it.
# A name that does not exist on this architecture is skipped.  Entries
# also in RESTRICTED are allowed only with the arguments given there.
ALLOWLIST: tuple[str, ...] = (
    # -- the C data path: poll loop, TAP reads/writes (datapath.c) ----------
    "poll", "read", "write",
    "writev",  # frames with a virtio-net header (offloads)
    "clock_gettime", "gettimeofday",  # when the vDSO cannot answer
    # -- libslirp: host sockets for guest TCP/UDP/ICMP, port forwards, DNS --
    "socket", "connect", "bind", "listen", "accept",
    "getsockname", "getpeername", "setsockopt", "getsockopt",
    "sendto", "recvfrom",
    "recvmsg",  # MSG_ERRQUEUE on UDP/ICMP sockets
    "shutdown", "close", "fcntl", "ioctl",
    # libslirp re-reads /etc/resolv.conf (DNS forwarding) through stdio:
    # read-only opens only (see RESTRICTED)
    "openat", "newfstatat", "fstat",
    # glib: random numbers
    "getrandom",
    # -- memory: malloc (glibc, glib, Python's allocator); never executable --
    "brk", "mmap", "munmap", "mremap", "madvise",
    # -- locks, signal return, restart after SIGSTOP/SIGCONT -------------------
    "futex", "rt_sigreturn", "restart_syscall",
    # -- the forwarder's "ready" message --------------------------------------
    "getpid",
    # -- leaving ------------------------------------------------------------
    "exit", "exit_group",
)

# Argument filters: a call is allowed when its arguments match one of the
# alternatives; each alternative is a list of (arg index, "eq", value) or
# (arg index, "masked_eq", mask, value).
_AF_INET, _AF_INET6 = 2, 10
_FIONREAD, _FIONBIO, _TCGETS = 0x541B, 0x5421, 0x5401
_F_GETFD, _F_SETFD, _F_GETFL, _F_SETFL = 1, 2, 3, 4
_PROT_EXEC = 4
# openat's flags that write or create: the access mode (O_WRONLY, O_RDWR),
# O_CREAT, O_TRUNC and O_TMPFILE's own bit.  O_APPEND only matters with a
# write access mode.
_O_ACCMODE, _O_CREAT, _O_TRUNC, _O_TMPFILE_BIT = 0o3, 0o100, 0o1000, 0o20000000
OPEN_WRITE_FLAGS = _O_ACCMODE | _O_CREAT | _O_TRUNC | _O_TMPFILE_BIT
RESTRICTED: dict[str, list[list[tuple]]] = {
    # IPv4/IPv6 only: no netlink, packet, unix, vsock... sockets
    "socket": [[(0, "eq", _AF_INET)], [(0, "eq", _AF_INET6)]],
    # FIONREAD and FIONBIO, and TCGETS: glib's logger asks isatty(2)
    # before it prints libslirp's g_warning/g_critical (a guest's ICMPv6
    # echo to an outside address: "external icmpv6 not supported yet"),
    # which killed the forwarder.  Read-only; no TIOCSTI, no TUN ioctls.
    "ioctl": [[(1, "eq", _FIONREAD)], [(1, "eq", _FIONBIO)], [(1, "eq", _TCGETS)]],
    "fcntl": [[(1, "eq", c)] for c in (_F_GETFD, _F_SETFD, _F_GETFL, _F_SETFL)],
    # no executable memory (mprotect is not allowed at all)
    "mmap": [[(2, "masked_eq", _PROT_EXEC, 0)]],
    # read-only: O_RDONLY and none of O_CREAT, O_TRUNC, O_TMPFILE (a
    # compromised forwarder without the sandbox could otherwise truncate
    # or create the user's files)
    "openat": [[(2, "masked_eq", OPEN_WRITE_FLAGS, 0)]],
}


# -- the fast path's relay (nsnet/host/relay.py, csrc/relay.c) ----------------
# Derived the same way (`derive --profile relay` over strace -ff of the
# relay while tests/test_fastpath.py and tests/test_confine.py ran; again,
# with the connector's and the forwarder's, over eleven e2e files:
# docs/HARDENING.md): only what moving bytes between connected TCP sockets
# and keeping listeners needs.  No openat at all: it reads no file.
_SOCK_TYPE_MASK, _SOCK_STREAM = 0xF, 1
_F_SETPIPE_SZ, _F_GETPIPE_SZ = 1031, 1032
_TCP_ONLY = [[(0, "eq", _AF_INET), (1, "masked_eq", _SOCK_TYPE_MASK, _SOCK_STREAM)],
             [(0, "eq", _AF_INET6), (1, "masked_eq", _SOCK_TYPE_MASK, _SOCK_STREAM)]]
# What the interpreter itself needs in the relay and the connector: log
# lines on stderr, time, memory (never executable: see mmap below), locks,
# signal return and restart, the exit.
_PYTHON_RUNTIME = (
    "write", "clock_gettime", "gettimeofday", "getrandom",
    "brk", "mmap", "munmap", "mremap", "madvise",
    "futex", "rt_sigreturn", "restart_syscall", "getpid",
    "exit", "exit_group",
)
RELAY_ALLOWLIST: tuple[str, ...] = (
    # the C loop: epoll, one pipe per direction, splice, half-close
    "epoll_wait", "epoll_pwait", "epoll_ctl", "pipe2", "splice", "shutdown",
    "fcntl", "close",
    "ioctl",  # FIONBIO only (socket.setblocking)
    # listeners (add_hostfwd at any time) and accepted clients
    "socket", "setsockopt", "getsockopt", "bind", "listen", "accept4", "getsockname",
    # control socket to the supervisor and socket to the connector: JSON
    # out, JSON and fds (SCM_RIGHTS) in
    "recvmsg", "sendto", "poll",
    *_PYTHON_RUNTIME,
)
RELAY_RESTRICTED: dict[str, list[list[tuple]]] = {
    "socket": _TCP_ONLY,
    "ioctl": [[(1, "eq", _FIONBIO)]],
    "fcntl": [[(1, "eq", c)] for c in (_F_GETFD, _F_SETFD, _F_GETFL, _F_SETFL,
                                        _F_SETPIPE_SZ, _F_GETPIPE_SZ)],
    "mmap": [[(2, "masked_eq", _PROT_EXEC, 0)]],
}

# -- the fast path's connector (nsnet/ns/connector.py) -------------------------
# Inside the target's namespaces: it only connects TCP sockets there and
# passes them to the relay.  No bind, listen, accept, splice, no files.
CONNECTOR_ALLOWLIST: tuple[str, ...] = (
    "socket", "connect", "getsockopt", "close", "poll",
    # requests in, JSON out, connected fds out (SCM_RIGHTS)
    "recvfrom", "sendto", "sendmsg",
    *_PYTHON_RUNTIME,
)
CONNECTOR_RESTRICTED: dict[str, list[list[tuple]]] = {
    "socket": _TCP_ONLY,
    "mmap": [[(2, "masked_eq", _PROT_EXEC, 0)]],
}

# -- the socket bypass's notification handler (nsnet/host/bypass.py,
# csrc/bypass.c, csrc/bypassdiag.c) -------------------------------------------
# It reads what the command's memory says (sockaddrs, through
# process_vm_readv) and answers notifications on the command's listener.
# Derived with `derive --profile bypass` over strace -ff of `nsnet run
# --bypass` while tests/bypassprobe.py ran every case (blocking and
# non-blocking connects, refusals, IPv6, --bypass-bytes sampled and
# at-close, --audit=all, many short connections, the handler's exit): every
# call from the point where csrc/bypass.c loads the filter (after its
# set-up: the host cookie, the leftover ids, the byte-tracking thread, the
# SYNC_WAKE_UP flag, the notification sizes) on both threads.  Loaded by
# the C handler itself (nsb_run, SECCOMP_FILTER_FLAG_TSYNC: the thread too),
# from the BPF this module builds (export_bpf), before the first
# SECCOMP_IOCTL_NOTIF_RECV.  No execve, ptrace, no opening for writing, no
# executable memory, no socket but TCP and sock_diag.
_AF_NETLINK, _NETLINK_SOCK_DIAG, _SOCK_RAW = 16, 4, 3
# SECCOMP_IOCTL_NOTIF_*: RECV _IOWR('!', 0, struct seccomp_notif), SEND
# _IOWR('!', 1, struct seccomp_notif_resp), ID_VALID _IOW('!', 2, __u64),
# ADDFD _IOW('!', 3, struct seccomp_notif_addfd) (SET_FLAGS is used before
# the filter: not allowed)
NOTIF_IOCTLS = {"recv": 0xC0502100, "send": 0xC0182101, "id_valid": 0x40082102,
                "addfd": 0x40182103}
BYPASS_ALLOWLIST: tuple[str, ...] = (
    # the notification loop: the listener, the connects waiting, the answers
    "poll", "ppoll", "ioctl",
    # the command's memory (the sockaddr in, getsockname's answer out) and fds
    "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd",
    # /proc/TID/fdinfo/FD and /proc/TID/status (read-only, see below)
    "openat", "read", "pread64", "close", "fcntl",
    # the host sockets it connects (TCP), their options, the gateway's
    # SO_BINDTODEVICE, --outbound-addr's bind; sock_diag (bypassdiag.c)
    "socket", "connect", "bind", "getsockopt", "setsockopt", "getsockname",
    "getpeername",
    # audit records out (send: sendto), sock_diag dumps (send, recv) and
    # the destroy notifications (recvmmsg) on the byte-tracking thread
    "sendto", "recvfrom", "recvmmsg",
    # the thread's wait between batches (nanosleep); the mutex between the
    # threads
    "clock_nanosleep", "futex",
    # time (when the vDSO cannot answer), memory (malloc; the thread's arena
    # grows by mprotect: never executable), SIGSTOP/SIGCONT.  No
    # rt_sigreturn: the handler has no signal handler (all default).
    "clock_gettime", "brk", "mmap", "munmap", "mremap", "madvise", "mprotect",
    "restart_syscall",
    # the fatal-error line on stderr, the exit
    "write", "exit", "exit_group",
)
BYPASS_RESTRICTED: dict[str, list[list[tuple]]] = {
    # TCP over IPv4/IPv6 (the sockets it connects and installs), and a
    # NETLINK_SOCK_DIAG socket (the byte counts): no unix, packet, other
    # netlink sockets
    "socket": _TCP_ONLY + [[(0, "eq", _AF_NETLINK),
                             (1, "masked_eq", _SOCK_TYPE_MASK, _SOCK_RAW),
                             (2, "eq", _NETLINK_SOCK_DIAG)]],
    # the four notification ioctls only (no FIONBIO, TIOCSTI, SET_FLAGS...)
    "ioctl": [[(1, "eq", v)] for v in NOTIF_IOCTLS.values()],
    "fcntl": [[(1, "eq", _F_GETFL)], [(1, "eq", _F_SETFL)]],
    "openat": [[(2, "masked_eq", OPEN_WRITE_FLAGS, 0)]],  # /proc files, read-only
    "mmap": [[(2, "masked_eq", _PROT_EXEC, 0)]],
    "mprotect": [[(2, "masked_eq", _PROT_EXEC, 0)]],  # the thread's arena grows
}

_PROCESS_NAMES = {"forwarder": "nsnet-forwarder", "relay": "nsnet-relay",
                   "connector": "nsnet-connect", "bypass": "nsnet-bypass"}

# profile -> (allowlist, argument filters)
PROFILES: dict[str, tuple[tuple[str, ...], dict[str, list[list[tuple]]]]] = {
    "forwarder": (ALLOWLIST, RESTRICTED),
    "relay": (RELAY_ALLOWLIST, RELAY_RESTRICTED),
    "connector": (CONNECTOR_ALLOWLIST, CONNECTOR_RESTRICTED),
    "bypass": (BYPASS_ALLOWLIST, BYPASS_RESTRICTED),
}


class SeccompError(RuntimeError):
    pass


def _profile(profile: str) -> tuple[tuple[str, ...], dict[str, list[list[tuple]]]]:
    try:
        return PROFILES[profile]
    except KeyError:
        raise SeccompError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})") \
            from None


def _lib():
    try:
        from ._seccomp_cffi import ffi, lib
    except ImportError as e:  # built by setup.py; missing only in broken installs
        raise SeccompError(f"libseccomp binding unavailable: {e}") from None
    return ffi, lib


def version() -> str:
    _, lib = _lib()
    v = lib.seccomp_version()
    return f"{v.major}.{v.minor}.{v.micro}"


def resolve(names=None, profile: str = "forwarder") -> dict[str, int]:
    """name -> syscall number on this architecture (unknown names left out)."""
    _, lib = _lib()
    if names is None:
        names = _profile(profile)[0]
    out = {}
    for name in names:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            out[name] = nr
    return out


def _build(profile: str = "forwarder"):
    ffi, lib = _lib()
    names, restricted = _profile(profile)
    ctx = lib.seccomp_init(lib.SCMP_ACT_KILL_PROCESS)
    if not ctx:
        raise SeccompError("seccomp_init failed")
    try:
        for name, nr in resolve(names).items():
            if name not in restricted:
                rc = lib.nsnet_seccomp_allow(ctx, nr)
                if rc < 0:
                    raise SeccompError(f"seccomp_rule_add({name}): {os.strerror(-rc)}")
                continue
            for alternative in restricted[name]:
                cmps = ffi.new("struct scmp_arg_cmp[]", len(alternative))
                for i, cond in enumerate(alternative):
                    cmps[i].arg = cond[0]
                    if cond[1] == "eq":
                        cmps[i].op = lib.SCMP_CMP_EQ
                        cmps[i].datum_a = cond[2]
                    else:
                        cmps[i].op = lib.SCMP_CMP_MASKED_EQ
                        cmps[i].datum_a, cmps[i].datum_b = cond[2], cond[3]
                rc = lib.seccomp_rule_add_array(ctx, lib.SCMP_ACT_ALLOW, nr,
                                                len(alternative), cmps)
                if rc < 0:
                    raise SeccompError(f"seccomp_rule_add({name}, {alternative}): "
                                       f"{os.strerror(-rc)}")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return ctx


def install(profile: str = "forwarder") -> int:
    """Load the profile's allowlist filter into this process (irreversible:
    also sets PR_SET_NO_NEW_PRIVS).  Returns the number of syscalls allowed."""
    _, lib = _lib()
    ctx = _build(profile)
    try:
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SeccompError(f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    return len(resolve(profile=profile))


def export_bpf_text(profile: str = "forwarder") -> str:
    """The filter as libseccomp's pseudo-filter-code text (for docs)."""
    import tempfile

    _, lib = _lib()
    ctx = _build(profile)
    try:
        with tempfile.TemporaryFile() as f:
            lib.seccomp_export_pfc(ctx, f.fileno())
            f.seek(0)
            return f.read().decode()
    finally:
        lib.seccomp_release(ctx)


def export_bpf(profile: str = "bypass") -> bytes:
    """The filter as the kernel's BPF program (struct sock_filter[]), for a
    process that loads it itself: the bypass handler (csrc/bypass.c loads
    it after its set-up, on both its threads)."""
    _, lib = _lib()
    ctx = _build(profile)
    try:
        fd = os.memfd_create("nsnet-seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompError(f"seccomp_export_bpf: {os.strerror(-rc)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


# -- self-check: `python -m nsnet.seccomp check SYSCALL` ---------------------

def _raw_syscall(nr: int, args=()) -> tuple[int, int]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # An argument given as a str is passed as a pointer to that C string
    # (a path for openat); integers as they are.
    bufs = [ctypes.create_string_buffer(x.encode()) for x in args if isinstance(x, str)]
    it = iter(bufs)
    a = [ctypes.c_long(ctypes.addressof(next(it))) if isinstance(x, str) else ctypes.c_long(x)
         for x in (list(args) + [0] * 6)[:6]]
    rc = libc.syscall(ctypes.c_long(nr), *a)
    return rc, ctypes.get_errno()


def check(syscall_name: str, sandbox: bool = True, args=(), profile: str = "forwarder") -> dict:
    """Fork a child that enters the sandbox (unless sandbox=False) and the
    seccomp filter of `profile` (forwarder, relay, connector; bypass: no
    sandbox, loaded as the handler does), then makes
    `syscall_name` with
    `args` (integers, or str for a pointer to that C string; missing ones are 0).  Returns how the child ended: {"outcome": "refused",
    "signal": "SIGSYS"} or {"outcome": "allowed", "rc": N, "errno": E}."""
    from . import sandbox as sandbox_mod

    _, lib = _lib()
    nr = lib.seccomp_syscall_resolve_name(syscall_name.encode())
    if nr < 0:
        raise SeccompError(f"unknown syscall {syscall_name!r}")
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            if profile == "bypass":  # no sandbox; the handler's own loader
                from .host.bypass import load_filter

                load_filter(export_bpf("bypass"))
            else:
                sandbox_mod.enter(sandbox=sandbox, seccomp=True, forwards=[], profile=profile)
            rc, err = _raw_syscall(nr, args)
            os.write(w, f"{rc} {err}".encode())
            code = 0
        except BaseException as e:
            try:
                os.write(w, f"error {e!r}".encode())
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result: dict = {"syscall": syscall_name, "args": list(args), "nr": nr, "sandbox": sandbox,
                    "profile": profile}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        result.update(outcome="refused" if sig == signal.SIGSYS else "killed",
                      signal=signal.Signals(sig).name)
    elif data.startswith(b"error"):
        result.update(outcome="error", error=data.decode(errors="replace"))
    else:
        rc, err = data.split()
        result.update(outcome="allowed", rc=int(rc), errno=int(err),
                      exit_status=os.WEXITSTATUS(status))
    return result


# strace's names for the argument values the profiles filter on (x86_64
# values; derive() compares the traces' arguments with RESTRICTED).
_STRACE_NAMES: dict[str, int] = {
    "AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17,
    "SOCK_STREAM": 1, "SOCK_DGRAM": 2, "SOCK_RAW": 3, "SOCK_SEQPACKET": 5,
    "SOCK_NONBLOCK": 0o4000, "SOCK_CLOEXEC": 0o2000000,
    "IPPROTO_IP": 0, "IPPROTO_ICMP": 1, "IPPROTO_TCP": 6, "IPPROTO_UDP": 17,
    "IPPROTO_ICMPV6": 58, "NETLINK_ROUTE": 0, "NETLINK_SOCK_DIAG": 4,
    "FIONREAD": _FIONREAD, "FIONBIO": _FIONBIO, "TCGETS": _TCGETS, "TIOCGWINSZ": 0x5413,
    "TIOCSTI": 0x5412, "FIOCLEX": 0x5451, "FIONCLEX": 0x5450,
    **{f"SECCOMP_IOCTL_NOTIF_{k.upper()}": v for k, v in NOTIF_IOCTLS.items()},
    "F_DUPFD": 0, "F_GETFD": _F_GETFD, "F_SETFD": _F_SETFD, "F_GETFL": _F_GETFL,
    "F_SETFL": _F_SETFL, "F_GETLK": 5, "F_SETLK": 6, "F_SETLKW": 7, "F_SETOWN": 8,
    "F_GETOWN": 9, "F_DUPFD_CLOEXEC": 1030, "F_SETPIPE_SZ": _F_SETPIPE_SZ,
    "F_GETPIPE_SZ": _F_GETPIPE_SZ, "F_ADD_SEALS": 1033, "F_GET_SEALS": 1034,
    "PROT_NONE": 0, "PROT_READ": 1, "PROT_WRITE": 2, "PROT_EXEC": _PROT_EXEC,
    "O_RDONLY": 0, "O_WRONLY": 1, "O_RDWR": 2, "O_CREAT": _O_CREAT, "O_EXCL": 0o200,
    "O_NOCTTY": 0o400, "O_TRUNC": _O_TRUNC, "O_APPEND": 0o2000, "O_NONBLOCK": 0o4000,
    "O_DSYNC": 0o10000, "O_ASYNC": 0o20000, "O_DIRECT": 0o40000, "O_LARGEFILE": 0o100000,
    "O_DIRECTORY": 0o200000, "O_NOFOLLOW": 0o400000, "O_NOATIME": 0o1000000,
    "O_CLOEXEC": 0o2000000, "O_SYNC": 0o4010000, "O_PATH": 0o10000000,
    "O_TMPFILE": 0o20200000,
}


def _split_args(text: str) -> list[str]:
    """The top-level, comma-separated arguments of one strace call line
    (after the opening parenthesis); strings and nested brackets kept whole."""
    out, cur, depth, quoted, esc = [], [], 0, False, False
    for ch in text:
        if quoted:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:  # the call's closing parenthesis
                break
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _arg_value(text: str) -> int | None:
    """An argument as strace prints it (NAME|NAME|0x10, a number) as a
    number; None when it is not one (a structure, an unknown name)."""
    value = 0
    for part in text.split("|"):
        part = part.strip()
        if part in _STRACE_NAMES:
            value |= _STRACE_NAMES[part]
            continue
        try:
            value |= int(part, 0) if not re.fullmatch(r"0[0-7]+", part) else int(part, 8)
        except ValueError:
            return None
    return value


def _args_allowed(alternatives: list[list[tuple]], values: dict[int, int]) -> bool:
    for alt in alternatives:
        if all((values[c[0]] == c[2]) if c[1] == "eq" else
               ((values[c[0]] & c[2]) == c[3]) for c in alt):
            return True
    return False


def derive(paths: list[str], profile: str = "forwarder") -> dict:
    """Read `strace -ff -o PREFIX` output files; in each trace of a
    process that entered the sandbox or loaded a filter, count the
    syscalls made after that point (compared with `profile`'s list).  Returns {"traces": N, "calls": {name: count},
    "missing": [names not on ALLOWLIST], "unused": [listed, never seen],
    "args": {filtered call: {its filtered arguments as strace printed them:
    count}}, "refused_args": the same for the calls whose arguments the
    profile's filter refuses (or that could not be read)}."""
    line_re = re.compile(r"^(?:\d+\s+)?([a-z_0-9]+)\(")
    resumed_re = re.compile(r"<\.\.\. ([a-z_0-9]+) resumed>")
    calls: dict[str, int] = {}
    restricted = _profile(profile)[1]
    args: dict[str, dict[str, int]] = {}
    refused_args: dict[str, dict[str, int]] = {}
    killed = 0
    traces = 0
    threads: set[str] = set()  # traces of the bypass handler's threads
    # a handler's trace before its threads' (their ids are larger)
    paths = sorted(paths, key=lambda p: (len(p), p))
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            continue
        # only the profile's own process (PR_SET_NAME names each one), or
        # the bypass handler's thread: not the supervisor (its own capset),
        # helpers, nsnet run's command (its own filter), other processes
        names = [ln for ln in lines if ln.startswith("prctl(PR_SET_NAME")]
        if path not in threads and \
                not any(f'"{_PROCESS_NAMES[profile]}"' in ln for ln in names):
            continue
        start = None
        # the connector (no sandbox of its own here): from its last setns;
        # the bypass handler: from its last set-up call (the filter goes in
        # right after); its byte-tracking thread (a trace of its own, by
        # the clone's result): the whole of it
        markers = ("capset(", "seccomp(SECCOMP_SET_MODE_FILTER") + (
            ("setns(",) if profile == "connector" else ()) + (
            ("seccomp(SECCOMP_GET_NOTIF_SIZES",) if profile == "bypass" else ())
        for i, line in enumerate(lines):
            if line.startswith(markers) or (
                    start == i and line.startswith("prctl(PR_SET_DUMPABLE")):
                # (the sandbox's last step follows its capset: dumpable 0)
                start = i + 1
            elif profile == "bypass" and names and line.startswith(("clone3(", "clone(")):
                tid = line.rsplit("= ", 1)[-1].strip()
                if tid.isdigit():
                    threads.add(f"{path.rsplit('.', 1)[0]}.{tid}")
        if path in threads:
            # its start-up (rseq, set_robust_list, the signal mask, its
            # malloc arena) ends with the wake-up of the handler waiting
            # for it (nsb_diag_start), before the filter: from there on
            # when that shows, else the whole of it
            start = 0
            for i, line in enumerate(lines):
                if line.startswith("futex(") and "FUTEX_WAKE" in line:
                    start = i + 1
                    break
                if line.startswith(("poll(", "ppoll(")):
                    break
        if start is None:
            continue
        traces += 1
        for line in lines[start:]:
            if "killed by SIGSYS" in line:
                killed += 1
            if resumed_re.search(line):
                continue
            m = line_re.match(line)
            if m:
                name = m.group(1)
                calls[name] = calls.get(name, 0) + 1
                if name in restricted:
                    _count_args(line[m.end():], restricted[name],
                                args.setdefault(name, {}), refused_args, name)
    listed = set(_profile(profile)[0])
    return {"traces": traces, "killed_by_sigsys": killed,
            "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "missing": sorted(set(calls) - listed),
            "unused": sorted(listed - set(calls)),
            "args": {k: dict(sorted(v.items(), key=lambda kv: -kv[1]))
                     for k, v in args.items()},
            "refused_args": refused_args}


def _count_args(rest: str, alternatives: list[list[tuple]], seen: dict[str, int],
                refused: dict[str, dict[str, int]], name: str) -> None:
    """Count one filtered call by the arguments its filter looks at, and
    under `refused` when the filter would not allow them."""
    rest = rest.split(" <unfinished", 1)[0]
    argv = _split_args(rest)
    idx = sorted({c[0] for alt in alternatives for c in alt})
    shown = ", ".join(argv[i] if i < len(argv) else "?" for i in idx)
    seen[shown] = seen.get(shown, 0) + 1
    values = {i: _arg_value(argv[i]) if i < len(argv) else None for i in idx}
    if any(v is None for v in values.values()) or \
            not _args_allowed(alternatives, values):  # type: ignore[arg-type]
        per = refused.setdefault(name, {})
        per[shown] = per.get(shown, 0) + 1


def main(argv: list[str]) -> int:
    import json

    # --profile=forwarder|relay|connector|bypass, anywhere (default: forwarder)
    profile = "forwarder"
    for a in [a for a in argv if a.startswith("--profile=")]:
        profile = a.split("=", 1)[1]
        argv.remove(a)
    if profile not in PROFILES:
        print(f"nsnet.seccomp: unknown profile {profile!r} (one of {', '.join(PROFILES)})",
              file=sys.stderr)
        return 2
    if len(argv) >= 2 and argv[0] == "derive":
        print(json.dumps(derive(argv[1:], profile), indent=1))
        return 0
    if len(argv) >= 1 and argv[0] == "list":
        restricted = _profile(profile)[1]
        for name, nr in sorted(resolve(profile=profile).items(), key=lambda kv: kv[1]):
            extra = f"  only {restricted[name]}" if name in restricted else ""
            print(f"{nr:4d} {name}{extra}")
        print(f"{len(resolve(profile=profile))} syscalls allowed; everything else kills "
              "the process")
        return 0
    if len(argv) >= 1 and argv[0] == "pfc":
        print(export_bpf_text(profile), end="")
        return 0
    if len(argv) >= 2 and argv[0] == "check":
        sandbox = "--no-sandbox" not in argv
        # SYSCALL or SYSCALL:ARG0,ARG1,... (integers, 0x... and 0o...
        # allowed; s:TEXT passes a pointer to the C string TEXT, a path)
        for spec in [a for a in argv[1:] if not a.startswith("--")]:
            name, _, rest = spec.partition(":")
            args = [x[2:] if x.startswith("s:") else int(x, 0)
                    for x in rest.split(",")] if rest else []
            print(json.dumps(check(name, sandbox=sandbox, args=args, profile=profile)),
                  flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
