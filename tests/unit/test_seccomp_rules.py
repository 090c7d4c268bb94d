"""--enable-seccomp's allowlist as libseccomp builds it (nsnet.seccomp):
the exported filter, and forked children that load it (no sandbox, no root:
PR_SET_NO_NEW_PRIVS lets any user load a filter) and make one syscall."""
from __future__ import annotations

import errno

import pytest

from nsnet import seccomp

AF_INET, AF_INET6, AF_UNIX, AF_NETLINK, AF_PACKET = 2, 10, 1, 16, 17
TIOCSTI, FIONREAD, FIONBIO = 0x5412, 0x541B, 0x5421
PROT_READ, PROT_EXEC = 1, 4
MAP_PRIVATE_ANON = 0x22


@pytest.fixture(scope="module")
def pfc() -> str:
    return seccomp.export_bpf_text()


def test_default_action_kills_the_process(pfc):
    default = pfc.split("# default action", 1)[1]
    assert default.split(";")[0].strip() == "action KILL_PROCESS"


@pytest.mark.parametrize("name", ["execve", "mprotect", "ptrace", "mount", "unshare",
                                  "setns", "process_vm_writev", "bpf", "open_by_handle_at"])
def test_dangerous_syscalls_not_on_the_list(pfc, name):
    assert name not in seccomp.ALLOWLIST
    assert f'syscall "{name}"' not in pfc


def test_every_allowed_name_is_in_the_filter(pfc):
    for name in seccomp.resolve():
        assert f'syscall "{name}"' in pfc, name


def run(name, *args):
    return seccomp.check(name, sandbox=False, args=args)


def test_allowed_call_runs():
    res = run("getpid")
    assert res["outcome"] == "allowed" and res["rc"] > 0


@pytest.mark.parametrize("name,args", [
    ("mprotect", ()),
    ("execve", ()),
    ("socket", (AF_UNIX, 1, 0)),
    ("socket", (AF_NETLINK, 3, 0)),
    ("socket", (AF_PACKET, 3, 0)),
    ("ioctl", (0, TIOCSTI, 0)),
    ("mmap", (0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE_ANON, -1, 0)),
    ("fcntl", (0, 1030, 0)),  # F_DUPFD_CLOEXEC
])
def test_refused_calls_kill_with_sigsys(name, args):
    res = run(name, *args)
    assert res["outcome"] == "refused" and res["signal"] == "SIGSYS", res


@pytest.mark.parametrize("name,args", [
    ("socket", (AF_INET, 2, 0)),
    ("socket", (AF_INET6, 2, 0)),
    ("ioctl", (0, FIONREAD, 0)),
    ("mmap", (0, 4096, PROT_READ, MAP_PRIVATE_ANON, -1, 0)),
])
def test_argument_filtered_calls_allowed_with_good_arguments(name, args):
    res = run(name, *args)
    assert res["outcome"] == "allowed", res
    if name == "ioctl":  # fd 0 may be anything; the filter let it through
        assert res["rc"] >= 0 or res["errno"] in (errno.ENOTTY, errno.EBADF, errno.EINVAL)


# -- openat: read-only (issue 11, item 5) -------------------------------------

O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND = 0, 1, 2, 0o100, 0o1000, 0o2000
O_CLOEXEC, O_TMPFILE = 0o2000000, 0o20200000
AT_FDCWD = -100


@pytest.mark.parametrize("flags", [O_WRONLY, O_RDWR, O_WRONLY | O_TRUNC, O_WRONLY | O_APPEND,
                                   O_RDONLY | O_TRUNC, O_RDONLY | O_CREAT,
                                   O_WRONLY | O_CREAT, O_TMPFILE | O_RDWR])
