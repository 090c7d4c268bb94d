"""Command-line handling: bad input fails with exit 1 and a message; -h and -v."""
import os
import re
import subprocess

import pytest

from harness import SLIRP4NETNS_BIN, nsnet_only, unpriv_only

pytestmark = pytest.mark.timeout(60)


# slirp4netns's own chatter on stderr during a normal start-up.
NOISE = re.compile(r"^(sent|received) tapfd=\d+.*$", re.M)


def run(impl, args, user=None, timeout=20):
    return impl.run([str(a) for a in args], user=user, timeout=timeout, text=True)


def message(cp) -> str:
    return NOISE.sub("", cp.stderr).strip()


def assert_fails(cp, pattern=None):
    assert cp.returncode == 1, f"exit {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}"
    msg = message(cp)
    assert msg, f"no message on stderr (stdout: {cp.stdout!r})"
    if pattern:
        assert re.search(pattern, msg, re.I), f"{pattern!r} not in stderr: {msg!r}"


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait(timeout=10)
    return p.pid


# ---- bad arguments, no namespace needed ----------------------------------

def test_unknown_flag(impl):
    assert_fails(run(impl, ["--bogus-flag", "1", "tap0"]), "bogus-flag")


def test_no_arguments_prints_usage(impl):
    cp = run(impl, [])
    assert cp.returncode == 1
    assert "usage" in (cp.stdout + cp.stderr).lower()


def test_missing_tapname_prints_usage(impl):
    cp = run(impl, [str(os.getpid())])
    assert cp.returncode == 1
    assert "usage" in (cp.stdout + cp.stderr).lower()


@pytest.mark.parametrize("cidr", ["foo", "10.0.2.1/24", "10.0.2.0/26", "10.0.2.0/0",
                                  "10.0.2.0", "10.0.2.0/abc", "300.0.2.0/24"])
def test_bad_cidr(impl, cidr):
    assert_fails(run(impl, ["--cidr", cidr, "1", "tap0"]), r"cidr|prefix|network")


@pytest.mark.parametrize("mtu", ["0", "65522", "100000", "-1", "abc", "1500x", ""])
def test_bad_mtu_rejected_at_parse(impl, mtu):
    assert_fails(run(impl, ["--mtu", mtu, "1", "tap0"]), "mtu")


def test_bad_pid(impl):
    assert_fails(run(impl, ["abc", "tap0"]), "pid")


def test_dead_pid(impl):
    pid = dead_pid()
    assert_fails(run(impl, [pid, "tap0"]))


def test_missing_netns_path(impl):
    assert_fails(run(impl, ["--netns-type=path", "/nonexistent/netns", "tap0"]))


def test_missing_userns_path(impl):
    assert_fails(run(impl, ["--userns-path=/nonexistent/userns", "1", "tap0"]), "userns")


def test_macaddress_requires_configure(impl):
    assert_fails(run(impl, ["--macaddress", "02:00:00:00:00:01", "1", "tap0"]), "mac")


def test_bad_target_type(impl):
    assert_fails(run(impl, ["--target-type=bogus", "1", "tap0"]), "target-type")


def test_bad_outbound_addr(impl):
    assert_fails(run(impl, ["--outbound-addr=bogus", "1", "tap0"]), "outbound")


@nsnet_only
@pytest.mark.parametrize("args,pattern", [
    (["--bypass-bytes=at-close"], "--bypass-bytes needs --bypass-listener"),
    (["--bypass-listener=/nonexistent/x.sock", "--bypass-bytes=exact"],
     "--bypass-bytes must be sampled or at-close"),
])
def test_bypass_bytes_refused(impl, args, pattern):
    assert_fails(run(impl, [*args, "1", "tap0"]), pattern)


# ---- bad arguments that only show with a live target ----------------------

@unpriv_only
def test_mtu_below_libslirp_minimum(impl, ns, user):
    assert_fails(run(impl, ["-c", "--mtu", "67", ns.pid, "tap0"], user=user))


@unpriv_only
def test_bad_macaddress(impl, ns, user):
    assert_fails(run(impl, ["-c", "--macaddress", "11:22", ns.pid, "tap0"], user=user))


@unpriv_only
def test_api_socket_path_too_long(impl, ns, user, workdir):
    path = os.path.join(workdir, "s" * (108 - len(workdir) - 1))
    assert len(path.encode()) == 108
    assert_fails(run(impl, ["-c", "-a", path, ns.pid, "tap0"], user=user))
    assert not os.path.exists(path)


