"""What a user sees: the start-up and ready lines (--quiet), --log-format=json
on every line, and each failure a user can cause told with what failed, the
real errno and what to do, never a traceback (issue 14)."""
import json
import os
import socket
import stat

import pytest

import harness
from harness import free_port, nsnet_only, unpriv_only

import nsnet

pytestmark = pytest.mark.timeout(120)

EXIT_SETUP = 125


def nsnet_cmd(user, args, timeout=60):
    return user.run([harness.nsnet_bin(), *[str(a) for a in args]], timeout=timeout, text=True)


def assert_clean_failure(cp, code, *words):
    assert cp.returncode == code, (cp.returncode, cp.stderr)
    assert "Traceback" not in cp.stderr and "internal error" not in cp.stderr, cp.stderr
    for w in words:
        assert w in cp.stderr, (w, cp.stderr)


# ---- start-up and ready lines ------------------------------------------------

@nsnet_only
def test_start_and_ready_lines(impl, ns, connect):
    net = connect("-e", "99")  # exit-fd not open: starts completely, then exits 0
    assert net.fwd.wait_exit(15) == 0
    log = net.fwd.log()
    assert "nsnet: starting: pid %d, tap0, MTU 1500, network 10.0.2.0/24" % ns.pid in log
    assert "127.0.0.1 on the host is reachable as 10.0.2.2" in log
    assert "nsnet: ready in " in log


@nsnet_only
def test_quiet_and_disable_host_loopback(impl, ns, connect):
    net = connect("-e", "99", "--quiet")
    assert net.fwd.wait_exit(15) == 0
    assert "starting" not in net.fwd.log() and "ready" not in net.fwd.log()
    net = connect("-e", "99", "--disable-host-loopback")
    assert net.fwd.wait_exit(15) == 0
    assert "starting" in net.fwd.log() and "reachable as" not in net.fwd.log()


@nsnet_only
def test_json_log_every_line(impl, ns, connect):
    net = connect("-e", "99", "--log-format=json")
    assert net.fwd.wait_exit(15) == 0
    events = [json.loads(ln)["event"] for ln in net.fwd.log().splitlines() if ln.strip()]
    assert events[:2] == ["start", "ready"] and events[-1] == "exit"


