"""The Python API (`import nsnet`): attach(), run(), Popen, every method and
the error paths, against real namespaces.  Runs in the pytest process (root,
inside the isolated netns); the namespaces belong to root or to the
unprivileged test user, and nsnet.run()/Popen run nsnet as that user."""
import os
import signal
import socket
import subprocess
import sys

import pytest

import harness
from harness import NS_PYTHON, free_port, tcp_send, udp_roundtrip

import nsnet

pytestmark = pytest.mark.timeout(120)


def client(base_dir, *args):
    return [NS_PYTHON, f"{base_dir}/nsclient.py", *[str(a) for a in args]]


def as_user(user):
    """subprocess arguments that run nsnet (and so the command) as `user`."""
    if user.is_root:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": [], "env": user.env(),
            "cwd": "/"}


def assert_nothing_left():
    left = harness.child_pids()
    assert left == [], f"processes left behind: {[(p, harness.cmdline(p)) for p in left]}"


def assert_no_nsnet_children(ns_procs):
    """Only the namespaces' `sleep infinity` processes may remain."""
    left = set(harness.child_pids()) - set(ns_procs)
    assert not left, f"processes left behind: {sorted(left)}"


@pytest.fixture(autouse=True)
def installed_nsnet():
    """The tests must exercise the installed package, not the source tree."""
    venv = os.path.realpath(harness.VENV)
    assert os.path.realpath(nsnet.__file__).startswith(venv + "/"), nsnet.__file__


# --------------------------------------------------------------------------
# attach()
# --------------------------------------------------------------------------

def test_attach_every_method(ns, base_dir):
    with nsnet.attach(ns.pid) as net:
        assert net.running and net.target == ns.pid
        info = net.info()
        assert info["target"]["pid"] == ns.pid
        assert info["tap"]["name"] == "tap0" and info["guest"] == "10.0.2.100"
        assert info["supervisor_pid"] == net.pid
        assert net.forwards() == []
        # The namespace is configured (--configure is the default).
        addrs = [a["local"] for a in ns.addrs("tap0", "inet")]
        assert addrs == ["10.0.2.100"]

        tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
        fid = net.add_forward(f"127.0.0.1:{tcp_port}:8080")
        fid_udp = net.add_forward(udp_port, 5353, proto="udp", host_addr="127.0.0.1")
        assert (fid, fid_udp) == (1, 2)
        assert net.forwards() == [
            nsnet.PortForward(1, "tcp", "127.0.0.1", tcp_port, "10.0.2.100", 8080),
            nsnet.PortForward(2, "udp", "127.0.0.1", udp_port, "10.0.2.100", 5353),
        ]
        srv = ns.start_server("tcp-serve", "0.0.0.0", 8080, "echo", 1)
        try:
            data = os.urandom(100_000)
            assert tcp_send("127.0.0.1", tcp_port, data) == data
            assert srv.result()["connections"][0]["echoed"] == len(data)
        finally:
            srv.close()
        userv = ns.start_server("udp-serve", "0.0.0.0", 5353, 1)
        try:
            assert udp_roundtrip("127.0.0.1", udp_port, b"dgram") == b"dgram"
        finally:
            userv.close()
        stats = net.stats()
        assert stats["rx_frames"] > 0 and stats["tx_frames"] > 0
        assert stats["rx_bytes"] >= len(data)

        net.remove_forward(fid)
        assert [f.id for f in net.forwards()] == [2]
        with pytest.raises(ConnectionRefusedError):
            tcp_send("127.0.0.1", tcp_port, b"x", timeout=5)
        net.remove_forward(net.forwards()[0])  # a PortForward works too
        assert net.forwards() == []
        pid = net.pid
    assert not net.running and net.returncode == 0
    assert net.close() == 0  # idempotent
    assert not os.path.exists(net.api_socket)
    with pytest.raises(nsnet.NotRunning, match="closed"):
        net.forwards()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert_no_nsnet_children([ns.pid])