def test_openat_for_writing_kills(tmp_path, flags):
    """What a compromised filtered process would do to the user's files:
    open one to write, truncate or create one.  Killed; the file intact."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"data\n")
    target = str(tmp_path if flags & O_TMPFILE == O_TMPFILE else victim)
    res = run("openat", AT_FDCWD, target, flags, 0o600)
    assert res["outcome"] == "refused" and res["signal"] == "SIGSYS", res
    assert victim.read_bytes() == b"data\n"
    res = run("openat", AT_FDCWD, str(tmp_path / "new"), flags | O_CREAT, 0o600)
    assert res["outcome"] == "refused", res
    assert not (tmp_path / "new").exists()


def test_openat_read_only_allowed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"data\n")
    res = run("openat", AT_FDCWD, str(victim), O_RDONLY | O_CLOEXEC, 0)
    assert res["outcome"] == "allowed" and res["rc"] >= 0, res


def test_openat_rule_in_filter(pfc):
    assert seccomp.RESTRICTED["openat"] == [[(2, "masked_eq", seccomp.OPEN_WRITE_FLAGS, 0)]]
    assert seccomp.OPEN_WRITE_FLAGS & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) == \
        O_WRONLY | O_RDWR | O_CREAT | O_TRUNC


# -- the relay's and the connector's profiles ---------------------------------

@pytest.mark.parametrize("profile", ["relay", "connector"])
def test_profiles_kill_by_default_and_differ(profile):
    pfc = seccomp.export_bpf_text(profile)
    assert pfc.split("# default action", 1)[1].split(";")[0].strip() == "action KILL_PROCESS"
    names = set(seccomp.resolve(profile=profile))
    assert not names & {"execve", "openat", "open", "mprotect", "ptrace", "mount", "setns",
                        "unshare", "pidfd_getfd", "process_vm_readv"}
    assert names != set(seccomp.resolve())


def test_connector_profile_has_no_server_calls():
    names = set(seccomp.resolve(profile="connector"))
    assert not names & {"bind", "listen", "accept", "accept4", "splice", "ioctl", "fcntl"}


def test_derive_per_profile(tmp_path):
    """derive --profile reads only that process's traces (PR_SET_NAME),
    from the point its confinement was in, and names what is missing."""
    (tmp_path / "t.1").write_text(
        'prctl(PR_SET_NAME, "nsnet-relay")       = 0\n'
        "epoll_create1(EPOLL_CLOEXEC)            = 3\n"
        "capset({version=_LINUX_CAPABILITY_VERSION_3, pid=0}, {}) = 0\n"
        "epoll_wait(3, [], 128, 1000)            = 0\n"
        "splice(5, NULL, 7, NULL, 65536, SPLICE_F_NONBLOCK) = 10\n"
        'openat(AT_FDCWD, "/etc/x", O_RDONLY)     = -1 ENOENT\n')
    (tmp_path / "t.2").write_text(
        'prctl(PR_SET_NAME, "nsnet-forwarder")   = 0\n'
        "capset({version=_LINUX_CAPABILITY_VERSION_3, pid=0}, {}) = 0\n"
        "writev(4, [], 2)                        = 0\n")
    (tmp_path / "t.3").write_text(
        'prctl(PR_SET_NAME, "nsnet-connect")     = 0\n'
        "setns(4, CLONE_NEWUSER)                 = 0\n"
        "setns(5, CLONE_NEWNET)                  = 0\n"
        "connect(6, {sa_family=AF_INET}, 16)     = -1 EINPROGRESS\n"
        "bind(6, {sa_family=AF_INET}, 16)        = 0\n")
    paths = [str(p) for p in sorted(tmp_path.iterdir())]
    relay = seccomp.derive(paths, "relay")
    assert relay["traces"] == 1 and relay["missing"] == ["openat"]
    assert relay["calls"] == {"epoll_wait": 1, "splice": 1, "openat": 1}
    conn = seccomp.derive(paths, "connector")
    assert conn["traces"] == 1 and conn["missing"] == ["bind"]
    assert seccomp.derive(paths)["calls"] == {"writev": 1}


# -- the bypass handler's profile (loaded by csrc/bypass.c itself) -------------

NOTIF_RECV, NOTIF_SET_FLAGS = 0xC0502100, 0x40082104
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW = 1, 2, 3
SOCK_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000
NETLINK_ROUTE, NETLINK_SOCK_DIAG = 0, 4
PR_SET_DUMPABLE = 4


def brun(name, *args):
    """A forked child loads the handler's BPF the handler's way
    (nsb_load_filter), then makes one call."""
    return seccomp.check(name, args=args, profile="bypass")


def test_bypass_profile_kills_by_default():
    pfc = seccomp.export_bpf_text("bypass")
    assert pfc.split("# default action", 1)[1].split(";")[0].strip() == "action KILL_PROCESS"
    names = set(seccomp.resolve(profile="bypass"))
    assert not names & {"execve", "execveat", "ptrace", "mount", "setns", "unshare", "kill",
                        "tgkill", "prctl", "seccomp", "clone", "clone3", "fork", "open",
                        "openat2", "bpf", "memfd_create", "sendmsg", "accept4", "listen"}


@pytest.mark.parametrize("name,args", [
    ("execve", ()),
    ("ptrace", ()),
    ("kill", (1, 0)),
    ("prctl", (PR_SET_DUMPABLE, 1)),
    ("clone3", ()),
    ("socket", (AF_UNIX, SOCK_STREAM, 0)),
    ("socket", (AF_INET, SOCK_DGRAM, 0)),
    ("socket", (AF_PACKET, SOCK_RAW, 0)),
    ("socket", (AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)),
    ("ioctl", (0, TIOCSTI, 0)),
    ("ioctl", (0, FIONBIO, 0)),
    ("ioctl", (0, NOTIF_SET_FLAGS, 0)),  # set-up only: before the filter
    ("mmap", (0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE_ANON, -1, 0)),
    ("mprotect", (0, 4096, PROT_READ | PROT_EXEC)),
    ("fcntl", (0, 0, 10)),  # F_DUPFD
])
def test_bypass_refused_calls_kill_with_sigsys(name, args):
    res = brun(name, *args)
    assert res["outcome"] == "refused" and res["signal"] == "SIGSYS", res


@pytest.mark.parametrize("name,args", [
    ("socket", (AF_INET, SOCK_STREAM | SOCK_NONBLOCK_CLOEXEC, 6)),
    ("socket", (AF_INET6, SOCK_STREAM, 0)),
    ("socket", (AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK_CLOEXEC, NETLINK_SOCK_DIAG)),
    ("ioctl", (0, NOTIF_RECV, 0)),
    ("mprotect", (0, 4096, PROT_READ)),
    ("process_vm_readv", ()),
    ("pidfd_getfd", (-1, 0, 0)),
])
def test_bypass_argument_filtered_calls_allowed(name, args):
    res = brun(name, *args)
    assert res["outcome"] == "allowed", res


def test_bypass_openat_for_writing_kills(tmp_path):
    """The handler reads /proc files; a taken-over one cannot create or
    truncate the user's."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"data\n")
    res = brun("openat", AT_FDCWD, str(victim), O_WRONLY | O_TRUNC, 0)
    assert res["outcome"] == "refused", res
    assert victim.read_bytes() == b"data\n"
    res = brun("openat", AT_FDCWD, str(tmp_path / "new"), O_WRONLY | O_CREAT, 0o600)
    assert res["outcome"] == "refused" and not (tmp_path / "new").exists(), res
    res = brun("openat", AT_FDCWD, str(victim), O_RDONLY | O_CLOEXEC, 0)
    assert res["outcome"] == "allowed" and res["rc"] >= 0, res


