"""nsnet at its open-file limit (RLIMIT_NOFILE): nsnet/fdlimit.py.

Limits are set with prlimit on the process the test starts (or on its
children, by PID, as its own user may).

- A hard limit below what nsnet needs: a clear error at start, exit 1
  (nsnet run: 125), nothing started.
- nsnet run raises its own soft limit, and gives COMMAND the one it had.
- A limit lowered below the fds the supervisor holds: poll(2) refuses
  nfds > RLIMIT_NOFILE (EINVAL); nsnet raises its soft limit back, or,
  with the hard limit lowered too, polls its fds in turns: it keeps
  running, forwarding, and stops cleanly on SIGTERM.
- Idle API clients never take the supervisor's reserve: a forwarder
  restart works while they hold every other fd; a client that cannot be
  served gets an error at once.  Out of fds all the same (the limit
  lowered from outside), a forwarder restart waits for fds instead of
  giving up.
- A forward's accept at EMFILE (the forwarder's C loop, the fast path's
  relay): that connection is refused at once, nothing spins, a warning;
  connections work again once fds are free.
"""
import json
import os
import signal
import socket
import time

import pytest

import harness
from harness import api_call, free_port, idle_clients, unpriv_only, wait_until

pytestmark = pytest.mark.timeout(90)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def nofile(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


def info(net) -> dict:
    return json.loads(api_call(net.api, {"execute": "get_info"}, timeout=10))["return"]


def add_forward(net, port: int, guest_port: int, mode: str | None = None) -> None:
    args = {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": port,
            "guest_port": guest_port}
    if mode:
        args["mode"] = mode
    reply = json.loads(api_call(net.api, {"execute": "add_hostfwd", "arguments": args}))
    assert "return" in reply, reply


def connect_outcome(port: int, timeout: float = 3.0) -> str:
    """'refused' (EOF or reset before any byte), 'hang', or what came."""
    with socket.socket() as s:
        s.settimeout(timeout)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"x")
            data = s.recv(100)
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
            return "refused"
        except socket.timeout:
            return "hang"
        return "refused" if not data else data.decode(errors="replace")


def test_start_below_the_limit_nsnet_needs(user, ns):
    """Hard limit 40 (below 64): nsnet and nsnet run say so and what to do."""
    cp = user.run(["prlimit", "--nofile=40:40", harness.nsnet_bin(), "-c", str(ns.pid), "tap0"],
                  timeout=20)
    err = cp.stderr.decode()
    assert cp.returncode == 1, err
    assert "the open-file limit is too low: RLIMIT_NOFILE is 40 (hard limit 40)" in err, err
    assert "EMFILE" in err and "LimitNOFILE=" in err and "ulimit -Hn" in err, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert "tap0" not in ns.run(["ip", "-o", "link"]).stdout.decode()  # nothing set up
    cp = user.run(["prlimit", "--nofile=40:40", harness.nsnet_bin(), "run", "--",
                   "sh", "-c", "echo ran"], timeout=20)
    assert cp.returncode == 125, cp
    assert b"ran" not in cp.stdout
    assert b"the open-file limit is too low" in cp.stderr, cp.stderr


@unpriv_only
def test_run_gives_command_its_soft_limit(user):
    """nsnet run raises its own soft limit (set-up needs fds); COMMAND gets
    the one nsnet was started with (select() breaks above 1024)."""
    cp = user.run(["prlimit", "--nofile=256:2048", harness.nsnet_bin(), "run", "--",
                   "sh", "-c", "ulimit -Sn; ulimit -Hn"], timeout=30)
    assert cp.returncode == 0, cp
    assert cp.stdout.split() == [b"256", b"2048"], cp


