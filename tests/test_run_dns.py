"""`nsnet run` resolves names through nsnet by default (issue 14), as pasta
does: COMMAND's /etc/resolv.conf names the built-in DNS (10.0.2.3, and
fd00::3 with -6), which forwards to the host's resolver; --no-dns and
--disable-dns keep the host's file; one warning line when names cannot
resolve.

The "host's resolver" is a DNS server of the test's own on 127.0.0.53:53
of the sealed namespace (systemd-resolved's stub address), answering names
under .test only; nsnet run is started in a private mount namespace whose
/etc/resolv.conf names it (test_netfeatures.py does the same for the
forwarder).  COMMAND asks the nameservers of ITS /etc/resolv.conf with a
hand-made query: never the system resolver, never a real name."""
from __future__ import annotations

import json
import os

import pytest

import harness
from harness import NS_PYTHON, User
from test_netfeatures import DNS_ANSWER, DNS_ANSWER6, Resolver, with_resolv_conf

pytestmark = pytest.mark.timeout(120)

EXIT_SETUP = 125
STUB = "127.0.0.53"
WARNING = "names will not resolve"

# Run as COMMAND: one A (or AAAA) question for argv[1] to each nameserver of
# /etc/resolv.conf in turn, as a stub resolver would; prints what it saw.
CLIENT = r"""
import json, os, socket, struct, sys
name, qtype, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
servers = [l.split()[1] for l in open("/etc/resolv.conf") if l.split()[:1] == ["nameserver"]]
out = {"nameservers": servers, "tried": [], "server": None, "answer": None, "rcode": None}
for server in servers:
    qid = int.from_bytes(os.urandom(2), "big")
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    q += struct.pack("!HH", qtype, 1)
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        try:
            s.sendto(q, (server, 53))
            data = s.recv(4096)
        except socket.timeout:
            out["tried"].append([server, "timeout"])
            continue
        except OSError as e:
            out["tried"].append([server, os.strerror(e.errno)])
            continue
    out["tried"].append([server, "answer"])
    out["server"], out["rcode"] = server, data[3] & 15
    if struct.unpack_from("!H", data, 6)[0]:
        rdlen = struct.unpack_from("!H", data, len(q) + 10)[0]
        rdata = data[len(q) + 12:len(q) + 12 + rdlen]
        out["answer"] = socket.inet_ntop(socket.AF_INET6 if rdlen == 16 else socket.AF_INET, rdata)
    break
print(json.dumps(out))
"""


@pytest.fixture
def stub(base_dir):
    """The host's resolver on 127.0.0.53 (and ::1 for the IPv6 cases)."""
    res = Resolver((STUB, "::1"))
    yield res
    res.close()


@pytest.fixture
def host_conf(base_dir):
    """host_conf(text) -> the path of a resolv.conf to be the host's."""
    n = [0]

    def make(text: str) -> str:
        n[0] += 1
        path = os.path.join(base_dir, f"host-resolv.{n[0]}.conf")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        return path

    return make


@pytest.fixture
def client(base_dir):
    path = os.path.join(base_dir, "dnsclient.py")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(CLIENT)
        os.chmod(path, 0o644)
    return path


def run(user, conf: str, args: list[str], cmd: list[str], timeout: float = 60):
    """nsnet run ARGS -- CMD as user, with conf as the host's /etc/resolv.conf."""
    argv = with_resolv_conf(conf, user) + [harness.nsnet_bin(), "run", *args, "--", *cmd]
    return User.root().run(argv, timeout=timeout, text=True, env=user.env())


def resolve(user, conf, args, client, name="probe.nsnet.test", qtype=1, wait=5.0):
    """wait: seconds for each nameserver's answer (5: an answer is expected,
    and a loaded machine must not fail the test; less where none is)."""
    cp = run(user, conf, args, [NS_PYTHON, client, name, str(qtype), str(wait)])
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout.strip().splitlines()[-1]), cp.stderr


def warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if WARNING in ln]


