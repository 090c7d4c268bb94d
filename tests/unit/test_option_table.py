"""The option table (nsnet/options.py) is the one source of the command
line's parsing and --help, `nsnet run`'s, and the Python API's keywords,
defaults and flags.  Unit tests: no namespace, no root needed."""
import importlib
import inspect

import pytest

from nsnet import client, options as O
from nsnet.cli import LONG_OPTS, SHORT_OPTS, usage



def _run_module():
    """nsnet/run.py, without letting the submodule shadow the API's
    nsnet.run() for the other tests of this process."""
    import nsnet

    saved = nsnet.__dict__.get("run")
    mod = importlib.import_module("nsnet.run")
    if saved is None:
        del nsnet.run
    else:
        nsnet.run = saved
    return mod


run_mod = _run_module()

pytestmark = pytest.mark.timeout(60)

# slirp4netns 1.2.0's section of `nsnet --help`, byte for byte as nsnet
# printed it before the table: RootlessKit and Podman grep this text.
S4N_HELP = """\
-c, --configure          bring up the interface
-e, --exit-fd=FD         specify the FD for terminating nsnet
-r, --ready-fd=FD        specify the FD to write to when the network is configured
-m, --mtu=MTU            specify MTU (default=1500, max=65521)
-6, --enable-ipv6        enable IPv6 (experimental)
-a, --api-socket=PATH    specify API socket path
--cidr=CIDR              specify network address CIDR (default=10.0.2.0/24)
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
                         (alias --no-host-loopback)
--netns-type=TYPE        specify network namespace type ([path|pid], default=pid)
--userns-path=PATH       specify user namespace path
--enable-sandbox         run the forwarder in a new mount namespace with no
                         capabilities (alias --create-sandbox)
--enable-seccomp         enable seccomp to limit syscalls (an allowlist)
--outbound-addr=IPv4     sets outbound ipv4 address (or interface) to bound to
--outbound-addr6=IPv6    sets outbound ipv6 address (or interface) to bound to
--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns redirect
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
--target-type=TYPE       specify the target type ([netns|bess], default=netns)
-h, --help               show this help and exit
-v, --version            show version and exit
"""

S4N_LONG_PREFIX = [
    "configure", "exit-fd=", "ready-fd=", "mtu=", "cidr=", "disable-host-loopback",
    "no-host-loopback", "netns-type=", "userns-path=", "api-socket=", "enable-ipv6",
    "enable-sandbox", "create-sandbox", "enable-seccomp", "outbound-addr=", "outbound-addr6=",
    "disable-dns", "macaddress=", "target-type=", "help", "version",
]


def test_slirp4netns_help_section_unchanged():
    text = usage()
    assert "\n" + S4N_HELP + "\nnsnet options:\n" in text
    assert text.startswith("Usage: nsnet [OPTION]... PID|PATH [TAPNAME]\n")


def test_slirp4netns_getopt_tables_unchanged():
    assert LONG_OPTS[:len(S4N_LONG_PREFIX)] == S4N_LONG_PREFIX
    assert SHORT_OPTS == "ce:r:m:6a:hv"


@pytest.mark.parametrize("front", O.FRONTS)
def test_every_option_is_in_its_help(front):
    text = usage() if front == O.ATTACH else run_mod.usage()
    for o in O.rows(front):
        assert f"--{o.name}" in text, o
        if o.short:
            assert f"-{o.short}, --{o.name}" in text, o
    # and nothing of another front end
    for o in O.TABLE:
        if front not in o.fronts and not any(front in O.BY_NAME[a].fronts for a in [o.name]):
            assert f"--{o.name}=" not in text and f"--{o.name} " not in text, o


def test_defaults_typed_once():
    """The Python API's keyword defaults are the command line's."""
    want_a = O.api_keywords(O.ATTACH)
    for name, p in inspect.signature(client.attach).parameters.items():
        if name in want_a:
            assert p.default == want_a[name], name
    want_r = O.api_keywords(O.RUN)
    for fn in (client.run_flags, client.Popen.__init__):
        for name, p in inspect.signature(fn).parameters.items():
            if name in want_r and p.default is not None and name != "publish":
                assert p.default == want_r[name], (fn, name)
    assert O.default("offload", O.ATTACH) is True and O.default("offload", O.RUN) is True
    assert O.default("mtu") == 1500 and O.default("cidr") == "10.0.2.0/24"


def test_api_false_offload_passes_no_offload():
    """attach(offload=False) used to pass nothing: nsnet ran with offloads on."""
    assert "--no-offload" in O.api_flags(O.ATTACH, {"offload": False})
    assert O.api_flags(O.ATTACH, {"offload": True}) == []
    assert "--no-offload" in client.run_flags(offload=False)
    assert client.run_flags() == []


def test_api_dns_follows_the_table():
    """nsnet.run/Popen's dns: None (the table's default) passes nothing, so
    names resolve through nsnet as on the command line; False is --no-dns."""
    assert O.default("dns", O.RUN) is None
    assert client.run_flags() == [] and client.run_flags(dns=None) == []
    assert client.run_flags(dns=False) == ["--no-dns"]
    assert client.run_flags(dns=True) == ["--dns"]
    for dns in (None, False, True):
        v, _, _ = O.parse(O.RUN, client.run_flags(dns=dns))
        assert v["dns"] is dns


