"""--enable-seccomp: the forwarder's syscall ALLOWLIST (libseccomp).

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
docs/SECCOMP.md has the method and the per-syscall reasons.

The filter is installed by sandbox.enter() after libslirp is set up and
after the sandbox (when both are asked for): mount(2), pivot_root(2),
unshare(2) and capset(2) are needed to build the sandbox and are not on
the list.

Check it by hand (a forked child enters the same sandbox and filter as
the forwarder, then makes one syscall):

    python -m nsnet.seccomp list
    python -m nsnet.seccomp check [--no-sandbox] SYSCALL
"""

from __future__ import annotations

import os
import signal
import sys

# Every syscall the sandboxed forwarder may make, grouped by who needs it.
# A name that does not exist on this architecture is skipped.
ALLOWLIST: tuple[str, ...] = (
    # -- the C data path: poll loop, TAP reads/writes (datapath.c) ----------
    "poll", "ppoll", "read", "readv", "write", "writev",
    "clock_gettime", "clock_nanosleep", "gettimeofday", "nanosleep",
    # -- libslirp: host sockets for guest TCP/UDP/ICMP, port forwards, DNS --
    "socket", "connect", "bind", "listen", "accept", "accept4",
    "getsockname", "getpeername", "setsockopt", "getsockopt",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
    "shutdown", "close", "fcntl", "ioctl",
    # libslirp re-reads /etc/resolv.conf (DNS forwarding) through stdio
    "openat", "open", "newfstatat", "fstat", "stat", "lstat", "statx", "lseek",
    # glib: random numbers (TCP ISNs, RA timers)
    "getrandom",
    # -- memory: malloc (glibc, glib, Python's allocator) -------------------
    "brk", "mmap", "munmap", "mremap", "madvise", "mprotect",
    # -- threads and locks (glibc, Python's GIL), signals -------------------
    "futex", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "restart_syscall",
    # -- identity and time queries of the interpreter and glib --------------
    "getpid", "gettid", "getuid", "geteuid", "getgid", "getegid",
    "sched_getaffinity", "sched_yield", "uname", "prlimit64", "getrlimit",
    # -- leaving ------------------------------------------------------------
    "exit", "exit_group",
)


class SeccompError(RuntimeError):
    pass


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


def resolve(names=ALLOWLIST) -> dict[str, int]:
    """name -> syscall number on this architecture (unknown names left out)."""
    _, lib = _lib()
    out = {}
    for name in names:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            out[name] = nr
    return out


def _build(names=ALLOWLIST):
    _, lib = _lib()
    ctx = lib.seccomp_init(lib.SCMP_ACT_KILL_PROCESS)
    if not ctx:
        raise SeccompError("seccomp_init failed")
    try:
        for name, nr in resolve(names).items():
            rc = lib.nsnet_seccomp_allow(ctx, nr)
            if rc < 0:
                raise SeccompError(f"seccomp_rule_add({name}): {os.strerror(-rc)}")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return ctx


def install(names=ALLOWLIST) -> int:
    """Load the allowlist filter into this process (irreversible: also
    sets PR_SET_NO_NEW_PRIVS).  Returns the number of syscalls allowed."""
    _, lib = _lib()
    ctx = _build(names)
    try:
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SeccompError(f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    return len(resolve(names))


def export_bpf_text(names=ALLOWLIST) -> str:
    """The filter as libseccomp's pseudo-filter-code text (for docs)."""
    import tempfile

    _, lib = _lib()
    ctx = _build(names)
    try:
        with tempfile.TemporaryFile() as f:
            lib.seccomp_export_pfc(ctx, f.fileno())
            f.seek(0)
            return f.read().decode()
    finally:
        lib.seccomp_release(ctx)


# -- self-check: `python -m nsnet.seccomp check SYSCALL` ---------------------

def _raw_syscall(nr: int) -> tuple[int, int]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(nr), ctypes.c_long(0), ctypes.c_long(0),
                      ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    return rc, ctypes.get_errno()


def check(syscall_name: str, sandbox: bool = True) -> dict:
    """Fork a child that enters the forwarder's sandbox (unless
    sandbox=False) and seccomp filter, then makes `syscall_name` with all
    arguments 0.  Returns how the child ended: {"outcome": "refused",
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
            sandbox_mod.enter(sandbox=sandbox, seccomp=True, forwards=[])
            rc, err = _raw_syscall(nr)
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
    result: dict = {"syscall": syscall_name, "nr": nr, "sandbox": sandbox}
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


def main(argv: list[str]) -> int:
    import json

    if len(argv) >= 1 and argv[0] == "list":
        for name, nr in sorted(resolve().items(), key=lambda kv: kv[1]):
            print(f"{nr:4d} {name}")
        print(f"{len(resolve())} syscalls allowed; everything else kills the process")
        return 0
    if len(argv) >= 1 and argv[0] == "pfc":
        print(export_bpf_text(), end="")
        return 0
    if len(argv) >= 2 and argv[0] == "check":
        sandbox = "--no-sandbox" not in argv
        names = [a for a in argv[1:] if not a.startswith("--")]
        for name in names:
            print(json.dumps(check(name, sandbox=sandbox)), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
