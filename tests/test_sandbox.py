"""--enable-sandbox and --enable-seccomp: what the running forwarder really
holds (read from /proc), what it can still do (traffic, forwards), and
that a syscall outside the allowlist kills it."""
import json
import os
import signal
import subprocess

import pytest

from harness import (VENV, HarnessError, add_hostfwd, api_call, free_port, payload, sha256,
                     tcp_send, wait_until)

pytestmark = pytest.mark.timeout(120)
nsnet_only = pytest.mark.parametrize("impl", ["nsnet"], indirect=True)

GW = "10.0.2.2"
CAP_NET_BIND_SERVICE = 10
SANDBOX_FLAGS = ("--enable-sandbox", "--enable-seccomp")


def info(api: str) -> dict:
    return json.loads(api_call(api, {"execute": "get_info"}))["return"]


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def ns_of(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def forwarder_pid(net) -> int:
    pid = info(net.api)["forwarder_pid"]
    assert isinstance(pid, int) and pid != net.fwd.pid
    return pid


def assert_locked_down(pid: int, user) -> None:
    st = status(pid)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # SECCOMP_MODE_FILTER
    assert st["Seccomp_filters"] == "1"
    assert st["CapAmb"] == "0000000000000000"
    assert int(st["CapInh"], 16) == 0
    allowed = {0, 1 << CAP_NET_BIND_SERVICE}
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(st[field], 16) in allowed, (field, st[field])
    if not user.is_root:
        # In its own user namespace and with nothing in it: no capability at all.
        for field in ("CapEff", "CapPrm", "CapBnd"):
            assert int(st[field], 16) == 0, (field, st[field])


@nsnet_only
def test_sandboxed_forwarder_status_and_traffic(connect, host_server, user):
    srv = host_server("echo")
    mountinfo_before = open("/proc/self/mountinfo").read()
    net = connect(*SANDBOX_FLAGS)
    sup, fwd = net.fwd.pid, forwarder_pid(net)
    assert_locked_down(fwd, user)
    # Own mount, IPC, UTS namespaces; the host's network namespace (sockets).
    for kind in ("mnt", "ipc", "uts"):
        assert ns_of(fwd, kind) != ns_of(sup, kind), kind
    assert ns_of(fwd, "net") == ns_of(sup, "net")
    if not user.is_root:
        # A private user namespace: neither the caller's nor the target's.
        assert ns_of(fwd, "user") not in (ns_of(sup, "user"), ns_of(net.ns.pid, "user"))
    # The caller's mounts are untouched (a root supervisor has a mount view
    # of its own, without the homes: tests/test_confine.py).
    assert (ns_of(sup, "mnt") == os.readlink("/proc/self/ns/mnt")) != user.is_root
    assert open("/proc/self/mountinfo").read() == mountinfo_before
    # It still forwards: namespace -> host, and a forward added after the sandbox.
    r = net.ns.client("tcp-echo", GW, srv.port, 256 * 1024)
    assert r["received"] == r["sent"] == 256 * 1024 and r["sha_received"] == r["sha_sent"]
    server = net.ns.start_server("tcp-serve", "0.0.0.0", 0, "sink", 1)
    try:
        host_port = free_port()
        assert add_hostfwd(net.api, "tcp", host_port, server.port) == b'{"return":{"id":1}}'
        data = payload(1 << 20)
        assert tcp_send("127.0.0.1", host_port, data).decode().split() == \
            [str(len(data)), sha256(data)]
        assert server.result()["connections"][0]["received"] == len(data)
    finally:
        server.close()
    assert forwarder_pid(net) == fwd and info(net.api)["restarts"] == 0


@nsnet_only
@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_sandbox_root_holds_only_resolv_conf(connect):
    net = connect("--enable-sandbox")
    fwd = forwarder_pid(net)
    root = f"/proc/{fwd}/root"
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    # /etc/resolv.conf and, if it is a symlink, the chain it points along.
    assert "etc" in found and "etc/resolv.conf" in found
    for path in found:
        assert path == "etc" or "resolv" in path or os.path.isdir(os.path.join(root, path)), found
    real = os.path.realpath("/etc/resolv.conf")
    with open(real, "rb") as host_copy, open(f"{root}/etc/resolv.conf", "rb") as seen:
        assert seen.read() == host_copy.read()
    mounts = open(f"/proc/{fwd}/mountinfo").read().splitlines()
    for line in mounts:
        opts = line.split()[5].split(",")
        assert "ro" in opts, line
    assert len(mounts) <= 1 + sum(1 for p in found if "resolv" in p), mounts
    st = status(fwd)
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "0"


def run_seccomp_check(user, *args) -> list[dict]:
    cp = user.run([f"{VENV}/bin/python", "-m", "nsnet.seccomp", "check", *args],
                  timeout=30, text=True)
    assert cp.returncode == 0, cp.stderr
    return [json.loads(line) for line in cp.stdout.splitlines()]


def test_syscall_outside_allowlist_kills(user):
    """The forwarder's own sandbox + filter, entered by a forked child
    (nsnet.seccomp check): ptrace, mount and unshare kill it with SIGSYS;
    listed calls work."""
    results = run_seccomp_check(user, "ptrace", "mount", "unshare", "execve", "getpid",
                                "socket:2,2")
    by = {r["syscall"]: r for r in results}
    for name in ("ptrace", "mount", "unshare", "execve"):
        assert by[name]["outcome"] == "refused" and by[name]["signal"] == "SIGSYS", by[name]
    assert by["getpid"]["outcome"] == "allowed" and by["getpid"]["rc"] > 0
    assert by["socket"]["outcome"] == "allowed" and by["socket"]["rc"] >= 0  # AF_INET, UDP
    nosandbox = run_seccomp_check(user, "--no-sandbox", "ptrace")
    assert nosandbox[0]["outcome"] == "refused"


def test_syscall_arguments_filtered(user):
    """Listed calls with arguments outside their filter kill too: an
    ioctl other than FIONREAD/FIONBIO (TIOCSTI on the inherited terminal),
    a netlink or packet socket, executable memory."""
    TIOCSTI, FIONREAD = 0x5412, 0x541B
    AF_INET, AF_NETLINK, AF_PACKET = 2, 16, 17
    PROT_RW, PROT_RWX, MAP_PRIVATE_ANON = 3, 7, 0x22
    cases = {
        f"ioctl:2,{TIOCSTI}": "refused",
        f"ioctl:0,{FIONREAD}": "allowed",
        f"socket:{AF_NETLINK},3": "refused",
        f"socket:{AF_PACKET},3": "refused",
        f"socket:{AF_INET},1": "allowed",
        f"mmap:0,4096,{PROT_RWX},{MAP_PRIVATE_ANON},-1,0": "refused",
        f"mmap:0,4096,{PROT_RW},{MAP_PRIVATE_ANON},-1,0": "allowed",
        "mprotect": "refused",
    }
    results = run_seccomp_check(user, *cases)
    for spec, r in zip(cases, results):
        assert r["outcome"] == cases[spec], (spec, r)
        if r["outcome"] == "refused":
            assert r["signal"] == "SIGSYS"


def test_allowlist_is_small():
    cp = subprocess.run([f"{VENV}/bin/python", "-m", "nsnet.seccomp", "list"],
                        capture_output=True, text=True, timeout=30, check=True, cwd="/")
    lines = cp.stdout.splitlines()
    names = {line.split()[1] for line in lines[:-1]}
    assert len(names) == int(lines[-1].split()[0])
    assert len(names) < 80
    for forbidden in ("execve", "ptrace", "mount", "pivot_root", "unshare", "setns", "clone",
                      "fork", "kexec_load", "bpf", "init_module", "keyctl", "process_vm_readv"):
        assert forbidden not in names


@nsnet_only
@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_restarted_forwarder_is_sandboxed_again(connect, host_server, user):
    srv = host_server("echo")
    net = connect(*SANDBOX_FLAGS)
    first = forwarder_pid(net)
    # What a seccomp kill looks like to the supervisor: death by SIGSYS.
    os.kill(first, signal.SIGSYS)
    # "restarts" counts a new forwarder once it is ready; its PID shows earlier.
    def restarted():
        i = info(net.api)
        return i["restarts"] == 1 and i["forwarder_pid"] not in (first, None) and i
    second = wait_until(restarted, 15, what="a new, ready forwarder")["forwarder_pid"]
    assert_locked_down(second, user)
    r = net.ns.client("tcp-echo", GW, srv.port, 64 * 1024)
    assert r["received"] == 64 * 1024 and r["sha_received"] == r["sha_sent"]


@pytest.mark.parametrize("user", ["unpriv"], indirect=True)
def test_rootlesskit_style_invocation(ns, start_fwd, nsnet_impl, host_server, user):
    """RootlessKit passes --enable-sandbox --enable-seccomp by default,
    without -c, on a tap0 it created itself: must work unprivileged."""
    srv = host_server("echo")
    ns.sh("ip tuntap add name tap0 mode tap && ip link set tap0 up && "
          "ip addr add 10.0.2.100/24 dev tap0 && ip route add default via 10.0.2.2")
    fwd = start_fwd(nsnet_impl, ["--mtu", "65520", *SANDBOX_FLAGS, ns.pid, "tap0"])
    assert fwd.alive()
    r = ns.client("tcp-echo", GW, srv.port, 64 * 1024)
    assert r["received"] == 64 * 1024 and r["sha_received"] == r["sha_sent"]


def test_slirp4netns_sandbox_for_reference(ns, start_fwd, slirp4netns_impl, user):
    """slirp4netns 1.2.0 with the same flags (recorded for SECURITY.md): it
    joins the TARGET's user namespace and keeps CAP_NET_BIND_SERVICE."""
    fwd = start_fwd(slirp4netns_impl, ["--configure", *SANDBOX_FLAGS, ns.pid, "tap0"])
    st = status(fwd.pid)
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    if not user.is_root:
        assert ns_of(fwd.pid, "user") == ns_of(ns.pid, "user")
    if fwd.pid and not fwd.alive():
        raise HarnessError(fwd.log())