def test_limit_lowered_below_what_it_holds(user, ns, attach, nsnet_impl):
    """The known defect: poll(2) with more fds than RLIMIT_NOFILE ended
    the supervisor with an internal error."""
    net = attach(nsnet_impl, ns)
    pid = net.fwd.proc.pid
    soft, hard = nofile(pid)
    assert soft == hard  # raised at start
    port = free_port()
    add_forward(net, port, 8080)
    # The soft limit only: nsnet raises it back at once.
    user.run(["prlimit", f"--pid={pid}", f"--nofile=3:{hard}"], check=True, timeout=10)
    assert info(net)["supervisor_pid"] == pid  # its next poll: EINVAL before
    assert nofile(pid)[0] == hard
    assert "was lowered to 3" in net.fwd.log()
    # The hard limit too (what its user may do; raising it back needs
    # CAP_SYS_RESOURCE): below what the supervisor holds and polls.
    fwd_pid = info(net)["forwarder_pid"]
    user.run(["prlimit", f"--pid={pid}", "--nofile=4:4"], check=True, timeout=10)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(net.api)  # wakes it up: no fd to accept it with
        wait_until(lambda: "polls them in turns" in net.fwd.log(), 10, what="the warning")
    # The data path lives on: the forward serves a connection.
    srv = ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
    assert harness.tcp_send("127.0.0.1", port, b"still") == b"still"
    srv.result()
    assert net.fwd.alive()
    os.kill(fwd_pid, 0)  # the same forwarder: nothing was restarted
    # Its fds are still watched: the target's exit ends it, cleanly.
    target = ns.pid
    ns.close()
    assert net.fwd.proc.wait(timeout=15) == 0, net.fwd.log()
    log = net.fwd.log()
    assert f"exiting: target PID {target} exited (exit 0)" in log, log
    assert "internal error" not in log, log


@unpriv_only
def test_api_clients_leave_the_reserve(user, ns, attach, nsnet_impl):
    """Hard limit 64: 100 idle API clients would take every fd.  They never
    take the last 16: a request is answered at once (the oldest idle client
    makes room) and a killed forwarder is restarted while they hold on."""
    net = attach(nsnet_impl, ns, prefix=("prlimit", "--nofile=64:64"))
    pid = net.fwd.proc.pid
    fwd_pid = info(net)["forwarder_pid"]
    idle = idle_clients(net.api, 100)
    try:
        wait_until(lambda: open_fds(pid) >= 64 - 17, 10, what="the clients accepted")
        t0 = time.monotonic()
        assert info(net)["supervisor_pid"] == pid
        assert time.monotonic() - t0 < 2.0  # not after the idle ones expire (5 s)
        os.kill(fwd_pid, signal.SIGKILL)
        wait_until(lambda: info(net)["restarts"] == 1, 4, what="a new forwarder")
        got = info(net)
        assert got["forwarder_state"] == "running" and got["forwarder_pid"] != fwd_pid, got
        assert net.fwd.alive()
    finally:
        for s in idle:
            s.close()
    assert "cannot start a forwarder" not in net.fwd.log()


def pidfd_number(holder: int, pid: int) -> int:
    """The fd number of `holder`'s pidfd on `pid`."""
    for name in os.listdir(f"/proc/{holder}/fdinfo"):
        try:
            with open(f"/proc/{holder}/fdinfo/{name}") as f:
                if f"Pid:\t{pid}\n" in f.read():
                    return int(name)
        except OSError:
            pass
    raise AssertionError(f"no pidfd on {pid} in {holder}")


@unpriv_only
def test_forwarder_restart_waits_for_fds(user, ns, attach, nsnet_impl):
    """The hard limit lowered, while API clients hold fds, below even the
    fds of the forwarder, which is then killed: no socket can be had for
    a new one.  nsnet neither gives up (5 quick failures would end it in
    1.5 s) nor loses anything: it tries again every 0.5 s, and still
    exits cleanly with its target.  (A child forked at the limit:
    tests/unit/test_children_stdio.py.)"""
    net = attach(nsnet_impl, ns, prefix=("prlimit", "--nofile=64:64"))
    pid = net.fwd.proc.pid
    add_forward(net, free_port(), 8080)
    fwd_pid = info(net)["forwarder_pid"]
    base = open_fds(pid)
    idle = idle_clients(net.api, 20)
    try:
        wait_until(lambda: open_fds(pid) >= base + 18, 10, what="the clients accepted")
        # Below its control socket and pidfd: their numbers are no room.
        limit = min(lowest_free_fd(pid), pidfd_number(pid, fwd_pid) - 1)
        user.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True,
                 timeout=10)
        os.kill(fwd_pid, signal.SIGKILL)
        wait_until(lambda: "cannot start a forwarder" in net.fwd.log(), 10, what="the warning")
        time.sleep(2.0)
        assert net.fwd.alive(), net.fwd.log()
    finally:
        for s in idle:
            s.close()
    log = net.fwd.log()
    assert "Too many open files (EMFILE" in log and "trying again every 0.5 s" in log, log
    assert "giving up" not in log, log
    target = ns.pid
    ns.close()
    assert net.fwd.proc.wait(timeout=15) == 0, net.fwd.log()
    assert f"exiting: target PID {target} exited (exit 0)" in net.fwd.log()