def test_attach_splice_forward(ns):
    """mode="splice": nsnet's TCP fast path, here to the namespace's
    loopback, named (the default is its TAP address)."""
    port = free_port()
    with nsnet.attach(ns.pid) as net:
        fid = net.add_forward(port, 8080, host_addr="127.0.0.1", guest_addr="127.0.0.1",
                              mode="splice")
        assert net.forwards() == [
            nsnet.PortForward(fid, "tcp", "127.0.0.1", port, "127.0.0.1", 8080, "splice")]
        srv = ns.start_server("tcp-serve", "127.0.0.1", 8080, "echo", 1)
        try:
            assert tcp_send("127.0.0.1", port, b"spliced") == b"spliced"
            assert srv.result()["connections"][0]["peer"] == "127.0.0.1"
        finally:
            srv.close()
        with pytest.raises(nsnet.ForwardError, match="tcp only"):
            net.add_forward(free_port(socket.SOCK_DGRAM), 53, proto="udp", mode="splice")
        with pytest.raises(nsnet.ForwardError, match="mode must be one of"):
            net.add_forward(free_port(), 80, mode="fast")
        net.remove_forward(fid)
        assert net.forwards() == []
    assert_no_nsnet_children([ns.pid])


def test_attach_with_options_and_publish(ns):
    port = free_port()
    with nsnet.attach(ns.pid, mtu=9000, cidr="10.7.0.0/24", no_egress=True,
                      publish=[f"127.0.0.1:{port}:80"]) as net:
        assert [(f.host_port, f.guest_addr) for f in net.forwards()] == [(port, "10.7.0.100")]
        info = net.info()
        assert info["mtu"] == 9000 and info["cidr"] == "10.7.0.0/24"
        assert ns.link("tap0")["mtu"] == 9000
    assert_no_nsnet_children([ns.pid])


@pytest.mark.parametrize("offload", [False, True])
def test_attach_offload_keyword_is_obeyed(ns, offload):
    """attach(offload=False) used to run with offloads on: the client only
    ever passed --offload, and the command line's default is on."""
    with nsnet.attach(ns.pid, offload=offload) as net:
        assert net.info()["offload"] is offload
    with nsnet.Popen(["sleep", "30"], offload=offload) as p:
        p.wait_ready()
        assert p.info()["offload"] is offload
        p.terminate()


def test_popen_takes_the_attach_options_of_nsnet_run(user, workdir):
    """enable_sandbox, enable_seccomp, disable_dns, pidfile, tapname: keywords
    of the option table, passed to `nsnet run`."""
    pidfile = os.path.join(workdir, "nsnet.pid")
    # The command lives until its stdin ends (communicate() below): a
    # command that ended at once would take nsnet and its API with it
    # before info() asks.
    with nsnet.Popen(["sh", "-c", "cat /proc/net/dev && cat >/dev/null"], enable_sandbox=True,
                     enable_seccomp=True, disable_dns=True, pidfile=pidfile, tapname="eth7",
                     mtu=1400, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     **as_user(user)) as p:
        p.wait_ready()
        with open(pidfile) as f:
            assert int(f.read()) == p.pid
        info = p.info()
        assert info["tap"]["name"] == "eth7" and info["mtu"] == 1400
        out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and b"eth7:" in out
    assert not os.path.exists(pidfile)  # removed at exit
    assert_nothing_left()


def test_attach_namespace_path(ns):
    with nsnet.attach(ns.net_path, userns=ns.user_path) as net:
        assert net.info()["target"]["netns"] == ns.net_path
        assert [a["local"] for a in ns.addrs("tap0", "inet")] == ["10.0.2.100"]


def test_target_exit_ends_the_handle(make_ns):
    ns = make_ns()
    net = nsnet.attach(ns.pid)
    try:
        ns.close()  # kills the target
        assert net.wait(timeout=30) == 0
        assert not net.running
        with pytest.raises(nsnet.NotRunning, match=f"target PID {ns.pid} exited"):
            net.info()
    finally:
        net.close()
    assert_nothing_left()


def test_attach_dead_pid():
    p = subprocess.Popen(["true"])
    p.wait(timeout=10)
    with pytest.raises(nsnet.TargetNotFound, match=f"no process with PID {p.pid}"):
        nsnet.attach(p.pid)
    with pytest.raises(nsnet.TargetNotFound):
        nsnet.attach(0)
    with pytest.raises(nsnet.TargetNotFound, match="does not exist"):
        nsnet.attach("/run/netns/no-such-namespace-nsnet")
    assert issubclass(nsnet.TargetNotFound, nsnet.NsnetError)
    assert_nothing_left()


def test_start_error_carries_the_message(ns):
    with pytest.raises(nsnet.StartError, match="MTU"):
        nsnet.attach(ns.pid, mtu=20)
    with pytest.raises(TypeError):
        nsnet.attach(ns.pid, no_such_option=True)  # type: ignore[call-arg]
    assert_no_nsnet_children([ns.pid])