# --------------------------------------------------------------------------
# The default: through nsnet's DNS
# --------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--disable-host-loopback"], ["--dns"]])
def test_resolves_through_nsnet_by_default(user, stub, host_conf, client, flags):
    """The host names only a loopback stub (127.0.0.53, systemd-resolved's):
    COMMAND asks 10.0.2.3, which forwards to it.  libslirp 4.7 forwards DNS
    to a loopback nameserver even with --disable-host-loopback (only
    connections to 10.0.2.2 are refused), so there is nothing to warn of."""
    conf = host_conf(f"search example.test\nnameserver {STUB}\n")
    r, err = resolve(user, conf, flags, client)
    assert r["nameservers"] == ["10.0.2.3"], r
    assert (r["server"], r["answer"], r["rcode"]) == ("10.0.2.3", DNS_ANSWER, 0), r
    assert ("probe.nsnet.test", 1, "127.0.0.1") in stub.queries
    assert warnings(err) == [], err


def test_resolv_conf_contents(user, stub, host_conf):
    """search lines are kept; -6 adds the IPv6 DNS; the host's file, mounts
    and temporary directory are untouched."""
    conf = host_conf(f"search example.test\noptions edns0\nnameserver {STUB}\n")
    cp = run(user, conf, ["-6", "--cidr=10.9.0.0/24"], ["cat", "/etc/resolv.conf"])
    assert cp.returncode == 0, cp.stderr
    lines = [ln for ln in cp.stdout.splitlines() if not ln.startswith("#")]
    assert lines == ["nameserver 10.9.0.3", "nameserver fd00::3", "search example.test"], lines
    with open(conf) as f:
        assert f.read() == f"search example.test\noptions edns0\nnameserver {STUB}\n"
    assert not [n for n in os.listdir("/tmp") if n.startswith("nsnet-run.")]


def test_ipv6_nameserver_with_ipv6(user, stub, host_conf, client):
    """A host with only an IPv6 nameserver: with -6, fd00::3 reaches it."""
    conf = host_conf("nameserver ::1\n")
    r, err = resolve(user, conf, ["-6"], client, qtype=28)
    assert r["nameservers"] == ["10.0.2.3", "fd00::3"], r
    assert (r["server"], r["answer"]) == ("fd00::3", DNS_ANSWER6), r
    assert warnings(err) == [], err


# --------------------------------------------------------------------------
# Opting out: --no-dns, --disable-dns
# --------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--no-dns", "--disable-dns"])
def test_opt_out_keeps_host_file(user, stub, host_conf, client, flag):
    """COMMAND sees the host's file; its loopback stub is COMMAND's own
    loopback there, where nothing answers: one warning says so."""
    conf = host_conf(f"nameserver {STUB}\n")
    r, err = resolve(user, conf, [flag], client, wait=1.5)
    assert r["nameservers"] == [STUB] and r["answer"] is None, r
    assert stub.queries == []
    [w] = warnings(err)
    assert w == (f"nsnet: warning: names will not resolve: COMMAND keeps the host's "
                 f"/etc/resolv.conf ({flag}), and none of its nameservers can be reached "
                 f"({STUB}: loopback, COMMAND's own in its namespace); without {flag}, "
                 "names resolve through nsnet's DNS"), err


def test_opt_out_with_reachable_nameserver(user, host_conf):
    """--no-dns with a nameserver COMMAND can reach (not loopback, nothing
    denies it): no warning (the address is only read, never asked)."""
    conf = host_conf("nameserver 192.0.2.1\n")
    cp = run(user, conf, ["--no-dns"], ["cat", "/etc/resolv.conf"])
    assert cp.returncode == 0 and cp.stdout == "nameserver 192.0.2.1\n", cp.stderr
    assert warnings(cp.stderr) == [], cp.stderr


def test_dns_and_disable_dns_conflict(user, host_conf):
    cp = run(user, host_conf(f"nameserver {STUB}\n"), ["--dns", "--disable-dns"], ["true"])
    assert cp.returncode == EXIT_SETUP
    assert "--dns names the built-in DNS, which --disable-dns turns off" in cp.stderr


# --------------------------------------------------------------------------
# Warnings: the host's resolver cannot be reached through 10.0.2.3
# --------------------------------------------------------------------------

# case: (the host's resolv.conf, nsnet's flags, the warning's reason or None)
WARN_CASES = {
    "no-nameserver": ("search example.test\n", [], "no-nameserver"),
    "ipv6-only": ("nameserver ::1\n", [], "no-nameserver"),
    "no-egress": (f"nameserver {STUB}\n", ["--no-egress"], "no-egress"),
    "policy": (f"nameserver {STUB}\n", ["--egress=deny", "--allow=tcp:10.0.2.2:80"], "policy"),
    "reachable": (f"nameserver {STUB}\n", [], None),
    "disable-dns": ("search example.test\n", ["--disable-dns"], None),
}