@unpriv_only
def test_api_client_refused_when_all_wait(user, ns, attach, nsnet_impl):
    """Every client waits for the (stopped) forwarder and the fds left are
    the reserve: the next client gets an error at once, not a hang."""
    net = attach(nsnet_impl, ns, prefix=("prlimit", "--nofile=64:64"))
    pid = net.fwd.proc.pid
    fwd_pid = info(net)["forwarder_pid"]
    waiting = []
    os.kill(fwd_pid, signal.SIGSTOP)
    try:
        for _ in range(60):  # get_stats waits for the forwarder (5 s at most)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.append(s)
            s.settimeout(5)
            s.connect(net.api)
            try:
                s.sendall(b'{"execute":"get_stats"}')
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # refused already (past the reserve)
        time.sleep(0.5)  # each read, and waiting for the forwarder
        t0 = time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(net.api)
            try:
                s.sendall(b'{"execute":"get_info"}')
            except OSError:
                pass  # the error may come (and the end) before the request
            reply = harness.recv_to_eof(s, reset_ends=True)
        assert time.monotonic() - t0 < 2.0
        assert json.loads(reply) == {"error": {"desc": "nsnet is out of file descriptors "
                                               "(RLIMIT_NOFILE): try again later"}}, reply
        assert open_fds(pid) <= 64 - 16 + 1
    finally:
        os.kill(fwd_pid, signal.SIGCONT)
        for s in waiting:
            s.close()
    assert "API: refused a client" in net.fwd.log()


def _relay_pid(sup: int) -> int:
    for pid in harness.descendants(sup):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "nsnet-relay":
                    return pid
        except OSError:
            pass
    raise AssertionError("no relay")


@unpriv_only
@pytest.mark.parametrize("mode", ["slirp", "splice", "splice_one_fd", "slirp_confined",
                                  "splice_confined"])
def test_forward_accept_at_the_limit(user, ns, attach, nsnet_impl, mode):
    """The forwarder (libslirp's forward) or the relay (splice) at EMFILE:
    each connection refused at once, no spin, one warning; served again
    once the limit allows.  splice_one_fd: the relay can accept, but not
    receive the connector's socket (MSG_CTRUNC): that client is refused,
    the connector is not blamed.  _confined: with --enable-sandbox and
    --enable-seccomp (the refusal's syscalls are in the allowlists)."""
    confined = mode.endswith("_confined")
    mode = mode.removesuffix("_confined")
    net = attach(nsnet_impl, ns, *(("--enable-sandbox", "--enable-seccomp") if confined else ()))
    port = free_port()
    add_forward(net, port, 8080, None if mode == "slirp" else "splice")
    pid = info(net)["forwarder_pid"] if mode == "slirp" else _relay_pid(net.fwd.proc.pid)
    soft, hard = nofile(pid)
    # The connector's connections reach the server (then it gets EOF).
    srv = ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo",
                          4 if mode == "splice_one_fd" else 1)
    # The lowest free fd number as the limit: no new fd can be had.
    limit = lowest_free_fd(pid) + (1 if mode == "splice_one_fd" else 0)
    user.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{hard}"], check=True, timeout=10)
    try:
        cpu0 = cpu_seconds(pid)
        for _ in range(3):
            assert connect_outcome(port) == "refused"
        time.sleep(1.0)
        assert cpu_seconds(pid) - cpu0 < 0.5  # a spin takes all of it
    finally:
        user.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True, timeout=10)
    assert harness.tcp_send("127.0.0.1", port, b"back") == b"back"
    srv.result()
    stats = json.loads(api_call(net.api, {"execute": "get_stats"}, timeout=10))["return"]
    refused = stats["fd_refused"] if mode == "slirp" else stats["fastpath"]["fd_refused"]
    assert refused == 3, stats
    log = net.fwd.log()
    assert "refused" in log and "Too many open files (EMFILE" in log, log
    assert "broke its protocol" not in log and "died" not in log, log
