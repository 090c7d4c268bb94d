"""Issue 11, item 1, from the attacker's side: the namespace's root (every
capability in the target's user namespace, CAP_SYS_PTRACE included) goes
after every nsnet process it can see while nsnet attaches to it, serves a
splice forward and answers get_info "interface": true; and the same from
inside `nsnet run -p ...`'s command.  tests/nsattack.py is the attacker.

Also, from the host: /proc/PID/maps of every namespace-side process (the
TAP helper, the interface helper, the connector) shows no libslirp or glib,
and the target's namespace files are held by no process but the
supervisor (never by the forwarder).
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
from harness import NS_PYTHON, api_call, free_port, kill_and_reap, read_line

pytestmark = pytest.mark.timeout(180)

HERE = Path(__file__).resolve().parent
# Processes that join the target's namespaces (their comm).
NS_SIDE = ("nsnet-nshelper", "nsnet-tap", "nsnet-iface", "nsnet-connect")
ATTACKS = ("root", "cwd", "fd", "environ", "mem", "maps", "ptrace", "getfd")

ECHO = r'''
import socket, sys, threading
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(16)
print("READY", flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


class HostWatch(threading.Thread):
    """From the host (root, outside every test namespace): every descendant
    of `root_pid`, polled every millisecond; for each, its comm, whether its
    maps ever showed libslirp or glib, and which namespace fds it held."""

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.seen: dict[int, dict] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for pid in harness.descendants(self.root_pid):
                self.look(pid)
            time.sleep(0.001)

    def look(self, pid: int) -> None:
        rec = self.seen.setdefault(pid, {"comm": set(), "libs": set(), "nsfds": set()})
        try:
            rec["comm"].add(Path(f"/proc/{pid}/comm").read_text().strip())
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return
        for lib in ("libslirp", "libglib"):
            if lib in maps:
                rec["libs"].add(lib)
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith(("net:[", "user:[")):
                    rec["nsfds"].add(link)
        except OSError:
            pass

    def stop(self) -> dict[int, dict]:
        self.halt.set()
        self.join(5)
        return self.seen


def ns_inodes(pid: int) -> set[str]:
    return {os.readlink(f"/proc/{pid}/ns/{k}") for k in ("net", "user")}


class Attacker:
    """tests/nsattack.py, running in the namespace (or as COMMAND)."""

    def __init__(self, workdir: str):
        self.out = os.path.join(workdir, "attack.json")
        self.stopfile = os.path.join(workdir, "attack.stop")
        for p in (self.out, self.stopfile):
            if os.path.exists(p):
                os.unlink(p)

    def argv(self) -> list[str]:
        return [NS_PYTHON, str(HERE / "nsattack.py"), self.out, self.stopfile, "90"]

    def finish(self, root_pid: int, timeout: float = 30) -> dict[int, dict]:
        """The attacker's report on root_pid (our nsnet) and its descendants
        (other nsnet processes on the machine are not this test's)."""
        Path(self.stopfile).touch()
        harness.wait_until(lambda: os.path.exists(self.out), timeout, what="attacker's report")
        report = {int(k): v for k, v in json.loads(Path(self.out).read_text()).items()}
        ours, grew = {root_pid}, True
        while grew:
            grew = False
            for pid, rec in report.items():
                if pid not in ours and rec.get("ppid") in ours:
                    ours.add(pid)
                    grew = True
        return {pid: rec for pid, rec in report.items() if pid in ours}


def broken(report: dict[int, dict]) -> list[str]:
    """Every (process, attack) that succeeded."""
    return [f"{rec['comm']}[{pid}]: {name}" for pid, rec in sorted(report.items())
            for name, res in rec["results"].items() if res == "ok"]


def show(report: dict[int, dict]) -> None:
    for pid, rec in sorted(report.items()):
        print(pid, rec["comm"], "ppid", rec.get("ppid"), "tries", rec["tries"],
              " ".join(f"{k}={v}" for k, v in rec["results"].items()))


def comms(report: dict[int, dict]) -> set[str]:
    return {rec["comm"] for rec in report.values()}


def check_host_view(seen: dict[int, dict], target_pid: int) -> None:
    mapped = {f"{sorted(r['comm'])}[{pid}]: {sorted(r['libs'])}" for pid, r in seen.items()
              if r["comm"] & set(NS_SIDE) and r["libs"]}
    assert not mapped, f"namespace-side processes with libslirp/glib mapped: {mapped}"
    want = ns_inodes(target_pid)
    holders = {f"{sorted(r['comm'])}[{pid}]" for pid, r in seen.items()
               if r["nsfds"] & want and r["comm"] & {"nsnet-forwarder", "nsnet-relay",
                                                       "nsnet-fwd", "nsnet-bypass"}}
    assert not holders, f"host-side children holding the target's namespace fds: {holders}"


def check_connector(root_pid: int) -> None:
    """From the host: the live connector is undumpable, has an empty root,
    no capability (bounding set included), NO_NEW_PRIVS, stdin/stdout on
    /dev/null, and besides stderr only sockets."""
    pids = [p for p in harness.descendants(root_pid)
            if Path(f"/proc/{p}/comm").read_text().strip() == "nsnet-connect"]
    assert len(pids) == 1, pids
    pid = pids[0]
    assert os.listdir(f"/proc/{pid}/root/") == []
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, (field, status[field])
    assert status["NoNewPrivs"].strip() == "1"
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert fds[0] == fds[1] == "/dev/null", fds
    others = {fd: link for fd, link in fds.items() if fd > 2 and not link.startswith("socket:")}
    assert not others, fds


def start_echo(ns, base_dir: str) -> subprocess.Popen:
    """An echo server on the namespace's port 8080 (every address)."""
    script = Path(base_dir) / "attack_echo.py"
    script.write_text(ECHO)
    script.chmod(0o644)
    server = ns.popen([NS_PYTHON, str(script), "0.0.0.0", 8080],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert read_line(server.stdout, 15).startswith(b"READY")
    return server


def add_splice(api: str) -> int:
    """A splice forward from a free host port to the guest's 8080."""
    port = free_port()
    reply = json.loads(api_call(api, {"execute": "add_hostfwd", "arguments": {
        "proto": "tcp", "host_addr": "127.0.0.1", "host_port": port,
        "guest_port": 8080, "mode": "splice"}}))
    assert "return" in reply, reply
    return port


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--enable-sandbox", "--enable-seccomp"]],
                         ids=["plain", "sandbox"])
def test_attach_namespace_root_cannot_take_over_nsnet(user, ns, workdir, start_fwd,
                                                      nsnet_impl, base_dir, flags):
    """Attach mode: the namespace's root watches /proc while nsnet starts
    (TAP helper; with --bypass-listener the netfacts helper too), serves a
    splice forward (connector) and answers get_info "interface" (interface
    helper), and attacks every nsnet process it sees: everything is
    refused."""
    att = Attacker(workdir)
    watcher = ns.popen(att.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = None
    host = None
    try:
        assert read_line(watcher.stdout, 15).startswith(b"READY")
        api = os.path.join(workdir, "nsnet.sock")
        fwd = start_fwd(nsnet_impl, [*flags, "--configure", "--api-socket", api,
                                     f"--bypass-listener={workdir}/oci.sock",
                                     ns.pid, "tap0"], wait=False)
        host = HostWatch(fwd.pid)
        host.start()
        fwd.wait_ready()
        server = start_echo(ns, base_dir)
        port = add_splice(api)
        assert harness.tcp_send("127.0.0.1", port, b"ping") == b"ping"
        for _ in range(2):
            info = json.loads(api_call(api, {"execute": "get_info",
                                              "arguments": {"interface": True}}, timeout=30))
            assert info["return"]["interface"]["ifname"] == "tap0", info
        time.sleep(0.3)  # the connector lives on: a few more turns at it
        check_connector(fwd.pid)
        report = att.finish(fwd.pid)
        seen = host.stop()
        assert harness.tcp_send("127.0.0.1", port, b"pong") == b"pong"
        # What the namespace's root can still do, kill the connector, is
        # harmless: the supervisor starts a new one.
        (conn,) = [p for p in harness.descendants(fwd.pid)
                   if Path(f"/proc/{p}/comm").read_text().strip() == "nsnet-connect"]
        ns.run(["kill", "-KILL", conn], check=False)
        def gone() -> bool:
            try:  # reaped (no /proc entry) or a zombie
                return Path(f"/proc/{conn}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except FileNotFoundError:
                return True
        harness.wait_until(gone, 10, what="the killed connector gone")

        def works() -> bool:
            try:
                return harness.tcp_send("127.0.0.1", port, b"again", timeout=5) == b"again"
            except OSError:
                return False

        harness.wait_until(works, 20, interval=0.2, what="the splice forward after a restart")
        assert fwd.alive()
    finally:
        if host is not None:
            host.stop()
        for p in (watcher, server):
            if p is not None:
                kill_and_reap(p)
                for f in (p.stdout, p.stderr):
                    f.close()
    show(report)
    # What the attacker could see: the connector and the interface helper
    # at least (the TAP helper lives a few milliseconds).
    assert "nsnet-connect" in comms(report), report
    assert comms(report) & {"nsnet-nshelper", "nsnet-iface"}, report
    assert not broken(report), f"the namespace's root got in: {broken(report)}"
    check_host_view(seen, ns.pid)


@pytest.mark.parametrize("flags", [[], ["--enable-sandbox", "--enable-seccomp"]],
                         ids=["plain", "sandbox"])
def test_run_command_cannot_take_over_nsnet(user, workdir, base_dir, flags):
    """`nsnet run --share-pid -p ... -- ATTACKER`: the command, root of its
    user namespace, sharing the PID namespace with nsnet (by default it has
    its own and sees none of nsnet's processes: tests/test_api_peer.py),
    attacks the connector and the interface helper (get_info "interface"
    asked from outside)."""
    att = Attacker(workdir)
    api = os.path.join(workdir, "run.sock")
    port = free_port()
    proc = user.popen([harness.nsnet_bin(), "run", *flags, "--share-pid", "--api-socket", api,
                       "-p", f"127.0.0.1:{port}:8080", "--", *att.argv()],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    host = HostWatch(proc.pid)
    host.start()
    try:
        line = read_line(proc.stdout, 30)
        assert line.startswith(b"READY"), (line, proc.stderr.read() if proc.poll() else "")
        assert harness.refused_through(port)  # nothing listens inside: the relay closes it
        info = json.loads(api_call(api, {"execute": "get_info",
                                          "arguments": {"interface": True}}, timeout=30))
        assert info["return"]["interface"]["ifname"] == "tap0", info
        time.sleep(0.3)
        check_connector(proc.pid)
        report = att.finish(proc.pid)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        seen = host.stop()
    finally:
        host.stop()
        kill_and_reap(proc)
        for f in (proc.stdout, proc.stderr):
            f.close()
    show(report)
    assert "nsnet-connect" in comms(report), report
    assert not broken(report), f"the command got in: {broken(report)}"
    mapped = {f"{sorted(r['comm'])}[{pid}]" for pid, r in seen.items()
              if r["comm"] & set(NS_SIDE) and r["libs"]}
    assert not mapped, f"namespace-side processes with libslirp/glib mapped: {mapped}"


def test_namespace_fds_kept_from_start(ns, workdir, start_fwd, nsnet_impl, base_dir):
    """The target's namespace files are opened once at start: once the
    target PID is gone (its PID free for reuse), later namespace-side
    children (get_info "interface", a splice forward's connector) still
    join the same namespaces, never through /proc/PID."""
    target = ns.popen(["sleep", "infinity"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    server = None
    try:
        harness.wait_until(lambda: Path(f"/proc/{target.pid}/comm").read_text().strip()
                           == "sleep" and ns_inodes(target.pid) == ns_inodes(ns.pid), 10,
                           what="the target in the namespace")
        api = os.path.join(workdir, "nsnet.sock")
        fwd = start_fwd(nsnet_impl, ["--configure", "--ignore-target-exit", "--api-socket", api,
                                     target.pid, "tap0"])
        kill_and_reap(target)
        assert not os.path.exists(f"/proc/{target.pid}/ns/net")
        info = json.loads(api_call(api, {"execute": "get_info",
                                          "arguments": {"interface": True}}, timeout=30))
        assert info["return"]["interface"].get("ifname") == "tap0", info
        server = start_echo(ns, base_dir)
        port = add_splice(api)
        assert harness.tcp_send("127.0.0.1", port, b"still") == b"still"
        assert fwd.alive()
    finally:
        kill_and_reap(target)
        if server is not None:
            kill_and_reap(server)
            for f in (server.stdout, server.stderr):
                f.close()


def test_run_command_cannot_take_over_its_init(user, workdir):
    """`nsnet run -- ATTACKER` in its own PID namespace (the default): the
    only nsnet process it can see is the init, PID 1, nsnet's code: every
    attack on it is refused."""
    att = Attacker(workdir)
    proc = user.popen([harness.nsnet_bin(), "run", "--", *att.argv()],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = read_line(proc.stdout, 30)
        assert line.startswith(b"READY"), (line, proc.stderr.read() if proc.poll() else "")
        time.sleep(0.3)
        Path(att.stopfile).touch()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        report = {int(k): v for k, v in json.loads(Path(att.out).read_text()).items()}
    finally:
        kill_and_reap(proc)
        for f in (proc.stdout, proc.stderr):
            f.close()
    show(report)
    assert comms(report) == {"nsnet-init"} and 1 in report, report
    assert not broken(report), f"the command got in: {broken(report)}"