def test_api_flags_round_trip():
    """What the API passes parses back to the values it was given."""
    kw = dict(mtu=9000, cidr="10.9.0.0/24", ipv6=True, disable_host_loopback=True,
              no_egress=True, disable_dns=True, offload=False, enable_sandbox=True,
              enable_seccomp=True, exit_with_target=False, log_level="debug",
              max_restarts=2, restart_window=5.5, pidfile="/tmp/p")
    v, _, _ = O.parse(O.ATTACH, O.api_flags(O.ATTACH, kw))
    assert (v["mtu"], v["cidr"], v["ipv6"], v["disable_host_loopback"], v["no_egress"],
            v["disable_dns"], v["offload"], v["sandbox"], v["seccomp"], v["exit_with_target"],
            v["log_level"], v["max_restarts"], v["restart_window"], v["pidfile"]) == (
        9000, "10.9.0.0/24", True, True, True, True, False, True, True, False, "debug", 2,
        5.5, "/tmp/p")
    flags = client.run_flags(publish=["8080:80"], map_user="subids", tapname="eth1",
                             enable_sandbox=True, outbound_addr="127.0.0.1")
    v, _, _ = O.parse(O.RUN, flags)
    assert (v["publish"], v["map_user"], v["tapname"], v["sandbox"], v["outbound4"]) == (
        ["8080:80/tcp"], "subids", "eth1", True, "127.0.0.1")


def test_api_unknown_keyword():
    with pytest.raises(TypeError, match="bogus"):
        client.run_flags(bogus=1)
    with pytest.raises(TypeError, match="macaddress"):
        client.run_flags(macaddress="02:00:00:00:00:01")  # attach only
    with pytest.raises(ValueError):
        O.api_flags(O.RUN, {"map_user": "nobody"})


def test_run_takes_the_attach_options_that_make_sense():
    ro = run_mod.parse_args(["--enable-sandbox", "--enable-seccomp", "--disable-dns",
                             "--outbound-addr=127.0.0.1", "--outbound-addr6=::1", "-6",
                             "--pidfile=/tmp/x.pid", "--tapname=eth0", "--", "true"])
    assert (ro.sandbox, ro.seccomp, ro.net.disable_dns, ro.net.outbound_addr,
            ro.net.outbound_addr6, ro.pidfile, ro.tapname, ro.net.offload) == (
        True, True, True, "127.0.0.1", "::1", "/tmp/x.pid", "eth0", True)
    with pytest.raises(run_mod.UsageError, match="--disable-dns"):
        run_mod.parse_args(["--dns", "--disable-dns", "--", "true"])
    with pytest.raises(run_mod.UsageError, match="TAP name"):
        run_mod.parse_args(["--tapname=" + "x" * 16, "--", "true"])


def test_quiet_is_log_level_warning():
    v, _, _ = O.parse(O.ATTACH, ["--quiet", "1", "tap0"])
    assert v["log_level"] == "warning"
    v, _, _ = O.parse(O.RUN, ["--quiet", "true"], posix=True)
    assert v["log_level"] == "warning"


def test_socket_path_limit_once():
    assert O.socket_path("a" * 107) == "a" * 107
    with pytest.raises(O.OptionError, match="max 107"):
        O.socket_path("a" * 108)


@pytest.mark.parametrize("what,path", [("man", "man/nsnet.1"), ("bash", "completion/nsnet")])
def test_generated_files_follow_the_table(what, path):
    """man/nsnet.1 and completion/nsnet are generated from the table:
    `python3 -m nsnet.manpage man > man/nsnet.1` (and bash) after adding an option."""
    import os

    from nsnet import manpage

    here = os.path.join(os.path.dirname(__file__), "..", "..", path)
    with open(here) as f:
        committed = f.read()
    assert committed == (manpage.man() if what == "man" else manpage.bash()), \
        f"{path} is out of date: python3 -m nsnet.manpage {what} > {path}"
    for o in O.TABLE:
        assert f"--{o.name}".replace("-", "\\-" if what == "man" else "-") in committed, o


@pytest.mark.parametrize("text,msg", [
    ("fd00:1::/48", "needs a /64"), ("fd00:1::", "needs a /64"), ("fd00:1::1/64", "network address"),
    ("bogus/64", "invalid IPv6 prefix"), ("fe80::/64", "not a unicast prefix"),
    ("10.0.2.0/24", "invalid IPv6 prefix"),
])
def test_cidr6_refused(text, msg):
    from nsnet.netconfig import ConfigError, parse_cidr6

    with pytest.raises(ConfigError, match=msg):
        parse_cidr6(text)


def test_cidr6_addresses():
    from nsnet.netconfig import NetConfig, parse_cidr6

    net = NetConfig(ipv6=True, cidr6=parse_cidr6("fd00:1:2:3::/64"))
    assert (str(net.prefix6), str(net.gateway6), str(net.dns6)) == (
        "fd00:1:2:3::", "fd00:1:2:3::2", "fd00:1:2:3::3")
    assert NetConfig.from_wire(net.to_wire()) == net
    assert str(NetConfig(ipv6=True).gateway6) == "fd00::2"
    with pytest.raises(run_mod.UsageError, match="needs -6"):
        run_mod.parse_args(["--cidr6=fd00:1::/64", "--", "true"])
