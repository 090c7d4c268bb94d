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
