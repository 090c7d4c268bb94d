"""The sandbox (--enable-sandbox) and seccomp filter (--enable-seccomp) of
the forwarder, entered after libslirp is set up and before the forwarder
serves any packet, and of the fast path's relay (profile "relay": an
empty root, its own seccomp list), entered once its epoll instance exists.

The sandbox, in this order:

1. Namespaces.  Building a private mount namespace needs CAP_SYS_ADMIN.
   An unprivileged forwarder gets it by creating a user namespace of its
   own (its uid and gid mapped to themselves, setgroups denied), together
   with new mount, IPC and UTS namespaces.  slirp4netns instead joins the
   *target's* user namespace, where the namespace's root (untrusted) holds
   every capability over it; nsnet's private user namespace is a sibling
   of the target's, so nothing in the target has any capability over the
   forwarder.  A forwarder that already has CAP_SYS_ADMIN (root) keeps its
   user namespace (so that CAP_NET_BIND_SERVICE still means something on
   the host) and unshares mount, IPC and UTS namespaces (IPC and UTS only
   where allowed).  The network namespace is never changed: libslirp's
   sockets live on the host.
2. Mounts.  Propagation is made private first (nothing reaches the
   caller's mounts), a small tmpfs becomes the new root (pivot_root), and
   the old root is detached.  The new root holds only /etc/resolv.conf
   (read by libslirp for DNS forwarding), recreated as the same chain of
   symlinks as on the host with the final file bind-mounted read-only,
   and it is remounted read-only, nosuid, nodev, noexec.
3. Privileges.  PR_SET_NO_NEW_PRIVS; PR_SET_DUMPABLE 0 (no ptrace or
   /proc access by other processes of the same uid that lack
   CAP_SYS_PTRACE over the forwarder's user namespace); ambient
   capabilities cleared; the bounding set emptied; effective, permitted
   and inheritable sets emptied - except CAP_NET_BIND_SERVICE, kept only
   where it can matter: when the forwarder really holds it on the host
   (root, no new user namespace) and the host restricts ports below
   net.ipv4.ip_unprivileged_port_start, since a forward to such a port
   may be added at any time through the API.
4. Root gives up uid 0 (as pasta does): a process that kept its user
   namespace (root) switches to nobody (its uid and gid from the passwd
   file, else 65534), with no supplementary groups, keeping only the
   capability of step 3 across the switch (PR_SET_KEEPCAPS); only when
   nobody is mapped in its user namespace (in a namespace that maps only
   uid 0, uid 0 is an unprivileged user of the host anyway).
   PR_SET_DUMPABLE 0 comes after the switch (a uid change resets it).

Then, with --enable-seccomp, the allowlist filter (nsnet.seccomp).

Limitation, documented in SECURITY.md: the resolv.conf bind mount pins
the file that existed when the forwarder started; if the host replaces
it by rename, the forwarder sees the new one after its next restart.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_SYS_ADMIN = 21
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

RESOLV_CONF = "/etc/resolv.conf"
NOBODY = 65534  # uid and gid when the passwd file has no "nobody"
# Candidate mount points for the new root's tmpfs (only hidden in the
# forwarder's own mount namespace).
ROOT_CANDIDATES = ("/tmp", "/run", "/mnt", "/var/tmp", "/dev")

# The C library the interpreter already has: ctypes.util.find_library
# would run ldconfig (tens of ms on the path to ready).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

# glibc has no pivot_root() wrapper: its number per architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203,
                   "s390x": 217, "i686": 217, "armv7l": 218}.get(os.uname().machine, -1)


class SandboxError(RuntimeError):
    pass


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise SandboxError(f"sandbox: {what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if _libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        _fail(f"mount {src or ''} on {target}")


def _prctl(what: str, *args: int) -> None:
    a = list(args) + [0] * (5 - len(args))
    if _libc.prctl(*a) != 0:
        _fail(what)


# -- facts about this process -------------------------------------------------

def _status_caps(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    return 0


def _has_cap(cap: int) -> bool:
    return bool(_status_caps("CapEff") >> cap & 1)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def resolv_chain(path: str = RESOLV_CONF, max_hops: int = 16) -> list[tuple[str, str, str]]:
    """What DNS forwarding needs from the host's filesystem: the chain of
    symlinks from /etc/resolv.conf to the real file.  A list of
    ("link", path, target) and finally ("file", path, "") if it exists."""
    chain: list[tuple[str, str, str]] = []
    for _ in range(max_hops):
        try:
            st = os.lstat(path)
        except OSError:
            return chain
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            chain.append(("link", path, target))
            path = os.path.normpath(os.path.join(os.path.dirname(path), target))
            continue
        if stat.S_ISREG(st.st_mode):
            chain.append(("file", path, ""))
        return chain
    return chain


# -- the steps ----------------------------------------------------------------

def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _new_namespaces() -> bool:
    """Unshare mount (and IPC, UTS) namespaces; create a private user
    namespace first when this process lacks CAP_SYS_ADMIN.  Returns
    True when a user namespace was created."""
    if _has_cap(CAP_SYS_ADMIN):
        if _libc.unshare(CLONE_NEWNS) != 0:
            _fail("unshare(CLONE_NEWNS)")
        for flag in (CLONE_NEWIPC, CLONE_NEWUTS):
            _libc.unshare(flag)  # best effort: "where the user may create them"
        return False
    if _threads() != 1:
        raise SandboxError("sandbox: the forwarder must be single-threaded to "
                           "create its user namespace")
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS) != 0:
        err = ctypes.get_errno()
        hint = ""
        if err in (errno.EPERM, errno.ENOSPC, errno.EINVAL):
            hint = (" (unprivileged user namespaces disabled? see "
                    "kernel.unprivileged_userns_clone / user.max_user_namespaces)")
        raise SandboxError(f"sandbox: cannot create a user namespace: "
                           f"{os.strerror(err)}{hint}")
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    except OSError as e:
        raise SandboxError(f"sandbox: cannot map ids in the new user namespace: "
                           f"{e.strerror}") from None
    return True


def _atime_flags(path: str) -> int:
    """The source mount's atime flags (they may be locked: keep them)."""
    f = os.statvfs(path).f_flag
    out = 0
    if f & os.ST_NOATIME:
        out |= MS_NOATIME
    if f & os.ST_NODIRATIME:
        out |= MS_NODIRATIME
    if f & os.ST_RELATIME:
        out |= MS_RELATIME
    return out


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _new_root(chain: list[tuple[str, str, str]]) -> None:
    """Private propagation, tmpfs root with only the resolv.conf chain,
    pivot_root, old root detached, new root read-only."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    base = None
    for cand in ROOT_CANDIDATES:
        if os.path.isdir(cand) and not os.path.islink(cand):
            base = cand
            break
    if base is None:
        raise SandboxError("sandbox: no directory to mount the new root on")
    _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755")
    for kind, path, target in chain:
        inside = base + path
        _mkdirs(os.path.dirname(inside))
        if kind == "link":
            os.symlink(target, inside)
        else:
            fd = os.open(inside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.close(fd)
            _mount(path, inside, None, MS_BIND)
            _mount(None, inside, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
                   | MS_NODEV | MS_NOEXEC | _atime_flags(path))
    os.chdir(base)
    if _SYS_PIVOT_ROOT < 0:
        raise SandboxError(f"sandbox: pivot_root unknown on {os.uname().machine}")
    # pivot_root(".", "."): the old root ends up stacked on the new one.
    if _libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), b".", b".") != 0:
        _fail("pivot_root")
    if _libc.umount2(b".", MNT_DETACH) != 0:
        _fail("umount2(old root)")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
           | MS_NOEXEC)


def _mapped(path: str, ident: int) -> bool:
    """Whether ident is mapped in this process's user namespace
    (/proc/self/uid_map or gid_map: "inside outside count" lines)."""
    try:
        with open(path) as f:
            for line in f:
                inside, _outside, count = (int(x) for x in line.split())
                if inside <= ident < inside + count:
                    return True
    except (OSError, ValueError):
        pass
    return False


def unprivileged_ids() -> tuple[int, int] | None:
    """(uid, gid) a root process should switch to: nobody's, if this
    process runs as uid 0 and nobody is mapped here; else None.  Read
    before pivot_root (no passwd file, no /proc afterwards)."""
    if os.geteuid() != 0:
        return None
    uid = gid = NOBODY
    try:
        import pwd

        pw = pwd.getpwnam("nobody")
        uid, gid = pw.pw_uid, pw.pw_gid
    except (ImportError, KeyError):
        pass
    if uid == 0 or not (_mapped("/proc/self/uid_map", uid)
                        and _mapped("/proc/self/gid_map", gid)):
        return None
    return uid, gid


def _switch_ids(ids: tuple[int, int]) -> None:
    """uid 0 -> ids, permitted capabilities kept (capset trims them next).
    A change of credentials clears PR_SET_PDEATHSIG: it is set again, and
    a parent that died meanwhile is noticed."""
    uid, gid = ids
    parent = os.getppid()
    _prctl("prctl(PR_SET_KEEPCAPS)", PR_SET_KEEPCAPS, 1)
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise SandboxError(f"sandbox: cannot switch to uid {uid} gid {gid}: "
                           f"{e.strerror}") from None
    _prctl("prctl(PR_SET_KEEPCAPS)", PR_SET_KEEPCAPS, 0)
    _prctl("prctl(PR_SET_PDEATHSIG)", PR_SET_PDEATHSIG, 9)  # SIGKILL, as children.py
    if os.getppid() != parent:
        raise SandboxError("sandbox: the supervisor died while this process switched uid")


def _drop_privileges(keep_bind: bool, ids: tuple[int, int] | None = None) -> None:
    _prctl("prctl(PR_SET_NO_NEW_PRIVS)", PR_SET_NO_NEW_PRIVS, 1)
    _prctl("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(_last_cap() + 1):
        if keep_bind and cap == CAP_NET_BIND_SERVICE:
            continue
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                break
            if err == errno.EPERM and not (_status_caps("CapBnd") >> cap & 1):
                continue  # nothing to drop
            _fail(f"prctl(PR_CAPBSET_DROP, {cap})")
    if ids is not None:
        _switch_ids(ids)
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if keep_bind:
        bit = 1 << CAP_NET_BIND_SERVICE
        data[0].effective = data[0].permitted = bit
    if _libc.capset(ctypes.byref(hdr), ctypes.byref(data)) != 0:
        _fail("capset")
    # Last: changing uid or gid resets the dumpable flag.
    _prctl("prctl(PR_SET_DUMPABLE)", PR_SET_DUMPABLE, 0)


def _preload(profile: str) -> None:
    """Import now what the process may import later: after pivot_root
    there is no Python library to import from."""
    import encodings.idna  # noqa: F401  (str.encode("idna") in socket calls)
    import json  # noqa: F401
    import traceback  # noqa: F401

    from . import forwards  # noqa: F401
    if profile == "forwarder":
        from .host import slirp  # noqa: F401


# -- the supervisor (--enable-sandbox) -----------------------------------------

# What a root supervisor keeps, and why (everything else leaves its
# effective, permitted and bounding sets).  Its children inherit these and
# drop them in turn (the forwarder and the relay keep at most
# CAP_NET_BIND_SERVICE).
SUPERVISOR_CAPS = {
    1: "CAP_DAC_OVERRIDE: the API socket and the pidfile wherever the caller puts them",
    5: "CAP_KILL: stop its children once they run as nobody",
    6: "CAP_SETGID: the forwarder and the relay switch to nobody's gid",
    7: "CAP_SETUID: the forwarder and the relay switch to nobody",
    8: "CAP_SETPCAP: children empty their bounding sets",
    10: "CAP_NET_BIND_SERVICE: forwards to host ports below 1024",
    12: "CAP_NET_ADMIN: the TAP and its configuration in the target's namespace",
    19: "CAP_SYS_PTRACE: /proc/PID/ns/* of a target, or of an API client (the peer "
        "check), that belongs to another user; the bypass handler's pidfd_getfd",
    21: "CAP_SYS_ADMIN: setns into the target's namespaces; the children's sandboxes "
        "(unshare, mount, pivot_root); this process's own mount namespace",
}
# Directories the supervisor's own mount view hides (an empty read-only
# tmpfs over each), besides the invoking user's home.
HIDDEN_DIRS = ("/home", "/root")
MS_SLAVE = 1 << 19


def _under(path: str, top: str) -> bool:
    top = top.rstrip("/")
    return path == top or path.startswith(top + "/")


def _hide_dirs(needed: list[str]) -> list[str]:
    """Root only: a mount namespace of the supervisor's own (propagation
    from the host kept, none back) with the users' homes hidden.  A
    directory that holds a path the supervisor still needs (API socket,
    pidfile, current directory, its Python and nsnet, $XDG_RUNTIME_DIR,
    $NOTIFY_SOCKET) stays visible."""
    import pwd
    import sys

    keep = [os.path.realpath(p) for p in needed if p]
    keep += [os.path.realpath(p) for p in (os.getcwd(), sys.prefix, sys.base_prefix,
                                           sys.executable, os.path.dirname(__file__))]
    # the instance registry (nsnet ps: $XDG_RUNTIME_DIR/nsnet), sd_notify's socket
    keep += [os.path.realpath(os.environ[v]) for v in ("XDG_RUNTIME_DIR", "NOTIFY_SOCKET")
             if os.environ.get(v, "").startswith("/")]
    dirs = set(HIDDEN_DIRS)
    try:
        dirs.add(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        pass
    if os.environ.get("HOME"):
        dirs.add(os.environ["HOME"])
    hide = []
    for d in sorted(os.path.realpath(x) for x in dirs):
        if d == "/" or not os.path.isdir(d) or any(_under(d, h) for h in hide):
            continue
        if any(_under(k, d) for k in keep):
            continue
        hide.append(d)
    if not hide:
        return []
    if _libc.unshare(CLONE_NEWNS) != 0:
        _fail("unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_SLAVE)
    for d in hide:
        _mount("tmpfs", d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=4k,mode=0755")
    return hide


def confine_supervisor(needed_paths: list[str | None]) -> dict[str, Any]:
    """--enable-sandbox, in the supervisor before its first child:
    PR_SET_NO_NEW_PRIVS; with capabilities (root), only SUPERVISOR_CAPS
    kept, ambient set cleared, and its own mount view without the users'
    homes.  Unprivileged it has no capability on the host to give up, and
    a mount view of its own would need a user namespace of its own, which
    would cost it the right to join the target's namespaces (SECURITY.md).
    Not dumpable: it is already (same uid as the caller, and a root
    supervisor is only reachable by root).  Raises SandboxError."""
    done: dict[str, Any] = {}
    _prctl("prctl(PR_SET_NO_NEW_PRIVS)", PR_SET_NO_NEW_PRIVS, 1)
    done["no_new_privs"] = True
    eff, prm = _status_caps("CapEff"), _status_caps("CapPrm")
    if not (eff or prm):
        return done
    keep = sum(1 << c for c in SUPERVISOR_CAPS)
    _prctl("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    bounding = _status_caps("CapBnd")
    if eff >> CAP_SETPCAP & 1:
        for cap in range(_last_cap() + 1):
            if bounding >> cap & 1 and not keep >> cap & 1:
                if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    _fail(f"prctl(PR_CAPBSET_DROP, {cap})")
    try:
        done["hidden"] = _hide_dirs(needed_paths) if eff >> CAP_SYS_ADMIN & 1 else []
    except OSError as e:
        raise SandboxError(f"sandbox: supervisor's mount view: {e}") from None
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = eff & keep & 0xFFFFFFFF
    data[0].permitted = prm & keep & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(hdr), ctypes.byref(data)) != 0:
        _fail("capset")
    done["caps"] = sorted(c for c in SUPERVISOR_CAPS if prm >> c & 1)
    return done


def enter(sandbox: bool, seccomp: bool, forwards: Any = None,
          profile: str = "forwarder") -> dict[str, Any]:
    """Enter the sandbox and/or install the seccomp filter in this process
    (profile: "forwarder", or "relay": an empty root, the relay's list).
    Raises SandboxError with the reason.  Returns what was done (for logs
    and tests)."""
    done: dict[str, Any] = {}
    if seccomp:
        # Load the binding now: after pivot_root nothing can be imported.
        from . import seccomp as seccomp_mod

        try:
            seccomp_mod.resolve(profile=profile)
        except seccomp_mod.SeccompError as e:
            raise SandboxError(f"seccomp: {e}") from None
    if sandbox:
        _preload(profile)
        had_bind = _has_cap(CAP_NET_BIND_SERVICE)
        ids = unprivileged_ids()
        port_start = _unprivileged_port_start()  # no /proc after pivot_root
        try:
            chain = resolv_chain() if profile == "forwarder" else []
            userns = _new_namespaces()
            _new_root(chain)
        except OSError as e:
            raise SandboxError(f"sandbox: {e}") from None
        keep_bind = had_bind and not userns and port_start > 0
        if userns:
            ids = None  # unprivileged already; its own user namespace maps only itself
        _drop_privileges(keep_bind, ids)
        done.update(userns=userns, keep_net_bind_service=keep_bind,
                    resolv_conf=[p for _, p, _ in chain], switched_to=ids)
    if seccomp:
        try:
            done["seccomp_allowed"] = seccomp_mod.install(profile)
        except seccomp_mod.SeccompError as e:
            raise SandboxError(f"seccomp: {e}") from None
    return done
