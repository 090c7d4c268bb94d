"""Command lines into configuration: `nsnet` (slirp4netns-compatible,
nsnet.cli.parse) and `nsnet run` (nsnet.run.parse_args).  The target is
this process's own namespace by path; nothing is started."""
from __future__ import annotations

import importlib

import pytest

from nsnet import cli, log

run = importlib.import_module("nsnet.run")  # nsnet.run the attribute is nsnet.run()

TARGET = ["--netns-type=path", "/proc/self/ns/net", "tap0"]


@pytest.fixture(autouse=True)
def _restore_log_level():
    yield
    log.setup("info", "text")


def net_of(*flags):
    opts = cli.parse([*flags, *TARGET])
    return opts.net


def test_defaults():
    net = net_of()
    assert not (net.restricted or net.disable_dns or net.disable_host_loopback or net.ipv6)
    assert net.outbound_addr is None and net.outbound_addr6 is None


@pytest.mark.parametrize("flag,field", [
    ("--no-egress", "restricted"),
    ("--disable-dns", "disable_dns"),
    ("--disable-host-loopback", "disable_host_loopback"),
    ("--enable-ipv6", "ipv6"),
])
def test_cli_flags_reach_the_net_config(flag, field):
    assert getattr(net_of(flag), field) is True


def test_cli_outbound_addresses():
    net = net_of("--outbound-addr=127.0.0.2", "--outbound-addr6", "::1")
    assert (net.outbound_addr, net.outbound_addr6) == ("127.0.0.2", "::1")
    assert net_of("--outbound-addr=lo").outbound_addr == "127.0.0.1"  # interface name


@pytest.mark.parametrize("argv,msg", [
    (["--target-type=bess"], "--target-type=bess is not supported by nsnet"),
    (["--target-type=vm"], '--target-type must be either "netns" or "bess"'),
    (["--log-level=trace"], "log-level must be debug, info, warning or error"),
    (["--outbound-addr=::1"], "outbound-addr has to be valid ipv4 address"),
    (["--outbound-addr6=127.0.0.1"], "outbound-addr6 has to be valid ipv6 address"),
    (["--macaddress=02:00:00:00:00:01"], "--macaddr cannot be specified"),
    (["--mtu=65522"], "MTU must be a positive integer"),
    (["--bypass-bytes=at-close"], "--bypass-bytes needs --bypass-listener"),
    (["--bypass-listener=/tmp/x.sock", "--bypass-bytes=exact"],
     "--bypass-bytes must be sampled or at-close"),
])
def test_cli_bad_options(argv, msg):
    with pytest.raises(cli.BadOption, match=msg):
        cli.parse([*argv, *TARGET])


def test_cli_main_bess_refusal_exit_code(capsys):
    assert cli.main(["--target-type=bess", *TARGET]) == 1
    assert "--target-type=bess is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("level,shown", [
    ("debug", ["d", "i", "w", "e"]),
    ("info", ["i", "w", "e"]),
    ("warning", ["w", "e"]),
    ("error", ["e"]),
])
def test_log_level_filters(capsys, level, shown):
    cli.parse([f"--log-level={level}", *TARGET])
    lg = log.get()
    lg.debug("d")
    lg.info("i")
    lg.warning("w")
    lg.error("e")
    lines = capsys.readouterr().err.splitlines()
    assert [ln.rsplit(" ", 1)[-1] for ln in lines] == shown


def test_run_no_egress_reaches_the_net_config():
    assert run.parse_args(["--no-egress", "true"]).net.restricted is True
    assert run.parse_args(["true"]).net.restricted is False


@pytest.mark.parametrize("flags,dns,explicit", [
    ([], True, False),                   # names resolve through nsnet by default
    (["--dns"], True, True),
    (["--no-dns"], False, False),
    (["--disable-dns"], False, False),   # no DNS to point at: the host's file
    (["--no-dns", "--dns"], True, True),  # the last one wins
])
def test_run_dns_default(flags, dns, explicit):
    ro = run.parse_args([*flags, "true"])
    assert (ro.dns, ro.dns_explicit) == (dns, explicit)


def test_run_options():
    ro = run.parse_args(["-6", "--mtu", "9000", "--cidr", "10.1.0.0/24", "-p",
                         "[::1]:8080:80", "--disable-host-loopback", "--", "sh", "-c", "x"])
    assert ro.net.ipv6 and ro.net.mtu == 9000 and str(ro.net.cidr) == "10.1.0.0/24"
    assert ro.net.disable_host_loopback
    assert [str(p) for p in ro.publish] == ["[::1]:8080:80/tcp"]
    assert ro.argv == ["sh", "-c", "x"]


@pytest.mark.parametrize("argv,msg", [
    (["-p", "[::1]:8080:80", "true"], "needs -6"),
    (["--mtu", "x", "true"], "MTU must be a positive integer"),  # the same words as nsnet
    (["--log-level", "loud", "true"], "log-level must be debug, info, warning or error"),
    (["-p", "80-82:80", "true"], "--publish"),
    (["--dns", "--disable-dns", "true"], "--dns names the built-in DNS"),
    (["--bypass-bytes=at-close", "true"], "--bypass-bytes needs --bypass "),
    (["--bypass-bytes=sampled", "true"], "--bypass-bytes needs --bypass "),
    (["--bypass", "--bypass-bytes=exact", "true"], "--bypass-bytes must be sampled or at-close"),
    (["--bypass", "--bypass-bytes=", "true"], "--bypass-bytes must be sampled or at-close"),
])
def test_run_bad_options(argv, msg):
    with pytest.raises(run.UsageError, match=msg):
        run.parse_args(argv)


@pytest.mark.parametrize("flags,mode", [
    ([], "sampled"),  # nothing subscribes to the kernel's TCP destroy notifications
    (["--bypass-bytes=sampled"], "sampled"),
    (["--bypass-bytes", "at-close"], "at-close"),
])
def test_bypass_bytes(flags, mode):
    """--bypass-bytes reaches what starts the handlers, in both front ends."""
    assert run.parse_args(["--bypass", *flags, "true"]).bypass_bytes == mode
    assert cli.parse(["--bypass-listener=/tmp/x.sock", *flags, *TARGET]).bypass_bytes == mode
