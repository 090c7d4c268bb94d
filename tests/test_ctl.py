"""`nsnet ctl` and `nsnet ps`: the instance registry ($XDG_RUNTIME_DIR/nsnet),
--name, tables and --json, clear errors; as root and unprivileged."""
import json
import os
import signal
import socket
import subprocess

import pytest

import harness
from harness import free_port, kill_and_reap, tcp_send, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def xdg(user, workdir):
    d = os.path.join(workdir, "xdg")
    os.mkdir(d, 0o700)
    os.chown(d, user.uid, user.gid)
    return d


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        kill_and_reap(p)


def nsnet(user, xdg, *args, timeout=30, cwd="/"):
    return user.run([harness.nsnet_bin(), *[str(a) for a in args]], timeout=timeout, text=True,
                    env=user.env(XDG_RUNTIME_DIR=xdg), cwd=cwd)


def start(user, xdg, procs, *args):
    """nsnet ARGS in the background; returns once it is listed by nsnet ps."""
    r, w = os.pipe()
    p = user.popen([harness.nsnet_bin(), f"--ready-fd={w}", *[str(a) for a in args]],
                   env=user.env(XDG_RUNTIME_DIR=xdg), pass_fds=[w],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    procs.append(p)
    with os.fdopen(r, "rb") as f:
        assert f.read(1) == b"1", p.stderr.read() if p.poll() is not None else "not ready"
    wait_until(lambda: any(e["pid"] == p.pid for e in ps_json(user, xdg)), 10, what="ps entry")
    return p


def ps_json(user, xdg):
    cp = nsnet(user, xdg, "ps", "--json")
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_named_instance_ps_and_ctl(user, ns, xdg, procs):
    p = start(user, xdg, procs, "--name", "web", "-c", ns.pid, "tap0")
    [e] = ps_json(user, xdg)
    sock = os.path.join(xdg, "nsnet", "web.sock")
    assert (e["name"], e["pid"], e["kind"], e["target"], e["tap"], e["api_socket"],
            e["forwards"]) == ("web", p.pid, "attach", f"pid {ns.pid}", "tap0", sock, 0)
    cp = nsnet(user, xdg, "ps")
    assert cp.stdout.splitlines()[0].split() == ["NAME", "PID", "KIND", "TARGET", "TAP", "API",
                                                 "SOCKET", "FORWARDS", "UPTIME"]
    assert cp.stdout.splitlines()[1].split()[:2] == ["web", str(p.pid)]

    port = free_port()
    cp = nsnet(user, xdg, "ctl", "--instance", "web", "add-forward", f"127.0.0.1:{port}:8080")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"forward 1: 127.0.0.1:{port}/tcp -> guest port 8080\n"
    srv = ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
    assert tcp_send("127.0.0.1", port, b"through ctl") == b"through ctl"
    srv.result()
    # the only instance: no --instance needed; --json before or after the command
    cp = nsnet(user, xdg, "ctl", "list-forwards")
    assert cp.stdout.split() == ["ID", "PROTO", "HOST", "GUEST", "MODE", "1", "tcp",
                                 f"127.0.0.1:{port}", "10.0.2.100:8080", "slirp"]
    for args in (["--json", "list-forwards"], ["list-forwards", "--json"]):
        cp = nsnet(user, xdg, "ctl", "--socket", sock, *args)
        assert json.loads(cp.stdout)["entries"][0]["host_port"] == port
    assert ps_json(user, xdg)[0]["forwards"] == 1
    cp = nsnet(user, xdg, "ctl", "info")
    assert f"supervisor_pid      {p.pid}" in " ".join(cp.stdout.split("\n")) or \
        any(ln.split() == ["supervisor_pid", str(p.pid)] for ln in cp.stdout.splitlines())
    cp = nsnet(user, xdg, "ctl", "stats", "--json")
    assert "return" in json.loads(cp.stdout)
    cp = nsnet(user, xdg, "ctl", "remove-forward", "1")
    assert cp.stdout == "forward 1 removed\n"
    cp = nsnet(user, xdg, "ctl", "remove-forward", "1")
    assert cp.returncode == 1 and "bad arguments.id" in cp.stderr

    # a second instance may not take the name
    cp = nsnet(user, xdg, "--name", "web", "-c", ns.pid, "tap1")
    assert cp.returncode == 1 and f"in use by nsnet pid {p.pid}" in cp.stderr

    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert ps_json(user, xdg) == []
    assert os.listdir(os.path.join(xdg, "nsnet")) == []  # entry and socket removed
    cp = nsnet(user, xdg, "ctl", "--instance", "web", "info")
    assert cp.returncode == 1 and "no running instance named 'web'" in cp.stderr


def test_run_instance_listed(user, xdg, procs):
    p = user.popen([harness.nsnet_bin(), "run", "--name", "job", "--", "sleep", "60"],
                   env=user.env(XDG_RUNTIME_DIR=xdg), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    procs.append(p)
    wait_until(lambda: ps_json(user, xdg), 20, what="nsnet run in ps")
    [e] = ps_json(user, xdg)
    assert (e["name"], e["pid"], e["kind"], e["command"]) == ("job", p.pid, "run",
                                                             ["sleep", "60"])
    cp = nsnet(user, xdg, "ctl", "-i", "job", "info", "--json")
    assert json.loads(cp.stdout)["return"]["tap"]["name"] == "tap0"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 128 + signal.SIGTERM
    assert ps_json(user, xdg) == []


def test_stale_entry_ignored(user, ns, xdg, procs):
    p = start(user, xdg, procs, "--name", "gone", "-c", ns.pid, "tap0")
    p.kill()  # no chance to remove its entry
    p.wait(timeout=10)
    assert ps_json(user, xdg) == []
    assert [f for f in os.listdir(os.path.join(xdg, "nsnet")) if f.endswith(".json")] == []
    p = start(user, xdg, procs, "--name", "gone", "-c", ns.pid, "tap0")  # name is free again
    assert ps_json(user, xdg)[0]["pid"] == p.pid


def test_ctl_errors(user, xdg, workdir):
    cp = nsnet(user, xdg, "ctl", "info")
    assert cp.returncode == 2 and "no running nsnet with an API socket" in cp.stderr
    missing = os.path.join(workdir, "nothing.sock")
    cp = nsnet(user, xdg, "ctl", "--socket", missing, "info")
    assert cp.returncode == 1
    assert f"cannot reach the API socket {missing}: No such file or directory (ENOENT)" in \
        cp.stderr
    dead = os.path.join(workdir, "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(dead)
    s.close()  # bound, never listened: ECONNREFUSED
    os.chown(dead, user.uid, user.gid)
    cp = nsnet(user, xdg, "ctl", "--socket", dead, "list-forwards")
    assert cp.returncode == 1 and "ECONNREFUSED" in cp.stderr and "has exited" in cp.stderr
    for args, msg in ((["bogus"], "unknown command"), (["remove-forward", "x"], "is a number"),
                      (["add-forward", "80:70000"], "bad port spec")):
        cp = nsnet(user, xdg, "ctl", "--socket", dead, *args)
        assert cp.returncode == 2 and msg in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr


def test_ctl_capture(user, ns, xdg, procs, workdir, host_server):
    """start-capture PATH [--max-bytes N] and stop-capture: a relative PATH
    is ctl's (the supervisor gets it absolute), readable lines and --json,
    errors with the errno; only what happens in between is captured."""
    from test_pcap import GW, read_pcap, syns_to

    start(user, xdg, procs, "--name", "cap", "-c", ns.pid, "tap0")
    before, during, after = host_server("sink"), host_server("sink"), host_server("sink")
    assert ns.client("connect", GW, before.port)["ok"] is True
    cwd = user.make_dir(workdir, "cwd.")
    path = os.path.join(cwd, "live.pcap")
    cp = nsnet(user, xdg, "ctl", "start-capture", "live.pcap", "--max-bytes", "1000000", cwd=cwd)
    assert (cp.returncode, cp.stdout) == (0, f"capturing to {path} (at most 1000000 bytes)\n"), \
        cp.stderr
    cp = nsnet(user, xdg, "ctl", "info")
    assert any(ln.split() == ["capture", path] for ln in cp.stdout.splitlines()), cp.stdout
    # one capture at a time
    cp = nsnet(user, xdg, "ctl", "start-capture", os.path.join(cwd, "second.pcap"))
    assert cp.returncode == 1 and f"a capture to {path} is running" in cp.stderr, cp.stderr
    assert not os.path.exists(os.path.join(cwd, "second.pcap"))
    assert ns.client("connect", GW, during.port)["ok"] is True
    cp = nsnet(user, xdg, "ctl", "stop-capture")
    assert (cp.returncode, cp.stdout) == (0, f"capture stopped: {path}\n"), cp.stderr
    assert ns.client("connect", GW, after.port)["ok"] is True
    _lt, frames, rest = read_pcap(path)
    assert rest == 0 and syns_to(frames, during.port), frames
    assert not syns_to(frames, before.port) and not syns_to(frames, after.port)
    # errors: none running, a path nsnet cannot open, bad usage; --json
    cp = nsnet(user, xdg, "ctl", "stop-capture")
    assert cp.returncode == 1 and "no capture is running" in cp.stderr, cp.stderr
    bad = "/proc/nsnet-no-such-dir/x.pcap"
    cp = nsnet(user, xdg, "ctl", "start-capture", bad)
    assert cp.returncode == 1 and bad in cp.stderr and "ENOENT" in cp.stderr, cp.stderr
    for args, msg in ((["start-capture"], "takes one PATH"),
                      (["start-capture", "x.pcap", "--max-bytes=-1"], "non-negative integer"),
                      (["start-capture", "x.pcap", "--max-bytes"], "needs a number"),
                      (["stop-capture", "x"], "takes no arguments")):
        cp = nsnet(user, xdg, "ctl", *args, cwd=cwd)
        assert cp.returncode == 2 and msg in cp.stderr, (args, cp.stderr)
        assert "Traceback" not in cp.stderr
    assert not os.path.exists(os.path.join(cwd, "x.pcap"))
    cp = nsnet(user, xdg, "ctl", "--json", "start-capture", "j.pcap", "--max-bytes=0", cwd=cwd)
    assert json.loads(cp.stdout) == {"return": {}}, cp.stderr
    cp = nsnet(user, xdg, "ctl", "stop-capture", "--json")
    assert json.loads(cp.stdout) == {"return": {}}, cp.stderr
    assert read_pcap(os.path.join(cwd, "j.pcap"))[0] == 1


def test_ctl_policy(user, ns, xdg, procs, workdir, host_server):
    """policy (get_policy as a table) and set-policy (built as the command
    line builds it: FILE's rules, then --allow/--deny, --egress), enforced
    at once; bad rules are refused before anything is sent."""
    from test_pcap import GW

    start(user, xdg, procs, "--name", "pol", "-c", ns.pid, "tap0")
    ok, other = host_server("sink"), host_server("sink")
    cp = nsnet(user, xdg, "ctl", "policy")
    assert (cp.returncode, cp.stdout) == (0, "egress allow (what no rule matches gets)\n"), \
        cp.stderr
    assert ns.client("connect", GW, other.port)["ok"] is True
    cp = nsnet(user, xdg, "ctl", "set-policy", "--egress", "deny",
               f"--allow=tcp:{GW}:{ok.port}")
    assert (cp.returncode, cp.stdout) == (0, "policy set: egress deny, 1 rule\n"), cp.stderr
    assert ns.client("connect", GW, ok.port)["ok"] is True
    assert "ConnectionRefused" in ns.client("connect", GW, other.port)["error"]
    cp = nsnet(user, xdg, "ctl", "policy")
    assert cp.stdout.splitlines() == ["egress deny (what no rule matches gets)",
                                      "#  ACTION  RULE",
                                      f"0  allow   tcp:{GW}:{ok.port}"], cp.stdout
    # FILE's rules first, then --deny; its default stays without --egress
    path = os.path.join(workdir, "policy.json")
    with open(path, "w") as f:
        json.dump({"egress": "allow", "rules": [{"action": "allow", "proto": "tcp",
                                                 "dest": GW, "ports": ok.port}]}, f)
    os.chmod(path, 0o644)
    cp = nsnet(user, xdg, "ctl", "set-policy", path, "--deny", f"tcp:{GW}",
               "--keep-established", "--json")
    assert json.loads(cp.stdout) == {"return": {}}, cp.stderr
    cp = nsnet(user, xdg, "ctl", "--json", "policy")
    assert json.loads(cp.stdout)["return"] == {
        "egress": "allow", "rules": [
            {"action": "allow", "proto": "tcp", "dest": GW, "ports": str(ok.port)},
            {"action": "deny", "proto": "tcp", "dest": GW}]}, cp.stdout
    assert ns.client("connect", GW, ok.port)["ok"] is True
    assert "ConnectionRefused" in ns.client("connect", GW, other.port)["error"]
    # refused before sending: the policy in force stays
    for args, msg in ((["set-policy"], "needs a FILE or --egress"),
                      (["set-policy", "--allow=tcp:10.0.2.1/24"], "host bits set"),
                      (["set-policy", "--egress=maybe"], "allow or deny"),
                      (["set-policy", "/nonexistent-policy.json"], "cannot read it"),
                      (["set-policy", "--bogus"], "unknown option"),
                      (["policy", "x"], "takes no arguments")):
        cp = nsnet(user, xdg, "ctl", *args)
        assert cp.returncode == 2 and msg in cp.stderr, (args, cp.stderr)
        assert "Traceback" not in cp.stderr
    assert json.loads(nsnet(user, xdg, "ctl", "--json", "policy").stdout)["return"][
        "rules"][1]["action"] == "deny"


def test_ctl_port_syntax(user, ns, xdg, procs):
    """Docker/Podman port syntax: kernel-chosen host port (printed and
    listed), ranges (all or nothing), /udp."""
    start(user, xdg, procs, "--name", "ports", "-c", ns.pid, "tap0")
    cp = nsnet(user, xdg, "ctl", "add-forward", "127.0.0.1::8080")
    assert cp.returncode == 0, cp.stderr
    port = int(cp.stdout.split("127.0.0.1:")[1].split("/")[0])
    assert cp.stdout == f"forward 1: 127.0.0.1:{port}/tcp -> guest port 8080\n" and port > 0
    listed = json.loads(nsnet(user, xdg, "ctl", "list-forwards", "--json").stdout)["entries"]
    assert [e["host_port"] for e in listed] == [port]
    srv = ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
    assert tcp_send("127.0.0.1", port, b"kernel's pick") == b"kernel's pick"
    srv.result()
    base = free_port()  # base+1 is very likely free too
    cp = nsnet(user, xdg, "ctl", "add-forward", f"127.0.0.1:{base}-{base + 1}:9000-9001/udp")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == [
        f"forward 2: 127.0.0.1:{base}/udp -> guest port 9000",
        f"forward 3: 127.0.0.1:{base + 1}/udp -> guest port 9001"]
    # a range whose second port is taken: nothing of it stays
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        cp = nsnet(user, xdg, "ctl", "add-forward", f"127.0.0.1:{taken - 1}-{taken}:80-81")
        assert cp.returncode == 1 and "already in use (EADDRINUSE)" in cp.stderr, cp.stderr
    listed = json.loads(nsnet(user, xdg, "ctl", "list-forwards", "--json").stdout)["entries"]
    assert [e["id"] for e in listed] == [1, 2, 3]


def test_run_publish_kernel_chosen_port(user):
    cp = user.run([harness.nsnet_bin(), "run", "-p", "127.0.0.1::8080", "-p", "9090/udp", "--",
                   "true"], timeout=60, text=True)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("nsnet run: published 127.0.0.1:")
    assert lines[0].endswith(" -> port 8080/tcp") and lines[1].endswith(" -> port 9090/udp")
    assert lines[1].startswith("nsnet run: published 0.0.0.0:")


def test_ctl_splice_forward(user, ns, xdg, procs):
    """add-forward --mode splice: nsnet's TCP fast path (to the namespace's
    address unless the spec names a guest address)."""
    start(user, xdg, procs, "--name", "fast", "-c", ns.pid, "tap0")
    port = free_port()
    cp = nsnet(user, xdg, "ctl", "add-forward", f"127.0.0.1:{port}:8080", "--mode", "splice")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"forward 1: 127.0.0.1:{port}/tcp -> guest port 8080 (splice)\n"
    cp = nsnet(user, xdg, "ctl", "list-forwards")
    assert cp.stdout.split()[5:] == ["1", "tcp", f"127.0.0.1:{port}", "10.0.2.100:8080",
                                     "splice"]
    srv = ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
    assert tcp_send("127.0.0.1", port, b"spliced") == b"spliced"
    srv.result()
    cp = nsnet(user, xdg, "ctl", "add-forward", "127.0.0.1::53/udp", "--mode=splice")
    assert cp.returncode == 1 and "splice is for tcp only" in cp.stderr