@pytest.mark.parametrize("case", ["no-nameserver", "ipv6-only", "no-egress", "policy"])
def test_warning_when_names_cannot_resolve(user, stub, host_conf, client, case):
    """One warning line (JSON: event dns_unreachable, its reason), and the
    query indeed gets no answer (or nsnet's REFUSED)."""
    text, flags, reason = WARN_CASES[case]
    r, err = resolve(user, host_conf(text), ["--log-format=json", *flags], client,
                     wait=1.5)
    events = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    [w] = [e for e in events if e.get("event") == "dns_unreachable"]
    assert (w["level"], w["reason"], w["resolv_conf"]) == ("warning", reason, "nsnet"), w
    assert w["msg"].startswith(WARNING), w
    if case == "policy":
        assert r["rcode"] == 5 and r["answer"] is None, r  # REFUSED by nsnet
    else:
        assert r["answer"] is None and r["tried"] == [["10.0.2.3", "timeout"]], r
    assert stub.queries == []


def test_no_resolv_conf_at_all(user):
    """A host without /etc/resolv.conf (a tmpfs over /etc in a private mount
    namespace): by default COMMAND still runs (nothing to mount over; the
    warning says why names will not resolve); --dns asked for it: an error."""
    prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
              'mount -t tmpfs tmpfs /etc && exec "$@"', "sh"]
    if not user.is_root:
        prefix += ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                   "--"]
    cp = User.root().run([*prefix, harness.nsnet_bin(), "run", "--", "echo", "ran"],
                         timeout=60, text=True, env=user.env())
    assert (cp.returncode, cp.stdout) == (0, "ran\n"), cp.stderr
    assert cp.stderr.splitlines() == [
        "nsnet: warning: names will not resolve: nsnet's DNS (10.0.2.3) forwards queries to "
        "the host's resolver, but /etc/resolv.conf names no nameserver (it cannot be read: "
        "No such file or directory (ENOENT)); fix the host's resolver configuration, or give "
        "--no-dns"], cp.stderr
    cp = User.root().run([*prefix, harness.nsnet_bin(), "run", "--dns", "--", "echo", "ran"],
                         timeout=60, text=True, env=user.env())
    assert cp.returncode == EXIT_SETUP and cp.stdout == "", cp.stderr
    assert "--dns: /etc/resolv.conf does not exist" in cp.stderr, cp.stderr


def test_default_mount_failure_is_a_warning(user, host_conf):
    """When the resolv.conf cannot be mounted (here: TMPDIR, where it is
    written, does not exist), the default mode says so and COMMAND runs
    with the host's file; --dns asked for it: an error, COMMAND never runs."""
    conf = host_conf(f"nameserver {STUB}\n")
    env = user.env(TMPDIR="/nonexistent-nsnet-tmp")
    argv = with_resolv_conf(conf, user) + [harness.nsnet_bin(), "run", "--", "cat",
                                           "/etc/resolv.conf"]
    cp = User.root().run(argv, timeout=60, text=True, env=env)
    assert (cp.returncode, cp.stdout) == (0, f"nameserver {STUB}\n"), cp.stderr
    assert cp.stderr.splitlines() == [
        "nsnet run: warning: cat keeps the host's /etc/resolv.conf: cannot make a directory "
        "in /nonexistent-nsnet-tmp (TMPDIR): No such file or directory (ENOENT)"], cp.stderr
    argv[argv.index("run") + 1:argv.index("run") + 1] = ["--dns"]
    cp = User.root().run(argv, timeout=60, text=True, env=env)
    assert (cp.returncode, cp.stdout) == (EXIT_SETUP, ""), cp.stderr
    assert "--dns: cannot make a directory in /nonexistent-nsnet-tmp (TMPDIR): No such file " \
        "or directory (ENOENT)" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr and "OSError" not in cp.stderr