@pytest.mark.parametrize("args,kw,pattern", [
    (("nonsense",), {}, "expected"),
    (("1:2:3:4",), {}, "expected"),
    (("0:80",), {}, "host port must be from 1 to 65535"),
    (("70000:80",), {}, "host port must be from 1 to 65535"),
    (("8080:80/sctp",), {}, "protocol must be tcp or udp"),
    (("[::1:80:80",), {}, "expected"),
    (("1.2.3:8080:80",), {}, "not an IPv4 or IPv6 address"),
    ((8080,), {}, "guest_port is missing"),
    ((8080, 80), {"proto": "icmp"}, "proto"),
    ((True, 80), {}, "host_port"),
    ((8080, 80), {"host_addr": "localhost"}, "not an IPv4 or IPv6 address"),
    (("8080:80",), {"proto": "udp"}, "either a spec string"),
    (("[::1]:8080:80",), {}, "IPv6 enabled"),  # refused by nsnet: no IPv6 here
    ((8080, 80), {"host_addr": "127.0.0.1", "guest_addr": "::1"}, "bad guest_addr"),
])
def test_bad_forward_spec(ns, args, kw, pattern):
    with nsnet.attach(ns.pid) as net:
        with pytest.raises(nsnet.ForwardError, match=pattern) as ei:
            net.add_forward(*args, **kw)
        assert isinstance(ei.value, ValueError) and not isinstance(ei.value, nsnet.PortInUse)
        assert net.forwards() == []  # nothing lost, still serving
        assert net.add_forward(free_port(), 80, host_addr="127.0.0.1") == 1


def test_remove_unknown_forward(ns):
    with nsnet.attach(ns.pid) as net:
        with pytest.raises(nsnet.ForwardError, match="no port forward with id 7"):
            net.remove_forward(7)
        with pytest.raises(nsnet.ForwardError):
            net.remove_forward("1")  # type: ignore[arg-type]
        fid = net.add_forward(free_port(), 80, host_addr="127.0.0.1")
        net.remove_forward(fid)
        with pytest.raises(nsnet.ForwardError, match=f"id {fid}"):
            net.remove_forward(fid)


def test_port_in_use(ns):
    with nsnet.attach(ns.pid) as net:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(nsnet.PortInUse, match=f"127.0.0.1:{port}/tcp is already in use"):
                net.add_forward(f"127.0.0.1:{port}:80")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            uport = taken.getsockname()[1]
            with pytest.raises(nsnet.PortInUse, match="udp"):
                net.add_forward(uport, 53, proto="udp", host_addr="127.0.0.1")
        # A port held by one of its own forwards is in use too.
        port = free_port()
        net.add_forward(port, 80, host_addr="127.0.0.1")
        with pytest.raises(nsnet.PortInUse):
            net.add_forward(port, 81, host_addr="127.0.0.1")
        assert issubclass(nsnet.PortInUse, nsnet.ForwardError)
        assert len(net.forwards()) == 1


def test_unclosed_handle_is_cleaned_up(ns):
    net = nsnet.attach(ns.pid)
    pid, workdir = net.pid, os.path.dirname(net.api_socket)
    del net  # the finalizer tears nsnet down
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(workdir)


# --------------------------------------------------------------------------
# run() and Popen
# --------------------------------------------------------------------------

def test_run_result(user):
    kw = as_user(user)
    cp = nsnet.run(["sh", "-c", "echo out; echo err >&2; ip -br -4 addr show tap0; exit 3"],
                   capture_output=True, text=True, **kw)
    assert isinstance(cp, subprocess.CompletedProcess)
    assert cp.args == ["sh", "-c", "echo out; echo err >&2; ip -br -4 addr show tap0; exit 3"]
    assert cp.returncode == 3
    assert cp.stdout.splitlines()[0] == "out" and "10.0.2.100/24" in cp.stdout
    assert cp.stderr == "err\n"
    cp = nsnet.run(["cat"], input=b"through stdin", capture_output=True, **kw)
    assert cp.stdout == b"through stdin" and cp.returncode == 0
    with pytest.raises(subprocess.CalledProcessError) as ei:
        nsnet.run(["sh", "-c", "exit 4"], check=True, **kw)
    assert ei.value.returncode == 4
    cp = nsnet.run(["sh", "-c", "kill -KILL $$"], **kw)
    assert cp.returncode == 128 + signal.SIGKILL
    cp = nsnet.run(["id", "-u"], capture_output=True, text=True, map_user="current", **kw)
    assert cp.stdout.strip() == str(user.uid)
    assert_nothing_left()


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_run_timeout_kills_everything(user):
    with pytest.raises(subprocess.TimeoutExpired):
        nsnet.run(["sleep", "60"], timeout=2, **as_user(user))
    # nsnet was SIGKILLed; its children (the command, the forwarder) die with
    # it (PR_SET_PDEATHSIG) and, orphaned, come to pytest (a subreaper) to be
    # reaped: they must all be dead, none still running.
    orphans = harness.child_pids()
    harness.wait_until(lambda: all(_state(p) in ("Z", "gone") for p in orphans), 10,
                       what=f"orphans {orphans} to die")
    harness.reap_zombies()
    assert_nothing_left()