@nsnet_only
def test_debug_lines_for_forwards_and_requests(impl, ns, connect):
    """--log-level=debug: a line for each forward added, removed or failed
    (the errno in the failure), libslirp's and the fast path's alike, and
    one per API request."""
    from harness import api_call

    net = connect("--log-level=debug", "--log-format=json")
    ports = [free_port(), free_port()]

    def call(execute, **arguments):
        return json.loads(api_call(net.api, {"execute": execute, "arguments": arguments}))

    ids = [call("add_hostfwd", proto="tcp", host_addr="127.0.0.1", host_port=p, guest_port=80,
                mode=mode)["return"]["id"] for p, mode in zip(ports, ("slirp", "splice"))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        for mode in ("slirp", "splice"):
            assert "error" in call("add_hostfwd", proto="tcp", host_addr="127.0.0.1",
                                   host_port=taken, guest_port=81, mode=mode)
    for fid in ids:
        assert call("remove_hostfwd", id=fid) == {"return": {}}
    events = [json.loads(ln) for ln in net.fwd.log().splitlines() if ln.startswith("{")]

    def of(kind):
        return [e for e in events if e.get("event") == kind]

    assert [(e["level"], e["id"], e["host_port"], e.get("mode", "slirp"))
            for e in of("forward_added")] == [("debug", ids[0], ports[0], "slirp"),
                                              ("debug", ids[1], ports[1], "splice")]
    assert [(e["level"], e["id"]) for e in of("forward_removed")] == \
        [("debug", ids[0]), ("debug", ids[1])]
    failed = of("forward_failed")
    assert [(e["level"], e["host_port"], e.get("mode", "slirp")) for e in failed] == \
        [("warning", taken, "slirp"), ("warning", taken, "splice")], failed
    assert all("Address already in use (EADDRINUSE)" in e["error"] for e in failed), failed
    requests = [e["request"] for e in of("api_request")]
    assert sum('"add_hostfwd"' in r for r in requests) == 4, requests
    assert sum('"remove_hostfwd"' in r for r in requests) == 2, requests


@pytest.mark.parametrize("args", [
    ["--log-format=json", "--mtu=0", "1", "tap0"],
    ["--log-format", "json", "--netns-type=path", "/etc/passwd", "tap0"],
    ["run", "--log-format=json", "--mtu=0", "--", "true"],
    ["run", "--log-format=json", "--", "/nonexistent-nsnet-cmd"],
])
def test_json_errors(user, args):
    cp = nsnet_cmd(user, args)
    assert cp.returncode != 0
    lines = [json.loads(ln) for ln in cp.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1]["level"] == "error" and lines[-1]["msg"]


def test_run_exec_failure(user, workdir):
    """COMMAND found but not executable by the kernel (its #! names a
    missing interpreter): exit 127, the errno and a hint; a JSON line with
    --log-format=json (it was plain text, from the child)."""
    script = os.path.join(workdir, "bad-interp.sh")
    with open(script, "w") as f:
        f.write("#!/nonexistent-nsnet-interpreter\n")
    os.chmod(script, 0o755)
    cp = nsnet_cmd(user, ["run", "--", script])
    assert cp.returncode == 127, cp.stderr
    assert cp.stderr == (f"nsnet run: {script}: No such file or directory (ENOENT) (the file is "
                         "there: is the interpreter its #! line names missing?)\n")
    cp = nsnet_cmd(user, ["run", "--log-format=json", "--", script])
    assert cp.returncode == 127, cp.stderr
    lines = [json.loads(ln) for ln in cp.stderr.splitlines()]
    assert (lines[-1]["level"], lines[-1]["event"]) == ("error", "error"), lines
    assert "ENOENT" in lines[-1]["msg"], lines


# ---- failures a user can cause --------------------------------------------------

@unpriv_only
def test_api_socket_directory_not_writable(user, ns, base_dir):
    """Was: `nsnet-nshelper: BrokenPipeError` then `internal error: PermissionError`."""
    d = os.path.join(base_dir, "root-only")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)  # root's: nsnet-test may look, not write
    sock = os.path.join(d, "api.sock")
    cp = nsnet_cmd(user, ["-c", "-a", sock, ns.pid, "tap0"])
    assert_clean_failure(cp, 1, f"directory {d} is not writable", "EACCES")
    cp = nsnet_cmd(user, ["run", "-a", sock, "--", "true"])
    assert_clean_failure(cp, EXIT_SETUP, "not writable", "EACCES")


@unpriv_only
def test_netns_path_not_readable(user, ns, base_dir):
    """Was: "No such file or directory", for a file that exists."""
    d = os.path.join(base_dir, "private-ns")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "net")
    open(path, "w").close()
    os.chmod(d, 0o700)
    cp = nsnet_cmd(user, ["--netns-type=path", path, "tap0"])
    assert_clean_failure(cp, 1, "Permission denied (EACCES)", path)
    assert "No such file" not in cp.stderr


def test_setns_on_a_file_that_is_not_a_namespace(user):
    cp = nsnet_cmd(user, ["--netns-type=path", "/etc/passwd", "tap0"])
    assert_clean_failure(cp, 1, "/etc/passwd (--netns-type=path) is not a namespace file")
    cp = nsnet_cmd(user, ["--netns-type=path", "--userns-path=/proc/self/ns/net",
                          "/proc/self/ns/net", "tap0"])
    assert_clean_failure(cp, 1, "is a namespace, but not a user namespace")