@unpriv_only
def test_api_socket_path_107_bytes_works(impl, ns, start_fwd, workdir):
    path = os.path.join(workdir, "s" * (107 - len(workdir) - 1))
    assert len(path.encode()) == 107
    start_fwd(impl, ["-c", "-a", path, ns.pid, "tap0"])
    assert os.path.exists(path)


@unpriv_only
def test_api_socket_unbindable(impl, ns, user):
    assert_fails(run(impl, ["-c", "-a", "/nonexistent/dir/api.sock", ns.pid, "tap0"], user=user))


@unpriv_only
def test_exit_fd_not_open_exits_zero(impl, ns, start_fwd):
    """POLLNVAL on the exit-fd counts as an exit request (slirp4netns behaviour):
    it starts up completely (ready byte), then exits 0."""
    fwd = start_fwd(impl, ["-c", "-e", "99", ns.pid, "tap0"], wait=False)
    assert fwd.read_ready_to_eof(timeout=15) == b"1"
    assert fwd.wait_exit(10) == 0


@nsnet_only
@unpriv_only
@pytest.mark.parametrize("tap", ["abcdefghijklmnop", "tap0123456789abcdef"])
def test_nsnet_tapname_too_long(impl, ns, user, tap):
    """slirp4netns silently truncates to 15 bytes; nsnet refuses."""
    assert_fails(run(impl, ["-c", ns.pid, tap], user=user))


@unpriv_only
def test_tapname_15_bytes(impl, ns, start_fwd):
    start_fwd(impl, ["-c", ns.pid, "abcdefghijklmno"])
    assert ns.link("abcdefghijklmno")["addr_info"][0]["local"] == "10.0.2.100"


# ---- help and version -----------------------------------------------------

def test_help(impl):
    for flag in ("-h", "--help"):
        cp = run(impl, [flag])
        assert cp.returncode == 0, cp.stderr
        assert "usage" in cp.stdout.lower()


def slirp4netns_options() -> tuple[set[str], set[str]]:
    out = subprocess.run([SLIRP4NETNS_BIN, "--help"], capture_output=True, text=True,
                         timeout=10).stdout
    longs = set(re.findall(r"(?m)(?:^|\s)(--[a-z0-9][a-z0-9-]*)", out))
    shorts = set(re.findall(r"(?m)^(-[a-z0-9]), --", out))
    return longs, shorts


@nsnet_only
def test_nsnet_help_lists_every_slirp4netns_option(impl):
    longs, shorts = slirp4netns_options()
    assert len(longs) >= 19 and len(shorts) >= 8, (longs, shorts)
    cp = run(impl, ["--help"])
    assert cp.returncode == 0
    missing = [o for o in sorted(longs) if not re.search(re.escape(o) + r"\b", cp.stdout)]
    assert not missing, f"missing from nsnet --help: {missing}"
    missing = [o for o in sorted(shorts) if not re.search(rf"(?m)^\s*{o}, --", cp.stdout)]
    assert not missing, f"short options missing from nsnet --help: {missing}"


@nsnet_only
@pytest.mark.parametrize("alias", ["--no-host-loopback", "--create-sandbox"])
def test_nsnet_accepts_aliases(impl, alias):
    """Undocumented aliases slirp4netns accepts; a bad MTU then still fails on the MTU."""
    assert_fails(run(impl, [alias, "--mtu", "0", "1", "tap0"]), "mtu")


def test_version(impl):
    for flag in ("-v", "--version"):
        cp = run(impl, [flag])
        assert cp.returncode == 0, cp.stderr
        lines = cp.stdout.splitlines()
        prefixes = [f"{impl.name} version ", "commit: ", "libslirp: ",
                    "SLIRP_CONFIG_VERSION_MAX: ", "libseccomp: "]
        assert len(lines) >= len(prefixes), lines
        for line, prefix in zip(lines, prefixes):
            assert line.startswith(prefix), (line, prefix)
        assert re.fullmatch(r"libslirp: \d+\.\d+\.\d+.*", lines[2]), lines[2]
        assert re.fullmatch(r"SLIRP_CONFIG_VERSION_MAX: \d+", lines[3]), lines[3]


@nsnet_only
def test_nsnet_version_reports_libslirp_it_links(impl):
    """The same libslirp as the system's slirp4netns on this machine."""
    ours = run(impl, ["-v"]).stdout.splitlines()
    theirs = subprocess.run([SLIRP4NETNS_BIN, "-v"], capture_output=True, text=True,
                            timeout=10).stdout.splitlines()
    assert ours[2] == theirs[2]  # libslirp: 4.7.0

