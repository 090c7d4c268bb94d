"""Issue 11, finding 2, from the attacker's side: code inside the namespace
nsnet serves (the command of `nsnet run`, the root of an attached
namespace, a user namespace nested in it) must not steer nsnet through the
API socket, nor name or signal nsnet's processes.  The invoking user's own
processes outside keep using the API as before."""
import errno
import json
import os
import signal
import socket
import subprocess

import pytest

import harness
from harness import NS_PYTHON, api_call, free_port, kill_and_reap, read_line

pytestmark = pytest.mark.timeout(120)

# The attacker: run inside the namespace, with the user's uid (mapped) and
# the user's files.  argv: API socket, pidfile, a free host port.  It tries
# everything a hostile command would, then prints one JSON line.
ATTACKER = r"""
import errno, json, os, signal, socket, sys, time
api, pidfile, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def call(req):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(api)
        s.sendall(json.dumps(req).encode())
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return json.loads(out) if out else None
    except OSError as e:
        return {"oserror": e.errno}
    finally:
        s.close()

out = {}
out["list"] = call({"execute": "list_hostfwd"})
out["add"] = call({"execute": "add_hostfwd", "arguments": {
    "proto": "tcp", "host_addr": "0.0.0.0", "host_port": port, "guest_port": 22}})
out["remove"] = call({"execute": "remove_hostfwd", "arguments": {"id": 1}})
out["info"] = call({"execute": "get_info"})
# nsnet's processes, by name, as /proc shows them here
mine = []
for d in os.listdir("/proc"):
    if d.isdigit() and int(d) != os.getpid():
        try:
            with open(f"/proc/{d}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith("nsnet"):
            mine.append([int(d), comm])
out["visible"] = sorted(mine)
# the supervisor's PID, from the user's pidfile: can it be signalled?
sup = int(open(pidfile).read())
res = {}
for name, sig in (("probe", 0), ("stop", signal.SIGSTOP), ("cont", signal.SIGCONT)):
    try:
        os.kill(sup, sig)
        res[name] = 0
    except OSError as e:
        res[name] = e.errno
out["kill"] = res
# Under the fresh /proc lies the host's (it cannot be locked from here):
# unmount it, then try nsnet's processes by their host PIDs.
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
out["umount"] = libc.umount2(b"/proc", 2) == 0  # MNT_DETACH
reach = {}
for d in os.listdir("/proc"):
    if not d.isdigit() or int(d) == os.getpid():
        continue
    try:
        with open(f"/proc/{d}/comm") as f:
            comm = f.read().strip()
    except OSError:
        continue
    if not comm.startswith("nsnet") or comm == "nsnet-init":
        continue
    r = {}
    try:
        with open(f"/proc/{d}/environ", "rb") as f:
            f.read(1)
        r["environ"] = 0
    except OSError as e:
        r["environ"] = e.errno
    try:
        fd = os.open(f"/proc/{d}", os.O_RDONLY | os.O_DIRECTORY)
        try:
            signal.pidfd_send_signal(fd, 0)
            r["pidfd_signal"] = 0
        finally:
            os.close(fd)
    except OSError as e:
        r["pidfd_signal"] = e.errno
    reach[f"{d} {comm}"] = r
out["reach"] = reach
print(json.dumps(out), flush=True)
"""

REFUSED = "permission denied"


def refused(reply) -> bool:
    return isinstance(reply, dict) and REFUSED in reply.get("error", {}).get("desc", "")


def nothing_listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def no_children() -> bool:
    """Nothing was left behind (pytest is a subreaper: orphans come here)."""
    harness.reap_zombies()
    return not harness.child_pids()


def run_attacker(user, workdir, *flags):
    api = os.path.join(workdir, "run.sock")
    pidfile = os.path.join(workdir, "run.pid")
    port, published = free_port(), free_port()
    cp = user.run([harness.nsnet_bin(), "run", "-a", api, "--pidfile", pidfile,
                   "-p", f"127.0.0.1:{published}:80", *flags, "--",
                   NS_PYTHON, "-c", ATTACKER, api, pidfile, port], timeout=60, text=True)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    for what in ("list", "add", "remove", "info"):
        assert refused(out[what]), (what, out[what])
    assert nothing_listens(port)
    # Each refusal is logged with the client's PID.
    assert "refused client pid" in cp.stderr, cp.stderr
    harness.wait_until(no_children, 10, what="nsnet's processes gone")
    return out


def test_run_command_cannot_drive_nsnet(user, workdir):
    """`nsnet run -a SOCK -- CMD`: CMD connects to SOCK (0600, the user's)
    and signals the supervisor by PID (its pidfile): the API refuses it, and
    in its own PID namespace it sees none of nsnet's processes but its init,
    and cannot signal the supervisor.  Even with the host's /proc uncovered,
    nsnet's processes refuse it (/proc/PID/environ, pidfd_send_signal)."""
    out = run_attacker(user, workdir)
    assert out["visible"] == [[1, "nsnet-init"]], out["visible"]
    assert out["kill"]["probe"] == errno.ESRCH and out["kill"]["stop"] == errno.ESRCH, out
    # The supervisor and the waiter outside the PID namespace (the
    # processes inside the target's namespaces are issue 11's item 1).
    # (The host's other nsnet processes are listed too: none may answer.)
    assert len([p for p in out["reach"] if p.split()[1] == "nsnet"]) >= 2, out["reach"]
    for proc, r in out["reach"].items():
        assert r["environ"] != 0 and r["pidfd_signal"] != 0, (proc, r)


