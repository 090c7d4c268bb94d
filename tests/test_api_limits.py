"""Issue 11, item 6: the supervisor under fd pressure, and --pidfile.

- 1,000 idle API clients: the supervisor keeps at most API_MAX_CLIENTS
  connections open, does not spin, and answers another client.
- The supervisor at its fd limit (EMFILE on accept): it stops polling the
  listener instead of spinning, and answers again once fds are available.
- It raises its soft RLIMIT_NOFILE to the hard limit at start.
- --pidfile never follows a planted symlink (neither at PATH nor at the old
  predictable PATH.PID.tmp)."""
import json
import os
import resource
import signal
import socket
import time

import pytest

from harness import api_call, idle_clients, recv_to_eof, wait_until

pytestmark = pytest.mark.timeout(120)

API_MAX_CLIENTS = 128
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def cpu_over(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no Max open files line")


@pytest.fixture
def many_fds():
    """Let this process hold a few thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_thousand_idle_clients(user, ns, attach, nsnet_impl, many_fds):
    # Started with a soft fd limit of 256: nsnet raises it to the hard one.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    net = attach(nsnet_impl, ns, prefix=("prlimit", f"--nofile=256:{hard}"))
    pid = net.fwd.proc.pid
    assert soft_nofile(pid) == hard
    base = open_fds(pid)
    idle = idle_clients(net.api, 1000)
    try:
        time.sleep(1.0)
        # No spin while they sit there, and at most the cap held open.
        assert cpu_over(pid, 2.0) < 0.25  # a busy loop takes 0.6-2 s here
        assert open_fds(pid) <= base + API_MAX_CLIENTS
        reply = json.loads(api_call(net.api, {"execute": "get_info"}, timeout=10))
        assert reply["return"]["supervisor_pid"] == pid
        assert net.fwd.alive()
    finally:
        for s in idle:
            s.close()


def test_api_at_emfile_does_not_spin(user, ns, attach, nsnet_impl):
    net = attach(nsnet_impl, ns)
    pid = net.fwd.proc.pid
    hard = soft_nofile(pid)  # raised to the hard limit at start
    api_call(net.api, {"execute": "get_info"}, timeout=10)  # its work after ready is done
    # The lowest free fd number: accept() fails with EMFILE (with a few fds
    # left, within the reserve for its children, a client is refused
    # instead: tests/test_fd_limit.py).
    def lowest_free() -> int:
        used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        return min(set(range(len(used) + 1)) - used)

    n = 0
    while n != lowest_free():  # again if an fd was closed meanwhile
        n = lowest_free()
        # Only the soft limit: raising a hard one back would need CAP_SYS_RESOURCE.
        user.run(["prlimit", f"--pid={pid}", f"--nofile={n}:{hard}"], check=True, timeout=10)
        time.sleep(0.1)
    fill = []
    try:
        for _ in range(4):  # take whatever fds are left, idle
            f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            fill.append(f)
            f.connect(net.api)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(15)
            s.connect(net.api)  # queued in the backlog: accept() fails with EMFILE
            s.sendall(b'{"execute": "list_hostfwd"}')
            s.shutdown(socket.SHUT_WR)
            time.sleep(0.5)
            assert cpu_over(pid, 2.0) < 0.25  # a busy loop takes 0.6-2 s here
            assert net.fwd.alive()
            # An fd limit that allows it again: the waiting client is answered.
            user.run(["prlimit", f"--pid={pid}", f"--nofile={hard}:{hard}"], check=True,
                     timeout=10)
            out = recv_to_eof(s)
        assert json.loads(out).get("entries") == [], out
    finally:
        for f in fill:
            f.close()
        if net.fwd.alive():
            user.run(["prlimit", f"--pid={pid}", f"--nofile={hard}:{hard}"], timeout=10)
    assert "cannot accept: Too many open files" in net.fwd.log()


def test_pidfile_symlinks(user, ns, attach, nsnet_impl, workdir):
    """Symlinks planted at PATH and at the old temporary name PATH.PID.tmp
    (PID: nsnet's, known in advance here because sh execs nsnet) point at
    the user's files: neither file is written, PATH becomes nsnet's."""
    victim = os.path.join(workdir, "victim")
    victim2 = os.path.join(workdir, "victim2")
    pidfile = os.path.join(workdir, "nsnet.pid")
    for path in (victim, victim2):
        with open(path, "w") as f:
            f.write("precious\n")
        os.chown(path, user.uid, user.gid)
    os.symlink(victim, pidfile)
    # sh -c SCRIPT $0 $1 NSNET...: sh plants the link for its own PID, then execs nsnet.
    prefix = ("sh", "-c", 'ln -s "$0" "$1.$$.tmp" && shift && exec "$@"', victim2, pidfile)
    net = attach(nsnet_impl, ns, "--pidfile", pidfile, prefix=prefix)
    pid = net.fwd.proc.pid
    planted = f"{pidfile}.{pid}.tmp"
    for path in (victim, victim2):
        with open(path) as f:
            assert f.read() == "precious\n", path
    assert os.path.islink(planted)
    assert not os.path.islink(pidfile)
    with open(pidfile) as f:
        assert f.read() == f"{pid}\n"
    left = [n for n in os.listdir(workdir) if n.endswith(".tmp") and n != os.path.basename(planted)]
    assert left == []
    os.kill(pid, signal.SIGTERM)
    assert net.fwd.proc.wait(timeout=30) == 0
    assert not os.path.exists(pidfile)
    assert os.path.islink(planted)  # not ours: left alone
