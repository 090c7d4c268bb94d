"""nsnet's getopt_long: the same options and operands as the standard
library's GNU scanner, and the same refusals, word for word, as the
slirp4netns binary (glibc's getopt_long)."""
import getopt
import subprocess

import pytest

from harness import SLIRP4NETNS_BIN
from nsnet.cli import LONG_OPTS, SHORT_OPTS
from nsnet.getopt_long import GetoptError, getopt_long

pytestmark = pytest.mark.timeout(60)

ACCEPTED = [
    [],
    ["1", "tap0"],
    ["-c", "1", "tap0"],
    ["1", "-c", "tap0", "--mtu", "65520"],
    ["-c6m1500", "1"],
    ["-m", "1500", "-r", "3", "-e4", "1", "tap0"],
    ["--mtu=9000", "--ready-fd", "5", "1", "tap0"],
    ["--mt", "9000", "1"],  # unique prefix
    ["--conf", "--disable-d", "1"],
    ["--outbound-addr", "127.0.0.1", "1"],  # exact match beats the longer name
    ["--outbound-addr6=::1", "1"],
    ["--mtu=", "1"],  # an empty argument is still an argument
    ["-", "1"],
    ["-c", "--", "-m", "1500", "--mtu"],
    ["--api-socket", "--", "1"],  # an argument may look like anything
    ["-a", "-c", "1"],
]


@pytest.mark.parametrize("argv", ACCEPTED, ids=lambda a: " ".join(a) or "empty")
def test_accepts_what_gnu_getopt_accepts(argv, monkeypatch):
    monkeypatch.delenv("POSIXLY_CORRECT", raising=False)
    want = getopt.gnu_getopt(argv, SHORT_OPTS, LONG_OPTS)
    assert getopt_long(argv, SHORT_OPTS, LONG_OPTS) == want


def test_posix_mode_stops_at_the_first_operand(monkeypatch):
    monkeypatch.delenv("POSIXLY_CORRECT", raising=False)
    argv = ["-m", "1500", "cmd", "-c", "--mtu", "9"]
    want = ([("-m", "1500")], ["cmd", "-c", "--mtu", "9"])
    assert getopt_long(argv, "+" + SHORT_OPTS, LONG_OPTS) == want
    assert getopt.getopt(argv, SHORT_OPTS, LONG_OPTS) == want
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    assert getopt_long(argv, SHORT_OPTS, LONG_OPTS) == want


# Refusals, as glibc words them; slirp4netns shares these options.
REFUSED = [
    (["--bogus", "1"], "unrecognized option '--bogus'"),
    (["--bogus=3", "1"], "unrecognized option '--bogus=3'"),
    (["--dis", "1"], "option '--dis' is ambiguous; possibilities: "
                     "'--disable-host-loopback' '--disable-dns'"),
    (["--dis=3", "1"], None),
    (["--e", "1"], None),
    (["--c", "1"], None),
    (["--enable-s", "1"], None),
    (["--outbound", "1"], None),
    (["--configure=1", "1"], "option '--configure' doesn't allow an argument"),
    (["--configure=", "1"], None),
    (["--no-host-loopback=3", "1"], None),
    (["--mtu"], "option '--mtu' requires an argument"),
    (["--mt"], None),
    (["-m"], "option requires an argument -- 'm'"),
    (["-c6x", "1"], "invalid option -- 'x'"),
    (["-z", "1"], None),
]


@pytest.mark.parametrize("argv,text", REFUSED, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_refusals_match_glibc(argv, text):
    with pytest.raises(GetoptError) as e:
        getopt_long(argv, SHORT_OPTS, LONG_OPTS)
    if text is not None:
        assert str(e.value) == text
    cp = subprocess.run(["slirp4netns", *argv], executable=SLIRP4NETNS_BIN,
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode == 1
    theirs = cp.stderr.splitlines()[0]
    ours = f"slirp4netns: {e.value}"
    if "is ambiguous; possibilities:" in theirs:
        # nsnet's own options (the option table) may add possibilities,
        # listed after slirp4netns's, which keep glibc's order.
        assert ours.startswith(theirs), (ours, theirs)
    else:
        assert ours == theirs


@pytest.mark.parametrize("argv", [["--no"], ["--r"], ["--log"]])
def test_nsnet_options_make_more_prefixes_ambiguous(argv):
    with pytest.raises(GetoptError, match="is ambiguous; possibilities: '--"):
        getopt_long(argv, SHORT_OPTS, LONG_OPTS)