def test_run_share_pid_still_refused(user, workdir):
    """--share-pid keeps the caller's PID namespace (nsnet's processes are
    visible there, as before); the API still refuses the command."""
    out = run_attacker(user, workdir, "--share-pid")
    assert any(comm == "nsnet" for _, comm in out["visible"]), out["visible"]


def test_run_background_processes_end_with_command(user, workdir):
    """A background process of COMMAND does not outlive it (the PID
    namespace's init exits with COMMAND, and the kernel ends the rest); with
    --share-pid it does, as before."""
    cp = user.run([harness.nsnet_bin(), "run", "--", "sh", "-c", "sleep 60 & exit 4"],
                  timeout=60)
    assert cp.returncode == 4, cp.stderr
    harness.wait_until(no_children, 10, what="no process left")
    cp = user.run([harness.nsnet_bin(), "run", "--share-pid", "--", "sh", "-c",
                   "sleep 60 & exit 4"], timeout=60, capture_output=False,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert cp.returncode == 4, cp.stderr
    left = harness.wait_until(harness.child_pids, 10, what="the orphaned sleep")
    try:
        assert [harness.cmdline(p) for p in left] == [["sleep", "60"]]
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        harness.wait_until(no_children, 10, what="sleep reaped")


# Connects, forks, and exits at once: the forked child keeps the socket and
# sends the request when told to (a line on stdin), then prints the reply.
HANDOFF = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
if os.fork():
    os._exit(0)
sys.stdin.readline()
s.sendall(b'{"execute": "list_hostfwd"}')
s.shutdown(socket.SHUT_WR)
out = b""
while True:
    c = s.recv(65536)
    if not c:
        break
    out += c
print(out.decode(), flush=True)
"""


def test_client_that_exited_is_refused(user, ns, attach, nsnet_impl):
    """A race: the process that connected is gone when nsnet looks at it
    (its PID may name another process by then): refused, not guessed."""
    net = attach(nsnet_impl, ns)
    sup = net.fwd.proc.pid
    os.kill(sup, signal.SIGSTOP)  # the connection waits in the backlog
    try:
        p = user.popen([NS_PYTHON, "-c", HANDOFF, net.api], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert p.wait(timeout=30) == 0, p.stderr.read()
        finally:
            os.kill(sup, signal.SIGCONT)
        p.stdin.write(b"go\n")
        p.stdin.close()
        reply = json.loads(read_line(p.stdout, 30))
    finally:
        os.kill(sup, signal.SIGCONT)
        harness.wait_until(no_children_but(net), 10, what="the forked client gone")
    desc = reply["error"]["desc"]
    assert desc.startswith("permission denied: ") and "exited" in desc, reply
    assert "has exited" in net.fwd.log()
    # The user's clients that stay are served.
    assert json.loads(api_call(net.api, {"execute": "list_hostfwd"}))["entries"] == []


def no_children_but(net):
    def check():
        harness.reap_zombies()
        return set(harness.child_pids()) <= {net.fwd.proc.pid, net.ns.pid}
    return check


def _ns_client(ns, api, request) -> dict:
    """An API call made by ARGV inside the namespace ns (its root)."""
    script = ("import json, socket, sys\n"
              "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
              "s.sendall(sys.argv[2].encode()); s.shutdown(socket.SHUT_WR)\n"
              "out = b''\n"
              "while True:\n"
              "    c = s.recv(65536)\n"
              "    if not c: break\n"
              "    out += c\n"
              "print(out.decode())\n")
    return script, json.dumps(request)


def test_attached_namespace_root_refused(user, ns, attach, nsnet_impl):
    """Attach mode: the namespace's root (and a user namespace nested in
    it) is refused; a process of the same user outside is served."""
    net = attach(nsnet_impl, ns)
    port = free_port()
    add = {"execute": "add_hostfwd", "arguments": {
        "proto": "tcp", "host_addr": "0.0.0.0", "host_port": port, "guest_port": 22}}
    script, req = _ns_client(ns, net.api, add)
    cp = ns.run([NS_PYTHON, "-c", script, net.api, req], check=False, text=True)
    assert cp.returncode == 0, cp.stderr
    assert refused(json.loads(cp.stdout)), cp.stdout
    # A user namespace below the target's: refused too.
    cp = ns.run(["unshare", "--user", "--map-root-user", "--", NS_PYTHON, "-c", script,
                 net.api, req], check=False, text=True)
    assert cp.returncode == 0, cp.stderr
    assert refused(json.loads(cp.stdout)), cp.stdout
    assert nothing_listens(port)
    # The user, outside the namespace: served as before.
    cp = user.run([NS_PYTHON, "-c", script, net.api, json.dumps({"execute": "list_hostfwd"})],
                  check=True, text=True)
    assert json.loads(cp.stdout)["entries"] == []
    assert json.loads(api_call(net.api, {"execute": "list_hostfwd"}))["entries"] == []
    log = net.fwd.log()
    assert "refused client pid" in log, log