def test_warning_text_and_levels(user, host_conf):
    """The text form names what to do; --quiet keeps it (a warning);
    --log-level=error silences it; a policy allowing a name: no warning."""
    conf = host_conf("nameserver ::1\n")
    cp = run(user, conf, ["--quiet"], ["true"])
    assert cp.returncode == 0
    assert warnings(cp.stderr) == [
        "nsnet: warning: names will not resolve: nsnet's DNS (10.0.2.3) forwards queries to "
        "the host's resolver, but /etc/resolv.conf names only IPv6 nameservers (::1), which "
        "nsnet's DNS reaches only with -6; give -6, or --no-dns"], cp.stderr
    cp = run(user, conf, ["--log-level=error"], ["true"])
    assert cp.returncode == 0 and cp.stderr == "", cp.stderr
    cp = run(user, host_conf(f"nameserver {STUB}\n"), ["--egress=deny", "--allow=*.test"],
             ["true"])
    assert cp.returncode == 0 and warnings(cp.stderr) == [], cp.stderr


def test_python_api_default(user, stub, host_conf, client):
    """nsnet.run and nsnet.Popen take the table's default (None: through
    nsnet unless disable_dns); dns=False is --no-dns."""
    from nsnet.client import run_flags

    assert "--dns" not in run_flags() and "--no-dns" not in run_flags()
    assert "--no-dns" in run_flags(dns=False) and "--dns" in run_flags(dns=True)
    prefix = with_resolv_conf(host_conf(f"nameserver {STUB}\n"), user)
    import nsnet

    cp = nsnet.run([NS_PYTHON, client, "probe.nsnet.test", "1", "5"], capture_output=True, text=True,
                   command=[*prefix, harness.nsnet_bin()], timeout=60, env=user.env())
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["answer"] == DNS_ANSWER
    cp = nsnet.run(["cat", "/etc/resolv.conf"], dns=False, capture_output=True, text=True,
                   command=[*prefix, harness.nsnet_bin()], timeout=60, env=user.env())
    assert cp.returncode == 0 and cp.stdout == f"nameserver {STUB}\n", cp.stderr


# --------------------------------------------------------------------------
# Attach mode: the namespace's resolv.conf is its owner's; nsnet only says
# when its DNS (10.0.2.3) cannot answer
# --------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(WARN_CASES))
def test_attach_mode_warns_when_its_dns_cannot_answer(user, ns, workdir, nsnet_impl,
                                                      host_conf, request, case):
    """`nsnet PID TAP` warns once at start (JSON: event dns_unreachable,
    resolv_conf null) when nsnet's DNS will not answer: the host's file names
    no usable nameserver, --no-egress, a policy that allows no name; not
    when the host has one, nor with --disable-dns (no DNS to warn about)."""
    text, flags, reason = WARN_CASES[case]
    fwd = harness.start_forwarder(nsnet_impl, User.root(),
                                  ["--log-format=json", *flags, ns.pid, "tap0"], workdir,
                                  prefix=with_resolv_conf(host_conf(text), user))
    request.node._forwarders = [fwd]
    fwd.stop()
    events = [json.loads(ln) for ln in fwd.log().splitlines() if ln.startswith("{")]
    assert any(e.get("event") == "start" for e in events), fwd.log()
    found = [e for e in events if e.get("event") == "dns_unreachable"]
    if reason is None:
        assert found == [], fwd.log()
        return
    [w] = found
    assert (w["level"], w["reason"], w["resolv_conf"]) == ("warning", reason, None), w
    assert w["msg"].startswith(WARNING) and "COMMAND" not in w["msg"], w
    assert ("--disable-dns" in w["msg"]) == (case in ("no-nameserver", "ipv6-only")), w


def test_attach_mode_warning_text(user, ns, workdir, nsnet_impl, host_conf, request):
    """The text form, on stderr after the start line."""
    fwd = harness.start_forwarder(nsnet_impl, User.root(), [ns.pid, "tap0"], workdir,
                                  prefix=with_resolv_conf(host_conf("# nothing\n"), user))
    request.node._forwarders = [fwd]
    fwd.stop()
    assert warnings(fwd.log()) == [
        "nsnet: warning: names will not resolve: nsnet's DNS (10.0.2.3) forwards queries to "
        "the host's resolver, but /etc/resolv.conf names no nameserver; fix the host's "
        "resolver configuration, or give --disable-dns"], fwd.log()
