"""The hostile namespace root (stdlib only; run with /usr/bin/python3 INSIDE
the target's user namespace, as its root, with every capability there).

It watches /proc for nsnet's processes (comm starting with "nsnet"), and
against each,
for as long as it lives, tries what an attacker would:

  root     listdir /proc/PID/root (the host's filesystem?)
  cwd      readlink /proc/PID/cwd
  fd       readlink /proc/PID/fd/N
  environ  read /proc/PID/environ
  mem      open /proc/PID/mem read-write
  maps     read /proc/PID/maps
  ptrace   PTRACE_ATTACH (then detach at once)
  getfd    pidfd_open + pidfd_getfd on its fds 0..15

New PIDs are probed right after the last one seen (the short-lived helpers
live for milliseconds), with a full /proc scan every few turns.

    nsattack.py OUT.json [STOPFILE] [SECONDS]

Prints "READY" once watching; stops when STOPFILE exists (or on SIGTERM,
or after SECONDS) and writes OUT.json: {pid: {"comm", "cmd", "ppid", "results":
{attack: "ok" | errno name}}}; an attack that succeeded once stays "ok".
"""
import ctypes
import errno
import json
import os
import signal
import sys
import time

PTRACE_ATTACH, PTRACE_DETACH = 16, 17
WALL = 0x40000000
SYS_PIDFD_GETFD = {"x86_64": 438, "aarch64": 438}.get(os.uname().machine, 438)

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
libc.syscall.restype = ctypes.c_long

ME = os.getpid()
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)


def ename(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def a_root(pid):
    os.listdir(f"/proc/{pid}/root/")


def a_cwd(pid):
    os.readlink(f"/proc/{pid}/cwd")


def a_fd(pid):
    """Open one of its fds through /proc (listing the numbers alone is
    allowed to the same uid and gives nothing)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = [str(n) for n in range(16)]
    last = OSError(errno.ENOENT, "no fd")
    for fd in fds:
        try:
            os.readlink(f"/proc/{pid}/fd/{fd}")
            return
        except OSError as e:
            last = e
    raise last


def a_environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        f.read(1)


def a_mem(pid):
    os.close(os.open(f"/proc/{pid}/mem", os.O_RDWR))


def a_maps(pid):
    with open(f"/proc/{pid}/maps", "rb") as f:
        if not f.read(1):
            raise OSError(errno.ENODATA, "empty")


def a_ptrace(pid):
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG | WALL)
        except ChildProcessError:
            break
        if done:
            break
        time.sleep(0.001)
    libc.ptrace(PTRACE_DETACH, pid, None, None)


def a_getfd(pid):
    pidfd = os.pidfd_open(pid)
    try:
        last = errno.EBADF
        for fd in range(16):
            got = libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                               ctypes.c_int(fd), ctypes.c_uint(0))
            if got >= 0:
                os.close(got)
                return
            last = ctypes.get_errno()
            if last != errno.EBADF:
                break
        raise OSError(last, os.strerror(last))
    finally:
        os.close(pidfd)


ATTACKS = {"root": a_root, "cwd": a_cwd, "fd": a_fd, "environ": a_environ, "mem": a_mem,
           "maps": a_maps, "ptrace": a_ptrace, "getfd": a_getfd}


def ident(pid):
    """(comm, cmd) if pid is one of nsnet's processes, else None."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return None
    cmd = ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read(4096).replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    if comm.startswith("nsnet"):
        return comm, cmd
    return None


def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rfind(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def main():
    out = sys.argv[1]
    stopfile = sys.argv[2] if len(sys.argv) > 2 else ""
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
    seen = {}      # pid -> record
    dead = set()   # pids checked and gone or not nsnet
    young = {}     # pid -> when first seen, not nsnet's (yet)
    last = ME

    def probe(pid):
        rec = seen.get(pid)
        if rec is None:
            who = ident(pid)
            if who is None:
                # Not (yet) nsnet's: a child that execs a fresh interpreter
                # names itself a moment later.  Look again for 2 s.
                first = young.setdefault(pid, time.monotonic())
                if time.monotonic() - first > 2 or not os.path.exists(f"/proc/{pid}"):
                    dead.add(pid)
                    young.pop(pid, None)
                return False
            young.pop(pid, None)
            rec = seen[pid] = {"comm": who[0], "cmd": who[1], "results": {}, "tries": 0,
                               "ppid": ppid(pid)}
        if not os.path.exists(f"/proc/{pid}"):
            dead.add(pid)
            return False
        rec["tries"] += 1
        who = ident(pid)  # the name may change (a helper names itself after fork)
        if who is not None:
            rec["comm"], rec["cmd"] = who
        for name, fn in ATTACKS.items():
            if rec["results"].get(name) == "ok":
                continue
            try:
                fn(pid)
                rec["results"][name] = "ok"
            except OSError as e:
                rec["results"][name] = ename(e.errno or 0)
        return True

    def scan(last):
        for e in os.listdir("/proc"):
            if e.isdigit():
                pid = int(e)
                if pid != ME and pid not in dead and pid not in seen:
                    probe(pid)
                if pid > last and pid - last < 1 << 15:
                    last = pid
        return last

    last = scan(last)
    print("READY", flush=True)
    deadline = time.monotonic() + seconds
    turn = 0
    while not stop and time.monotonic() < deadline:
        if stopfile and os.path.exists(stopfile):
            break
        turn += 1
        # New PIDs first: just after the highest seen.
        for pid in range(last + 1, last + 64):
            if os.path.exists(f"/proc/{pid}"):
                last = max(last, pid)
                if pid not in dead:
                    probe(pid)
        if turn % 20 == 0:
            last = scan(last)
        for pid in list(seen) + list(young):
            if pid not in dead:
                probe(pid)
    with open(out + ".tmp", "w") as f:
        json.dump({str(k): v for k, v in seen.items()}, f)
    os.rename(out + ".tmp", out)
    print("DONE", flush=True)


main()