def test_bypass_filter_covers_every_thread():
    """The handler loads its filter after its byte-tracking thread has
    started: that thread is under it too (SECCOMP_FILTER_FLAG_TSYNC).  A
    child starts a thread, loads the filter, then the thread makes a call
    off the list: the whole process is killed, the thread never reports."""
    import os
    import signal
    import threading

    from nsnet.host.bypass import load_filter

    bpf = seccomp.export_bpf("bypass")
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            def thread():
                os.read(go_r, 1)
                os.getppid()  # not on the list
                os.write(res_w, b"thread survived")

            t = threading.Thread(target=thread)
            t.start()
            load_filter(bpf)
            os.write(go_w, b"x")
            t.join()
            code = 0
        finally:
            os._exit(code)
    for fd in (go_r, go_w, res_w):
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    got = os.read(res_r, 100)
    os.close(res_r)
    assert got == b""
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, status


def test_derive_bypass_handler_and_its_thread(tmp_path):
    """derive --profile=bypass: the handler's trace from its last set-up
    call (the filter goes in right after), and its thread's whole trace
    (found by the clone's result); the command's trace (its own filter,
    no name) is not the handler's."""
    (tmp_path / "t.10").write_text(
        'prctl(PR_SET_NAME, "nsnet-bypass")      = 0\n'
        "socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, 0) = 5\n"
        "clone3({flags=CLONE_VM|CLONE_THREAD}, 88) = 12\n"
        "seccomp(SECCOMP_GET_NOTIF_SIZES, 0, {}) = 0\n"
        "ioctl(3, SECCOMP_IOCTL_NOTIF_RECV, 0x1) = 0\n"
        "process_vm_readv(7, [], 1, [], 1, 0)   = 16\n")
    (tmp_path / "t.12").write_text(
        "poll([{fd=4, events=POLLIN}], 1, -1)  = 1\n"
        "recvmmsg(4, [], 32, MSG_DONTWAIT, NULL) = 1\n")
    (tmp_path / "t.11").write_text(
        "seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, {}) = 3\n"
        'execve("/usr/bin/python3", [], []) = 0\n')
    paths = [str(p) for p in sorted(tmp_path.iterdir())]
    res = seccomp.derive(paths, "bypass")
    assert res["traces"] == 2
    assert res["calls"] == {"ioctl": 1, "process_vm_readv": 1, "poll": 1, "recvmmsg": 1}
    assert res["missing"] == []