def test_run_reaches_host_loopback_and_dns_option(user, base_dir, host_server):
    srv = host_server("echo")
    cp = nsnet.run(client(base_dir, "tcp-echo", "10.0.2.2", srv.port, 50_000),
                   capture_output=True, text=True, **as_user(user))
    assert cp.returncode == 0, cp.stderr
    cp = nsnet.run(["cat", "/etc/resolv.conf"], dns=True, capture_output=True, text=True,
                   **as_user(user))
    assert "nameserver 10.0.2.3" in cp.stdout


def test_run_bad_options_fail_before_starting():
    with pytest.raises(nsnet.ForwardError):
        nsnet.run(["true"], publish=["80"])
    with pytest.raises(ValueError, match="map_user"):
        nsnet.run(["true"], map_user="nobody")
    with pytest.raises(TypeError):
        nsnet.Popen("echo hi")  # no shell parsing
    cp = nsnet.run(["true"], cidr="10.0.2.1/24", capture_output=True, text=True)
    assert cp.returncode == 125 and "network address" in cp.stderr
    assert_nothing_left()


def test_popen_publish_and_methods(user, base_dir):
    port = free_port()
    with nsnet.Popen(client(base_dir, "tcp-serve", "0.0.0.0", 8080, "echo", 1),
                     publish=[f"127.0.0.1:{port}:8080"], stdout=subprocess.PIPE,
                     **as_user(user)) as p:
        p.wait_ready()
        assert p.stdout is not None
        assert harness.read_line(p.stdout, 30).startswith(b"READY")
        assert [f.host_port for f in p.forwards()] == [port]
        assert p.info()["guest"] == "10.0.2.100"
        extra = free_port()
        fid = p.add_forward(extra, 8080, host_addr="127.0.0.1")
        assert [f.host_port for f in p.forwards()] == [port, extra]
        p.remove_forward(fid)
        assert tcp_send("127.0.0.1", port, b"published") == b"published"
        assert p.wait(timeout=30) == 0
        with pytest.raises(nsnet.NotRunning):
            p.forwards()
    assert p.api_socket is not None and not os.path.exists(os.path.dirname(p.api_socket))
    assert_nothing_left()


def test_popen_signals_reach_the_command(user):
    with nsnet.Popen(["sleep", "60"], **as_user(user)) as p:
        p.wait_ready()
        p.terminate()
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
    with nsnet.Popen(["sh", "-c", "echo started; exec sleep 60"], api=False,
                     stdout=subprocess.PIPE, **as_user(user)) as p:
        with pytest.raises(nsnet.NsnetError, match="api=True"):
            p.wait_ready()
        assert p.stdout is not None
        assert harness.read_line(p.stdout, 30) == b"started\n"
        p.send_signal(signal.SIGHUP)
        assert p.wait(timeout=30) == 128 + signal.SIGHUP
    assert_nothing_left()


def test_popen_start_failure(user):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with nsnet.Popen(["true"], publish=[f"127.0.0.1:{port}:80"], stderr=subprocess.PIPE,
                         **as_user(user)) as p:
            with pytest.raises(nsnet.StartError, match="status 125"):
                p.wait_ready()
            assert p.stderr is not None and b"address already in use" in p.stderr.read()
    assert_nothing_left()


def test_import_is_cheap():
    """`import nsnet` loads the exception classes and nothing else."""
    code = ("import sys; before = set(sys.modules); import nsnet; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         timeout=30, check=True, cwd="/").stdout.split()
    assert set(out) <= {"nsnet", "nsnet.errors"}, out


def test_errors_are_documented_classes():
    for name in ("NsnetError", "TargetNotFound", "StartError", "NotRunning", "ApiError",
                 "ForwardError", "PortInUse"):
        cls = getattr(nsnet, name)
        assert issubclass(cls, nsnet.NsnetError) and cls.__doc__
