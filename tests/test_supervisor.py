"""The supervisor under fault injection (issue 3).

Every test runs real traffic through the namespace while the fault is
injected: a client loop inside the namespace connecting to a host echo
server through the gateway (10.0.2.2), and, where forwards matter, the
test process connecting to a hostfwd port that leads to an echo server
inside the namespace.  Faults: kill -9 of the forwarder (20 times), the
target exiting, the exit-fd closing, SIGTERM/SIGINT/SIGHUP, the TAP deleted
inside the namespace, a forwarder that fails at every start, kill -9 of the
supervisor.  sd_notify is checked against a datagram socket standing in
for systemd.

Latencies are measured and printed (run with -s to see them), never
asserted.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time

import psutil
import pytest

import harness
from svloop import echo_once
from harness import (HarnessError, Impl, add_hostfwd, api_call, free_port, free_ports,
                     wait_until)

pytestmark = pytest.mark.timeout(180)

GW = "10.0.2.2"

@pytest.fixture
def impl(nsnet_impl):
    """Only nsnet: slirp4netns has no supervisor (overrides conftest's)."""
    return nsnet_impl


@pytest.fixture
def ns_script(base_dir):
    """svloop.py where the namespaces' users can read it."""
    path = os.path.join(base_dir, "svloop.py")
    shutil.copy(os.path.join(harness.HERE, "svloop.py"), path)
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def wrapped(workdir):
    """Factory: an Impl that runs nsnet with extra environment variables
    (`exec env`: the same PID, the same fds)."""

    def make(**env: str) -> Impl:
        path = os.path.join(workdir, "nsnet-env.sh")
        assigns = " ".join(f"{k}={v}" for k, v in env.items())
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nexec /usr/bin/env {assigns} {harness.nsnet_bin()} "$@"\n')
        os.chmod(path, 0o755)
        return Impl("nsnet", path)

    return make


class ClientLoop:
    """ns -> host traffic: the in-namespace client loop, read by a thread."""

    def __init__(self, ns: harness.Namespace, script: str, host: str, port: int,
                 server: harness.HostServer):
        self.server = server
        self.proc = ns.popen([harness.NS_PYTHON, script, "client", host, port],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.results: list[dict] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.results.append(r)
                self.cond.notify_all()

    def first_ok_after(self, t: float, timeout: float = 10) -> dict:
        """The first successful connection started at or after t."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for r in self.results:
                    if r["ok"] and r["t0"] >= t:
                        return r
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = self.results[-5:]
                    raise HarnessError(f"no successful ns->host connection after t={t}: {tail}")
                self.cond.wait(left)

    def ok_count(self) -> int:
        with self.cond:
            return sum(1 for r in self.results if r["ok"])

    def forgive_resets(self):
        """Connections in flight when a forwarder died were reset: expected
        (libslirp's state dies with it), not a host server error."""
        self.server.errors[:] = [e for e in self.server.errors
                                 if not isinstance(e, ConnectionResetError)]

    def close(self):
        harness.kill_and_reap(self.proc)
        self.thread.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def client_loop(ns_script, host_server):
    """Factory: start the ns->host client loop on a namespace and wait for
    its first success; stopped at teardown."""
    loops: list[ClientLoop] = []

    def start(ns: harness.Namespace) -> ClientLoop:
        srv = host_server("echo")
        loop = ClientLoop(ns, ns_script, GW, srv.port, srv)
        loops.append(loop)
        loop.first_ok_after(0, timeout=15)
        return loop

    yield start
    for loop in loops:
        loop.close()
        # Every test here ends a forwarder under the loop's traffic.
        loop.forgive_resets()


@pytest.fixture
def ns_echo(ns_script):
    """Factory: a threaded echo server inside a namespace; returns its port."""
    procs: list[subprocess.Popen] = []

    def start(ns: harness.Namespace) -> int:
        proc = ns.popen([harness.NS_PYTHON, ns_script, "echo-server"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        line = harness.read_line(proc.stdout, 15)
        assert line.startswith(b"READY"), (line, proc.stderr.read())
        return int(line.split()[1])

    yield start
    for proc in procs:
        harness.kill_and_reap(proc)
        proc.stdout.close()
        proc.stderr.close()


def host_echo(port: int, timeout: float = 2.0) -> bool:
    """host -> ns through a hostfwd port: one echo round trip."""
    return echo_once("127.0.0.1", port, timeout, os.urandom(32))


def api(path: str, execute: str, timeout: float = 5, **arguments) -> dict:
    req = {"execute": execute}
    if arguments:
        req["arguments"] = arguments
    return json.loads(api_call(path, req, timeout=timeout))


def info(path: str) -> dict:
    return api(path, "get_info")["return"]


def iface_state(ns: harness.Namespace, dev: str = "tap0") -> dict:
    """What the namespace sees of the interface (nothing of it may change
    across forwarder restarts)."""
    link = ns.link(dev)
    addrs = sorted((a["family"], a["local"], a["prefixlen"]) for a in link.get("addr_info", []))
    return {
        "ifindex": link["ifindex"], "mac": link["address"], "mtu": link["mtu"],
        "flags": sorted(link["flags"]), "operstate": link["operstate"], "addrs": addrs,
        "routes4": ns.ip_json("-4", "route", "show"),
        "routes6": ns.ip_json("-6", "route", "show"),
    }


def wait_exit_exact(proc: subprocess.Popen, timeout: float) -> float:
    """Wait for a child through a pidfd (no polling); return when it exited
    (monotonic) and reap it."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        r, _, _ = select.select([pidfd], [], [], timeout)
        t = time.monotonic()
    finally:
        os.close(pidfd)
    if not r:
        raise HarnessError(f"pid {proc.pid} still running after {timeout}s")
    proc.wait(timeout=5)
    return t


def children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def assert_gone(pids: list[int]) -> None:
    """Every pid is gone: not running, not a zombie (reaped by its parent)."""
    for pid in pids:
        try:
            st = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            continue
        raise AssertionError(f"pid {pid} still exists ({st})")


def json_log(fwd: harness.Forwarder) -> list[dict]:
    lines = [ln for ln in fwd.log().splitlines() if ln.strip()]
    out = []
    for ln in lines:
        out.append(json.loads(ln))  # every line of --log-format=json is JSON
    return out


def report(name: str, values_ms: list[float]) -> str:
    line = (f"{name}: n={len(values_ms)} median={statistics.median(values_ms):.1f} ms "
            f"max={max(values_ms):.1f} ms min={min(values_ms):.1f} ms "
            f"all={[round(v, 1) for v in values_ms]}")
    print(f"\n[supervisor] {line}")
    return line


# --------------------------------------------------------------------------
# Forwarder restarts
# --------------------------------------------------------------------------

KILLS = 20


def test_forwarder_kill9_20_times(connect, client_loop, ns_echo, user):
    net = connect("--max-restarts", KILLS + 5, "--log-format=json")
    loop = client_loop(net.ns)
    guest_port = ns_echo(net.ns)
    ports = free_ports(3)
    for p in ports:
        assert json.loads(add_hostfwd(net.api, "tcp", p, guest_port)).get("return"), p
    assert api(net.api, "remove_hostfwd", id=2) == {"return": {}}
    forwards = api(net.api, "list_hostfwd")["entries"]
    assert [e["id"] for e in forwards] == [1, 3]
    live_ports = [ports[0], ports[2]]
    for p in live_ports:
        wait_until(lambda: host_echo(p), 10, what=f"echo through forward {p}")
    before = iface_state(net.ns)
    sup = psutil.Process(net.fwd.pid)

    host_ms, ns_ms, own_ms, dead = [], [], [], []
    for i in range(KILLS):
        # Let it be a forwarder that has run fine (not a crash loop: no back-off).
        wait_until(lambda: (info(net.api).get("forwarder_uptime_s") or 0) >= 1.1, 10,
                   interval=0.05, what="forwarder up for 1.1 s")
        old = info(net.api)["forwarder_pid"]
        assert [c.pid for c in sup.children()] == [old]
        assert psutil.Process(old).name() == "nsnet-forwarder"
        t_kill = time.monotonic()
        os.kill(old, signal.SIGKILL)
        dead.append(old)
        # host -> ns through the re-added forward: the first new connection that works
        deadline = t_kill + 10
        while not host_echo(live_ports[i % 2], timeout=1.0):
            assert time.monotonic() < deadline, f"kill {i}: forward {live_ports[i % 2]} dead"
            time.sleep(0.001)
        host_ms.append((time.monotonic() - t_kill) * 1000)
        # ns -> host: the in-namespace client loop's first success after the kill
        r = loop.first_ok_after(t_kill)
        ns_ms.append((r["t1"] - t_kill) * 1000)
        now = info(net.api)
        assert now["forwarder_pid"] not in (None, old)
        assert now["restarts"] == i + 1
        own_ms.append(now["restart_latency_ms"]["last"])
        assert api(net.api, "list_hostfwd")["entries"] == forwards
        assert all(host_echo(p) for p in live_ports)
        assert not host_echo(ports[1], timeout=0.5)  # the removed one stays removed
    assert iface_state(net.ns) == before
    assert net.fwd.alive()
    assert_gone(dead)
    # The supervisor logged each restart with its own measurement.
    logged = [e for e in json_log(net.fwd) if e.get("event") == "forwarder_restarted"]
    assert [e["restarts"] for e in logged] == list(range(1, KILLS + 1))
    assert {(e["forwards"], e["forwards_failed"]) for e in logged} == {(2, 0)}
    assert [round(e["restart_ms"], 3) for e in logged] == own_ms
    assert info(net.api)["restart_latency_ms"]["max"] == max(own_ms)
    report(f"{user.name} kill->first host->ns connection via hostfwd", host_ms)
    report(f"{user.name} kill->first ns->host connection (in-ns loop)", ns_ms)
    report(f"{user.name} supervisor's own restart latency (death seen -> new forwarder ready)",
           own_ms)


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_forward_taken_during_restart(connect, ns_echo):
    """A forward whose host port another process took while no forwarder
    ran cannot be re-added: a warning, the others work, the table keeps it
    (so remove_hostfwd still works), and the network stays up."""
    net = connect("--log-format=json")
    guest_port = ns_echo(net.ns)
    ports = free_ports(2)
    for p in ports:
        add_hostfwd(net.api, "tcp", p, guest_port)
    old = info(net.api)["forwarder_pid"]
    os.kill(net.fwd.pid, signal.SIGSTOP)  # hold the restart back
    try:
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(old)
                   or psutil.Process(old).status() == psutil.STATUS_ZOMBIE, 10,
                   what="forwarder dead")
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", ports[0]))
        squatter.listen(1)
    finally:
        os.kill(net.fwd.pid, signal.SIGCONT)
    with squatter:
        wait_until(lambda: info(net.api)["restarts"] == 1, 10, what="restart")
        logged = [e for e in json_log(net.fwd) if e.get("event") == "forwarder_restarted"]
        assert [(e["forwards"], e["forwards_failed"]) for e in logged] == [(2, 1)]
        assert any("port forward 1 " in e["msg"] and "could not be re-added" in e["msg"]
                   for e in json_log(net.fwd))
        assert [e["id"] for e in api(net.api, "list_hostfwd")["entries"]] == [1, 2]
        assert info(net.api)["inactive_forwards"] == [1]
        wait_until(lambda: host_echo(ports[1]), 10, what="the other forward")
    # The port is free again: remove the dead entry, add it anew (id 3).
    assert api(net.api, "remove_hostfwd", id=1) == {"return": {}}
    assert info(net.api)["inactive_forwards"] == []
    assert json.loads(add_hostfwd(net.api, "tcp", ports[0], guest_port)) == {"return": {"id": 3}}
    wait_until(lambda: host_echo(ports[0]), 10, what="the re-added forward")
    assert [e["id"] for e in api(net.api, "list_hostfwd")["entries"]] == [2, 3]
    assert net.fwd.alive()


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_hung_forwarder_is_replaced(connect, client_loop, ns_echo):
    """A forwarder that stops answering its control socket (SIGSTOP) is
    killed when a request times out, and replaced."""
    net = connect()
    loop = client_loop(net.ns)
    port = free_port()
    add_hostfwd(net.api, "tcp", port, ns_echo(net.ns))
    hung = info(net.api)["forwarder_pid"]
    os.kill(hung, signal.SIGSTOP)
    reply = api(net.api, "get_stats", timeout=30)
    assert reply == {"error": {"desc": "bad request: get_stats: forwarder: did not answer"}}
    wait_until(lambda: info(net.api)["restarts"] == 1, 10, what="restart")
    assert api(net.api, "get_stats")["return"]["forwarder_pid"] not in (None, hung)
    assert_gone([hung])
    wait_until(lambda: host_echo(port), 10, what="forward after the restart")
    loop.first_ok_after(time.monotonic())
    assert "did not answer within 5 s; killing it" in net.fwd.log()
    assert "hung (no answer)" in net.fwd.log()


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_forwarder_that_fails_at_every_start_gives_up(attach, ns, client_loop, wrapped,
                                                      workdir):
    fault = os.path.join(workdir, "fault")
    net = attach(wrapped(NSNET_FAULT_FORWARDER_START=fault), ns,
                 "--max-restarts", 3, "--restart-window", 60)
    client_loop(net.ns)  # traffic flows before the event
    first = info(net.api)["forwarder_pid"]
    open(fault, "w").close()  # from now on every forwarder start fails
    os.kill(first, signal.SIGKILL)
    assert net.fwd.wait_exit(30) == 1
    log = net.fwd.log()
    assert "forwarder failed 4 times within 60 s (--max-restarts=3); giving up" in log, log
    assert "injected start failure (NSNET_FAULT_FORWARDER_START)" in log, log
    assert log.count("failed to start") >= 3, log
    assert "restarting in" in log, log  # backed off
    assert not os.path.exists(net.api)


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_forwarder_cannot_be_forked_gives_up(connect, client_loop, user):
    """A real failure caused from outside: RLIMIT_NPROC of 1 set on the
    supervisor by its own user (who already runs more processes), so fork()
    fails with EAGAIN at every restart."""
    net = connect("--max-restarts", 2)
    client_loop(net.ns)  # traffic flows before the event
    first = info(net.api)["forwarder_pid"]
    user.run(["prlimit", f"--pid={net.fwd.pid}", "--nproc=1:1"], check=True)
    os.kill(first, signal.SIGKILL)
    assert net.fwd.wait_exit(30) == 1
    log = net.fwd.log()
    assert "forwarder failed 3 times within 60 s (--max-restarts=2); giving up; last failure: " \
        "cannot start a forwarder: Resource temporarily unavailable" in log, log
    assert not os.path.exists(net.api)
    assert_gone([first])


# --------------------------------------------------------------------------
# Teardown paths
# --------------------------------------------------------------------------

def test_target_exit_tears_down(connect, client_loop, user):
    net = connect("--log-format=json")
    client_loop(net.ns)  # traffic flows before the event
    kids = [c.pid for c in children(net.fwd.pid)]
    assert len(kids) == 1
    t_kill = time.monotonic()
    os.kill(net.ns.pid, signal.SIGKILL)
    t_exit = wait_exit_exact(net.fwd.proc, 15)
    assert net.fwd.proc.returncode == 0
    assert_gone(kids + [net.fwd.pid])
    assert not os.path.exists(net.api)
    entries = json_log(net.fwd)
    exits = [e for e in entries if e.get("event") == "exit"]
    assert len(exits) == 1, entries
    assert exits[0]["exit_code"] == 0
    assert exits[0]["reason"] == f"target PID {net.ns.pid} exited"
    report(f"{user.name} target kill -> supervisor exit", [(t_exit - t_kill) * 1000])
    report(f"{user.name} supervisor's own teardown", [exits[0]["teardown_ms"]])


def test_ignore_target_exit_keeps_running(connect, ns_echo, make_ns):
    net = connect("--ignore-target-exit")
    port = free_port()
    guest_port = ns_echo(net.ns)
    add_hostfwd(net.api, "tcp", port, guest_port)
    assert info(net.api)["target"]["exit_with_target"] is False
    os.kill(net.ns.pid, signal.SIGKILL)
    net.ns.proc.wait(10)
    # The namespace lives on (the TAP fd pins it), with the echo server in it.
    assert host_echo(port)
    assert net.fwd.alive()
    os.kill(net.fwd.pid, signal.SIGTERM)
    assert net.fwd.wait_exit(15) == 0
    assert not os.path.exists(net.api)


def test_exit_fd_closed(connect, client_loop, user):
    net = connect(exit_fd=True)
    client_loop(net.ns)  # traffic flows before the event
    kids = [c.pid for c in children(net.fwd.pid)]
    net.fwd.close_exit_fd()
    assert net.fwd.wait_exit(15) == 0
    assert_gone(kids)
    assert not os.path.exists(net.api)
    assert "exiting: exit-fd closed (exit 0)" in net.fwd.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_termination_signal(connect, client_loop, user, sig, workdir):
    pidfile = os.path.join(workdir, "nsnet.pid")
    net = connect("--pidfile", pidfile)
    client_loop(net.ns)  # traffic flows before the event
    with open(pidfile) as f:
        assert f.read() == f"{net.fwd.pid}\n"
    kids = [c.pid for c in children(net.fwd.pid)]
    os.kill(net.fwd.pid, sig)
    assert net.fwd.wait_exit(15) == 0
    assert_gone(kids)
    assert not os.path.exists(net.api)
    assert not os.path.exists(pidfile)
    log = net.fwd.log()
    assert f"exiting: received {sig.name} (exit 0)" in log, log


def test_tap_deleted_in_namespace(connect, client_loop, user):
    net = connect()
    client_loop(net.ns)  # traffic flows before the event
    kids = [c.pid for c in children(net.fwd.pid)]
    net.ns.run(["ip", "link", "del", "tap0"])
    assert net.fwd.wait_exit(15) == 1
    assert_gone(kids)
    assert not os.path.exists(net.api)
    log = net.fwd.log()
    assert "TAP tap0 failed (" in log and "the interface is gone from the namespace" in log, log
    assert "restarting" not in log, log  # no restart loop, no busy loop


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_supervisor_kill9_takes_children(connect, client_loop, user, start_fwd, stopped):
    """kill -9 of the supervisor: the forwarder goes too.  A running one
    sees its control socket close and exits at once, or gets PDEATHSIG's
    SIGKILL; a stopped one (SIGSTOP: it cannot notice anything) shows that
    PR_SET_PDEATHSIG alone does it."""
    net = connect()
    loop = client_loop(net.ns)
    fpid = info(net.api)["forwarder_pid"]
    fpidfd = os.pidfd_open(fpid)
    try:
        if stopped:
            os.kill(fpid, signal.SIGSTOP)
            wait_until(lambda: psutil.Process(fpid).status() == psutil.STATUS_STOPPED, 10,
                       what="forwarder stopped")
        os.kill(net.fwd.pid, signal.SIGKILL)
        net.fwd.wait_exit(10)
        # Re-parented to us (the test's subreaper): we reap it and see how it died.
        r, _, _ = select.select([fpidfd], [], [], 10)
        assert r, "forwarder outlived the supervisor"
    finally:
        os.close(fpidfd)
    _, status = os.waitpid(fpid, 0)
    if stopped:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    else:
        assert os.waitstatus_to_exitcode(status) in (0, -signal.SIGKILL), status
    # The socket file stays behind (nothing runs after SIGKILL); the next
    # nsnet on the same path takes it over (the TAP went with the last fd).
    assert os.path.exists(net.api)
    again = start_fwd(net.impl, ["--configure", "--api-socket", net.api, net.ns.pid, "tap0"])
    assert info(net.api)["supervisor_pid"] == again.pid
    # ... and carries the namespace's traffic (a connection begun after it was ready)
    loop.first_ok_after(time.monotonic(), timeout=15)


# --------------------------------------------------------------------------
# Service managers, observability
# --------------------------------------------------------------------------

class FakeSystemd:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str, user: harness.User):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chown(path, user.uid, user.gid)
        self.messages: list[str] = []

    def recv_until(self, pred, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        for m in self.messages:
            if pred(m):
                return m
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"no matching sd_notify message; got {self.messages}")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                m = self.sock.recv(4096).decode()
                self.messages.append(m)
                if pred(m):
                    return m

    def close(self):
        self.sock.close()


def test_sd_notify(attach, ns, client_loop, wrapped, workdir, user):
    systemd = FakeSystemd(os.path.join(workdir, "notify.sock"), user)
    try:
        net = attach(wrapped(NOTIFY_SOCKET=systemd.path, WATCHDOG_USEC=200000), ns)
        ready = systemd.recv_until(lambda m: "READY=1" in m)
        assert f"MAINPID={net.fwd.pid}" in ready.split("\n")
        loop = client_loop(net.ns)
        for _ in range(3):  # pings at half of WATCHDOG_USEC
            n = sum(m == "WATCHDOG=1" for m in systemd.messages)
            systemd.recv_until(lambda m: m == "WATCHDOG=1"
                               and sum(x == "WATCHDOG=1" for x in systemd.messages) > n)
        fpid = info(net.api)["forwarder_pid"]
        os.kill(fpid, signal.SIGKILL)
        status = systemd.recv_until(lambda m: m.startswith("STATUS=") and "restarted" in m)
        assert "1 restarts" in status
        loop.first_ok_after(time.monotonic())
        os.kill(net.fwd.pid, signal.SIGTERM)
        assert net.fwd.wait_exit(15) == 0
        stopping = systemd.recv_until(lambda m: "STOPPING=1" in m)
        assert "received SIGTERM" in stopping
    finally:
        systemd.close()


def test_get_info_and_stats(connect, client_loop, ns_echo):
    net = connect("--mtu", 4000)
    client_loop(net.ns)  # traffic flows before the event
    i = info(net.api)
    assert i["supervisor_pid"] == net.fwd.pid
    assert i["forwarder_pid"] in [c.pid for c in children(net.fwd.pid)]
    assert i["forwarder_state"] == "running"
    assert i["target"]["pid"] == net.ns.pid and i["target"]["exit_with_target"] is True
    link = net.ns.link("tap0")
    assert i["tap"] == {"name": "tap0", "ifindex": link["ifindex"], "mac": link["address"]}
    assert (i["mtu"], i["cidr"], i["guest"], i["gateway"]) == (4000, "10.0.2.0/24",
                                                                "10.0.2.100", "10.0.2.2")
    assert i["restarts"] == 0 and i["restart_latency_ms"]["last"] is None
    assert i["uptime_s"] > 0 and isinstance(i["version"], str)

    port = free_port()
    guest_port = ns_echo(net.ns)
    add_hostfwd(net.api, "tcp", port, guest_port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
        held.sendall(b"ping")
        assert held.recv(4) == b"ping"
        s = api(net.api, "get_stats")["return"]
        assert s["rx_frames"] > 0 and s["tx_frames"] > 0
        assert s["rx_bytes"] > s["rx_frames"] * 40 and s["tx_bytes"] > s["tx_frames"] * 40
        # nothing invalid was sent; every counter is a count
        assert s["rx_dropped_invalid"] == 0 and s["tx_dropped"] == 0, s
        assert isinstance(s["rx_dropped_ignored"], int)
        assert s["active_connections"] >= 1
        assert "fastpath" not in s  # only once a splice forward was added
        states = {(c["proto"], c["state"]) for c in s["connections"]}
        assert ("tcp", "HOST_FORWARD") in states, s["connections"]
        assert {"proto": "tcp", "state": "ESTABLISHED", "src": "127.0.0.1",
                "sport": port, "dst": "10.0.2.100", "dport": guest_port} \
            in [{k: c[k] for k in ("proto", "state", "src", "sport", "dst", "dport")}
                for c in s["connections"]], s["connections"]
    # unknown commands keep slirp4netns's error
    assert api_call(net.api, {"execute": "get_infos"}) == \
        b'{"error":{"desc":"bad request: unknown execute"}}'


def task_ids(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of pid (psutil counts the
    main thread's only)."""
    total = 0
    for tid in task_ids(pid):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_idle_supervisor_does_not_poll(connect):
    """No polling sleeps: an idle supervisor (no traffic, no watchdog)
    does not wake up at all."""
    net = connect()
    info(net.api)  # settle: the API client is closed
    # Wait until every thread of the supervisor sleeps (the API client is gone).
    wait_until(lambda: all(t.status() == psutil.STATUS_SLEEPING
                           for t in map(psutil.Process, task_ids(net.fwd.pid))), 5,
               what="supervisor asleep")
    before = wakeups(net.fwd.pid)
    time.sleep(4.0)  # a 1 s poll timeout would show 4 wake-ups; HEAD shows 0
    after = wakeups(net.fwd.pid)
    assert after - before == 0, (before, after)