@unpriv_only
def test_newuidmap_not_executable(user, base_dir):
    """Was: a traceback and exit 1 (PermissionError out of subprocess)."""
    d = os.path.join(base_dir, "bin-noexec")
    os.makedirs(d, exist_ok=True)
    for tool in ("newuidmap", "newgidmap"):
        p = os.path.join(d, tool)
        with open(p, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(p, 0o644)
    os.chmod(d, 0o755)
    cp = user.run(["/usr/bin/env", f"PATH={d}", harness.nsnet_bin(), "run", "--map-subids",
                   "--", "/bin/true"], timeout=60, text=True)
    assert_clean_failure(cp, EXIT_SETUP, "cannot run", "newuidmap", "EACCES")


def test_popen_wait_ready_says_why(user):
    """Was: "nsnet run exited (status 125) before the network was ready", no reason."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        kw = {} if user.is_root else {"user": user.uid, "group": user.gid,
                                       "extra_groups": [], "env": user.env(), "cwd": "/"}
        with nsnet.Popen(["true"], publish=[f"127.0.0.1:{port}:80"], **kw) as p:
            with pytest.raises(nsnet.StartError, match="address already in use"):
                p.wait_ready()
    assert p.returncode == EXIT_SETUP


# ---- slirp4netns 1.2.0: --userns-path in PID mode -------------------------------

@unpriv_only
def test_userns_path_in_pid_mode(impl, ns, start_fwd):
    """slirp4netns joins that user namespace instead of /proc/PID/ns/user."""
    fwd = start_fwd(impl, ["-c", f"--userns-path={ns.user_path}", ns.pid, "tap0"])
    assert fwd.alive()
    assert ns.link("tap0")["addr_info"][0]["local"] == "10.0.2.100"


@nsnet_only
@unpriv_only
def test_libslirp_forward_failure_says_why(impl, ns, connect):
    """The API reply stays slirp4netns's ("slirp_add_hostfwd failed"); the
    log says why, with libslirp's errno: port in use, permission."""
    from harness import api_call

    net = connect()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        req = {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "127.0.0.1",
                                                       "host_port": port, "guest_port": 80}}
        assert b"slirp_add_hostfwd failed" in api_call(net.api, req)
    req["arguments"]["host_port"] = 80  # below ip_unprivileged_port_start, as nsnet-test
    assert b"slirp_add_hostfwd failed" in api_call(net.api, req)
    log = net.fwd.log()
    assert f"127.0.0.1:{port} -> 10.0.2.100:80/tcp failed: slirp_add_hostfwd failed: " \
           "Address already in use (EADDRINUSE)" in log, log
    assert "127.0.0.1:80 -> 10.0.2.100:80/tcp failed: slirp_add_hostfwd failed: " \
           "Permission denied (EACCES)" in log, log


@unpriv_only
def test_dev_net_tun_not_accessible(user, ns, base_dir):
    """/dev/net/tun replaced (in a mount namespace of the test's own) by a
    file only root may open: nsnet says which mode the device needs."""
    fake = os.path.join(base_dir, "tun-root-only")
    open(fake, "w").close()
    os.chmod(fake, 0o600)
    script = (f"mount --bind {fake} /dev/net/tun && exec setpriv --reuid={user.uid} "
              f"--regid={user.gid} --clear-groups -- {harness.nsnet_bin()} -c {ns.pid} tap0")
    cp = harness.User.root().run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  script], timeout=60, text=True)
    assert cp.returncode == 1, cp.stderr
    assert "cannot open /dev/net/tun for TAP 'tap0': Permission denied (EACCES)" in cp.stderr
    assert "crw-rw-rw-, 0666" in cp.stderr and "Traceback" not in cp.stderr
    # --log-format=json: the namespace helper's line is JSON too
    cp = harness.User.root().run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  script + " --log-format=json"], timeout=60, text=True)
    lines = [json.loads(ln) for ln in cp.stderr.splitlines() if ln.strip()]
    assert cp.returncode == 1 and any("Permission denied (EACCES)" in ln["msg"] for ln in lines)
