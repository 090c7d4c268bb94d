"""The option table: every command-line option of every front end, once.

Each row says the flag (long name, short letter, aliases), whether it takes
an argument (its metavar), how the argument is checked and converted, the
default, the help text, which front ends take it, and the keyword of the
Python API that sets it.  From this table come:

- `nsnet`'s (the slirp4netns-compatible command line's) getopt tables,
  parsing and `--help` text (nsnet/cli.py),
- `nsnet run`'s (nsnet/run.py),
- the flags the Python API passes for its keyword arguments, and their
  defaults (nsnet/client.py),
- the man page (scripts/mkman.py) and the bash completion.

Adding an option is adding one row (and using its value where it matters:
`parse()` returns a dict, dest -> value).  Front ends:

    ATTACH  nsnet [OPTION]... PID|PATH [TAPNAME]      (slirp4netns's)
    RUN     nsnet run [OPTION]... [--] COMMAND [ARG]...

This module imports nothing heavy: it is on the path to ready.
"""

from __future__ import annotations

ATTACH = "attach"
RUN = "run"
FRONTS = (ATTACH, RUN)

# sockaddr_un.sun_path, NUL included: a socket path has at most 107 bytes.
SUN_PATH_MAX = 108

_MISSING = object()


class OptionError(ValueError):
    """A bad option value; str() is the message (without the program name)."""


# --------------------------------------------------------------------------
# Converters: str -> value, OptionError with slirp4netns's wording where
# slirp4netns has one.
# --------------------------------------------------------------------------

def nonneg_int(what: str):
    def conv(value: str) -> int:
        try:
            n = int(value, 10)
        except ValueError:
            n = -1
        if n < 0:
            raise OptionError(f"{what} must be a non-negative integer")
        return n
    return conv


def mtu(value: str) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        n = 0
    if n <= 0 or n > 65521:
        raise OptionError("MTU must be a positive integer (< 65522)")
    return n


def seconds(what: str):
    def conv(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            x = 0.0
        if not x > 0 or x == float("inf"):
            raise OptionError(f"{what} must be a number of seconds")
        return x
    return conv


def choice(what: str, *values: str, one_of: bool = False):
    def conv(value: str) -> str:
        if value not in values:
            listed = ("one of " + ", ".join(values) if one_of
                      else ", ".join(values[:-1]) + f" or {values[-1]}")
            raise OptionError(f"{what} must be {listed}")
        return value
    conv.choices = values  # type: ignore[attr-defined]
    return conv


def text(value: str) -> str:
    return value


def policy_rule(action: str):
    """--allow/--deny RULE -> (action, RULE), checked (nsnet/policy.py)."""
    def conv(value: str) -> tuple[str, str]:
        from .policy import PolicyError, parse_rule

        try:
            parse_rule(value, action)
        except PolicyError as e:
            raise OptionError(str(e)) from None
        return (action, value)
    return conv


def unix_socket_path(what: str):
    """A path for a unix socket: 1 to SUN_PATH_MAX-1 bytes."""
    def conv(value: str) -> str:
        n = len(value.encode())
        if n == 0 or n >= SUN_PATH_MAX:
            raise OptionError(f"{what} path too long ({n} bytes, max {SUN_PATH_MAX - 1})"
                              if n else f"{what} path is empty")
        return value
    return conv


socket_path = unix_socket_path("API socket")


def check_socket_path(path: str) -> str:
    return socket_path(path)


def fd_number(what: str):
    return nonneg_int(what)


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

class Opt:
    """One row.  name: the long name without "--"; short: its letter;
    arg: the metavar if it takes an argument (None: a switch that stores
    `value`); conv: str -> value for an argument; dest: the key in the
    parsed dict (several rows may share one: --offload/--no-offload);
    default: the value when absent (defaults: per front end, only where a
    front end deliberately differs); help: the help line(s), "{default}"
    is replaced; fronts: the front ends that take it; api: the Python
    API's keyword for it (None: not in the API); aliases: more long names
    (hidden); s4n: slirp4netns has it (its section of --help);
    multi: repeatable, values collected in a list; stop: --help/--version."""

    __slots__ = ("name", "short", "arg", "conv", "dest", "value", "default", "defaults",
                 "help", "run_help", "fronts", "api", "aliases", "s4n", "multi", "stop",
                 "complete")

    def __init__(self, name: str, *, short: str | None = None, arg: str | None = None,
                 conv=None, dest: str | None = None, value: object = True,
                 default: object = _MISSING, defaults: dict | None = None, help: str = "",
                 run_help: str | None = None, fronts: tuple[str, ...] = (ATTACH, RUN),
                 api: str | None = None, aliases: tuple[str, ...] = (), s4n: bool = False,
                 multi: bool = False, stop: bool = False, complete: str | None = None) -> None:
        self.name = name
        self.short = short
        self.arg = arg
        self.conv = conv if conv is not None else (text if arg else None)
        self.dest = dest or name.replace("-", "_")
        self.value = value
        if default is _MISSING:
            default = [] if multi else (None if arg else False)
        self.default = default
        self.defaults = defaults or {}
        self.help = help
        self.run_help = run_help
        self.fronts = fronts
        self.api = api
        self.aliases = aliases
        self.s4n = s4n
        self.multi = multi
        self.stop = stop
        # bash completion of the argument: "file", "dir", "pid", or a
        # space-separated word list (None: choices of conv, else nothing)
        self.complete = complete

    def default_for(self, front: str) -> object:
        d = self.defaults.get(front, self.default)
        return list(d) if isinstance(d, list) else d

    def help_for(self, front: str) -> str:
        h = self.run_help if front == RUN and self.run_help is not None else self.help
        d = self.default_for(front)
        if isinstance(d, bool) or d is None:
            d = ""
        return h.replace("{default}", str(d))

    def takes_arg(self) -> bool:
        return self.arg is not None

    def flag_text(self) -> str:
        """"-m, --mtu=MTU" or "--cidr=CIDR"."""
        left = f"-{self.short}, --{self.name}" if self.short else f"--{self.name}"
        return left + (f"={self.arg}" if self.arg else "")

    def __repr__(self) -> str:
        return f"<Opt --{self.name}>"


# --pcap-max-bytes's default: 1 GiB.
PCAP_MAX_BYTES = 1 << 30

LOG_LEVELS = ("debug", "info", "warning", "error")
# --bypass-bytes (docs/bypass.md, "Bytes"): absent is the default (the
# option needs --bypass or --bypass-listener, so "given" must show)
BYPASS_BYTES = ("sampled", "at-close")
BYPASS_BYTES_DEFAULT = "sampled"
LOG_FORMATS = ("text", "json")

# Help order: slirp4netns's --help order first (its section of `nsnet
# --help`), then nsnet's.  The getopt order of slirp4netns's long options
# (which glibc lists the possibilities of an ambiguous abbreviation in) is
# S4N_GETOPT_ORDER below; nsnet's own follow in table order.
TABLE: list[Opt] = [
    # ---- nsnet run only (first in its --help)-----------------------------------------------
    Opt("publish", short="p", arg="[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]", multi=True,
        fronts=(RUN,), api="publish",
        help="publish a port of COMMAND's on the host (repeatable;\n"
             "HOST_IP defaults to 0.0.0.0; IPv6 as [::1]:8080:80)"),
    Opt("publish-mode", arg="MODE", conv=choice("--publish-mode", "splice", "slirp", one_of=True),
        default="splice", fronts=(RUN,), api="publish_mode",
        help="splice (default): TCP through nsnet's fast path;\n"
             "slirp: through libslirp; both to the namespace's\n"
             "address (not its loopback)"),
    Opt("dns", value=True, default=None, fronts=(RUN,), api="dns",
        help="resolve names through nsnet (the default, unless\n"
             "--disable-dns): a resolv.conf naming the built-in\n"
             "DNS (CIDR+3, fd00::3 with -6) is bind-mounted over\n"
             "/etc/resolv.conf in COMMAND's mount namespace only"),
    Opt("no-dns", dest="dns", value=False, default=None, fronts=(RUN,), api="dns",
        help="keep the host's /etc/resolv.conf in COMMAND"),
    Opt("tapname", arg="NAME", default="tap0", fronts=(RUN,), api="tapname",
        help="the name of the TAP in COMMAND's namespace (default {default})"),
    Opt("error-fd", arg="FD", conv=nonneg_int("error-fd"), fronts=(RUN,),
        help="write the error that stops nsnet to FD too (one line;\n"
             "for programs that leave stderr to COMMAND)"),
    Opt("bypass", fronts=(RUN,), api="bypass",
        help="COMMAND's TCP connects to the host (the gateway\n"
             "alias) and beyond get sockets connected in the\n"
             "host's network namespace: loopback speed (seccomp\n"
             "user notification, Linux 5.14; docs/bypass.md)"),
    Opt("bypass-listener", arg="PATH", conv=unix_socket_path("--bypass-listener socket"),
        fronts=(ATTACH,), api="bypass_listener", complete="file",
        help="accept the seccomp listener of containers an OCI\n"
             "runtime starts in the target's network namespace\n"
             "(linux.seccomp.listenerPath=PATH in config.json):\n"
             "their TCP connects get the socket bypass of\n"
             "`nsnet run --bypass` (docs/bypass.md, \"OCI\")"),
    Opt("bypass-bytes", arg="MODE", conv=choice("--bypass-bytes", *BYPASS_BYTES),
        default=None, api="bypass_bytes",
        help="how get_stats counts the bytes of bypassed\n"
             "connections (with --bypass-listener): sampled\n"
             "(default: every 1 s; a closed one counts to its last\n"
             "sample) or at-close (exact; the kernel then builds a\n"
             "notification for every TCP socket the host frees)",
        run_help="how get_stats counts the bytes of bypassed\n"
                 "connections (with --bypass): sampled (default:\n"
                 "every 1 s; a closed one counts to its last sample)\n"
                 "or at-close (exact; the kernel then builds a\n"
                 "notification for every TCP socket the host frees)"),
    Opt("share-pid", fronts=(RUN,), api="share_pid",
        help="keep the caller's PID namespace (default: COMMAND\n"
             "gets its own, behind a small init of nsnet's, so it\n"
             "cannot see or signal nsnet's processes)"),
    Opt("map-root-user", dest="map_user", value="root", default="root", fronts=(RUN,),
        api="map_user",
        help="map your uid/gid to root in the namespace (default)"),
    Opt("map-current-user", dest="map_user", value="current", default="root", fronts=(RUN,),
        api="map_user",
        help="map your uid/gid to themselves"),
    Opt("map-subids", dest="map_user", value="subids", default="root", fronts=(RUN,),
        api="map_user",
        help="map root to you and 1..N to your /etc/subuid and\n"
             "/etc/subgid ranges (newuidmap/newgidmap)"),
    # ---- slirp4netns 1.2.0 ------------------------------------------------
    Opt("configure", short="c", fronts=(ATTACH,), s4n=True,
        help="bring up the interface"),
    Opt("exit-fd", short="e", arg="FD", conv=nonneg_int("exit-fd"), fronts=(ATTACH,), s4n=True,
        help="specify the FD for terminating nsnet"),
    Opt("ready-fd", short="r", arg="FD", conv=nonneg_int("ready-fd"), s4n=True,
        help="specify the FD to write to when the network is configured",
        run_help='write "1" to FD once the network is ready'),
    Opt("mtu", short="m", arg="MTU", conv=mtu, default=1500, s4n=True, api="mtu",
        help="specify MTU (default={default}, max=65521)",
        run_help="MTU of the TAP (default {default}, 68..65521)"),
    Opt("enable-ipv6", short="6", s4n=True, api="ipv6", dest="ipv6",
        help="enable IPv6 (experimental)",
        run_help="IPv6 too (fd00::/64, address by SLAAC)"),
    Opt("api-socket", short="a", arg="PATH", conv=socket_path, s4n=True, complete="file",
        help="specify API socket path",
        run_help="the JSON API socket (slirp4netns's, plus get_info\nand get_stats)"),
    Opt("cidr", arg="CIDR", default="10.0.2.0/24", s4n=True, api="cidr",
        help="specify network address CIDR (default={default})",
        run_help="virtual network (default {default}: COMMAND is\n"
                 ".100, the gateway .2 is the host's loopback, .3 DNS)"),
    Opt("disable-host-loopback", aliases=("no-host-loopback",), s4n=True,
        api="disable_host_loopback",
        help="prohibit connecting to 127.0.0.1:* on the host namespace\n"
             "(alias --no-host-loopback)",
        run_help="no connections to the host's 127.0.0.1 via .2\n(alias --no-host-loopback)"),
    Opt("netns-type", arg="TYPE", default="pid",
        fronts=(ATTACH,), s4n=True, complete="pid path",
        help="specify network namespace type ([path|pid], default={default})"),
    Opt("userns-path", arg="PATH", fronts=(ATTACH,), s4n=True, complete="file",
        help="specify user namespace path"),
    Opt("enable-sandbox", aliases=("create-sandbox",), dest="sandbox", s4n=True,
        api="enable_sandbox",
        help="run the forwarder in a new mount namespace with no\n"
             "capabilities (alias --create-sandbox)"),
    Opt("enable-seccomp", dest="seccomp", s4n=True, api="enable_seccomp",
        help="enable seccomp to limit syscalls (an allowlist)"),
    Opt("outbound-addr", arg="IPv4", dest="outbound4", s4n=True, api="outbound_addr",
        help="sets outbound ipv4 address (or interface) to bound to"),
    Opt("outbound-addr6", arg="IPv6", dest="outbound6", s4n=True, api="outbound_addr6",
        help="sets outbound ipv6 address (or interface) to bound to"),
    Opt("disable-dns", s4n=True, api="disable_dns",
        help="disables 10.0.2.3 (or configured internal ip) to host dns redirect"),
    Opt("macaddress", arg="MAC", dest="mac", fronts=(ATTACH,), s4n=True, api="macaddress",
        help="specify the MAC address of the TAP (only valid with -c)"),
    Opt("target-type", arg="TYPE", default="netns", fronts=(ATTACH,), s4n=True,
        complete="netns bess",
        help="specify the target type ([netns|bess], default={default})"),
    Opt("help", short="h", stop=True, s4n=True, help="show this help and exit"),
    Opt("version", short="v", stop=True, fronts=(ATTACH,), s4n=True,
        help="show version and exit"),
    # ---- nsnet's own -------------------------------------------------------
    Opt("no-egress", api="no_egress",
        help="nothing leaves the namespace (libslirp's restricted mode);\n"
             "forwarded ports still work",
        run_help="nothing leaves the namespace (libslirp's restricted\n"
                 "mode); published ports still work"),
    Opt("offload", dest="offload", value=True, default=True, api="offload",
        help="TAP offloads (TSO, checksum) between the namespace and nsnet (default)",
        run_help="TAP offloads (TSO, checksum) on the TAP (default)"),
    Opt("no-offload", dest="offload", value=False, default=True, api="offload",
        help="no TAP offloads: plain frames of at most the MTU on the TAP"),
    Opt("ignore-target-exit", dest="exit_with_target", value=False, default=True,
        fronts=(ATTACH,), api="exit_with_target",
        help="keep running when the target PID exits (slirp4netns's behaviour)"),
    Opt("max-restarts", arg="N", conv=nonneg_int("max-restarts"), default=5, api="max_restarts",
        help="forwarder restarts allowed within the window (default={default})"),
    Opt("restart-window", arg="SECONDS", conv=seconds("restart-window"), default=60,
        api="restart_window",
        help="the window for --max-restarts (default={default})"),
    Opt("pidfile", arg="PATH", api="pidfile", complete="file",
        help="write the supervisor's PID to PATH",
        run_help="write nsnet's PID to PATH"),
    Opt("log-level", arg="LEVEL", conv=choice("log-level", *LOG_LEVELS), default="info",
        defaults={RUN: "warning"}, api="log_level",
        help="debug, info, warning or error (default={default})",
        run_help="debug, info, warning or error (default {default}:\n"
                 "nsnet run is silent when all goes well)"),
    Opt("log-format", arg="FORMAT", conv=choice("log-format", *LOG_FORMATS), default="text",
        api="log_format",
        help="text or json (default={default})"),
    Opt("cidr6", arg="PREFIX/64", api="cidr6",
        help="the IPv6 prefix with -6 (default fd00::/64): gateway ::2,\n"
             "DNS ::3, the namespace's address by SLAAC"),
    Opt("name", arg="NAME", api="name",
        help="name this instance for nsnet ctl --instance and nsnet ps;\n"
             "without -a, its API socket goes in the registry"),
    # ---- the egress policy (nsnet/policy.py, docs/policy.md) ---------------
    Opt("egress", arg="allow|deny", conv=choice("--egress", "allow", "deny"), api="egress",
        help="what a flow no rule matches gets (default allow)"),
    Opt("allow", arg="RULE", conv=policy_rule("allow"), dest="policy_rules", multi=True,
        api="allow",
        help="allow [PROTO:]DEST[:PORTS] (repeatable; rules in order,\n"
             "first match wins): tcp:10.0.2.2:8000, '*.example.org:443'"),
    Opt("deny", arg="RULE", conv=policy_rule("deny"), dest="policy_rules", multi=True,
        api="deny", help="deny [PROTO:]DEST[:PORTS] (repeatable, see --allow)"),
    Opt("policy", arg="FILE", dest="policy_file", api="policy_file", complete="file",
        help="the policy in JSON ({\"egress\":..,\"rules\":[..]}); --allow and\n"
             "--deny come after its rules, --egress replaces its default"),
    Opt("audit", arg="deny|all", conv=choice("--audit", "deny", "all"), default="deny",
        api="audit", help="log denied flows (default), or every flow"),
    Opt("audit-log", arg="FILE", api="audit_log", complete="file",
        help="also append the audit records (JSON lines) to FILE"),
    # ---- packet capture --------------------------------------------------
    Opt("pcap", arg="FILE", api="pcap", complete="file",
        help="capture every frame between the namespace and nsnet to\n"
             "FILE (pcap, for tcpdump -r and Wireshark; created mode\n"
             "0600 or truncated; never through a symbolic link)"),
    Opt("pcap-max-bytes", arg="BYTES", conv=nonneg_int("pcap-max-bytes"), default=PCAP_MAX_BYTES,
        api="pcap_max_bytes",
        help="stop capturing before FILE exceeds BYTES (default={default};\n"
             "0: no limit)"),
    Opt("quiet", short=None, dest="log_level", value="warning", fronts=(ATTACH, RUN),
        help="no start-up and ready lines: only warnings and errors\n"
             "(the same as --log-level=warning)"),
]

# slirp4netns's getopt_long table order (main.c), aliases in place.
S4N_GETOPT_ORDER = (
    "configure", "exit-fd", "ready-fd", "mtu", "cidr", "disable-host-loopback",
    "no-host-loopback", "netns-type", "userns-path", "api-socket", "enable-ipv6",
    "enable-sandbox", "create-sandbox", "enable-seccomp", "outbound-addr", "outbound-addr6",
    "disable-dns", "macaddress", "target-type", "help", "version",
)

BY_NAME: dict[str, Opt] = {}
for _o in TABLE:
    for _n in (_o.name, *_o.aliases):
        if _n in BY_NAME:
            raise AssertionError(f"option --{_n} is in the table twice")
        BY_NAME[_n] = _o


def rows(front: str) -> list[Opt]:
    return [o for o in TABLE if front in o.fronts]


def shortopts(front: str) -> str:
    return "".join(o.short + (":" if o.arg else "") for o in rows(front) if o.short)


def longopts(front: str) -> list[str]:
    """getopt_long's long names ("mtu=" takes an argument), in the order
    glibc would list an ambiguous abbreviation's possibilities."""
    names: list[str] = []
    mine = rows(front)
    if front == ATTACH:
        names = [n for n in S4N_GETOPT_ORDER if front in BY_NAME[n].fronts]
    for o in mine:
        for n in (o.name, *o.aliases):
            if n not in names:
                names.append(n)
    return [n + ("=" if BY_NAME[n].arg else "") for n in names]


def defaults(front: str) -> dict[str, object]:
    """dest -> default, for one front end."""
    out: dict[str, object] = {}
    for o in rows(front):
        out.setdefault(o.dest, o.default_for(front))
    return out


def default(dest: str, front: str = ATTACH) -> object:
    for o in TABLE:
        if o.dest == dest and front in o.fronts:
            return o.default_for(front)
    raise KeyError(dest)


def parse(front: str, argv: list[str], posix: bool = False
          ) -> tuple[dict[str, object], list[str], str | None]:
    """Scan and convert argv for one front end.

    Returns (values, operands, stop): values maps every dest of the front
    end to its value (defaults filled in); stop is the name of a --help or
    --version option seen (scanning stops there, as slirp4netns's does).
    Raises GetoptError for a word getopt refuses, OptionError for a bad
    value (in command-line order)."""
    from .getopt_long import getopt_long

    opts, operands = getopt_long(argv, ("+" if posix else "") + shortopts(front),
                                 longopts(front))
    values = defaults(front)
    by_short = {o.short: o for o in rows(front) if o.short}
    for flag, val in opts:
        o = by_short[flag[1]] if len(flag) == 2 else BY_NAME[flag[2:]]
        if o.stop:
            return values, operands, o.name
        v = o.conv(val) if o.arg else o.value
        if o.multi:
            values[o.dest].append(v)  # type: ignore[union-attr]
        else:
            values[o.dest] = v
    return values, operands, None


# --------------------------------------------------------------------------
# Help text
# --------------------------------------------------------------------------

ATTACH_COLUMN = 25
RUN_COLUMN = 29


def _lines(left: str, help_text: str, column: int) -> list[str]:
    parts = help_text.split("\n")
    if len(left) >= column:
        out = [left.rstrip()]
        first = 0
    else:
        out = [left.ljust(column) + parts[0]]
        first = 1
    out += [" " * column + p for p in parts[first:]]
    return out


def usage_rows(front: str, s4n: bool | None = None) -> str:
    """The option lines of --help (s4n: only slirp4netns's / only nsnet's)."""
    out: list[str] = []
    mine = rows(front)
    if front == RUN:  # --help last
        mine = [o for o in mine if not o.stop] + [o for o in mine if o.stop]
    for o in mine:
        if s4n is not None and o.s4n != s4n:
            continue
        if front == ATTACH:
            out += _lines(o.flag_text(), o.help_for(front), ATTACH_COLUMN)
        else:
            left = ("  " if o.short else "      ") + o.flag_text()
            out += _lines(left + "  " if len(left) + 2 < RUN_COLUMN else left,
                          o.help_for(front), RUN_COLUMN)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# The Python API: keyword arguments -> flags
# --------------------------------------------------------------------------

def api_keywords(front: str) -> dict[str, object]:
    """API keyword -> default, for one front end."""
    out: dict[str, object] = {}
    for o in rows(front):
        if o.api and o.api not in out:
            out[o.api] = o.default_for(front)
    return out


def api_flags(front: str, kwargs: dict[str, object], skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that give these API keyword values (those equal to the
    front end's default give none).  TypeError for a keyword the front end
    does not have; OptionError for a value no flag gives."""
    flags: list[str] = []
    known = api_keywords(front)
    for key, val in kwargs.items():
        if key in skip:
            continue
        if key not in known:
            raise TypeError(f"unexpected keyword argument {key!r}")
        if val is None or (not isinstance(val, list) and val == known[key]
                           and type(val) is type(known[key])):
            continue
        cands = [o for o in rows(front) if o.api == key]
        first = cands[0]
        if first.multi:
            flags += [f"--{first.name}={v}" for v in val]  # type: ignore[union-attr]
            continue
        if first.arg:
            if isinstance(val, bool):
                raise OptionError(f"{key} must not be a bool")
            flags.append(f"--{first.name}={val}")
            continue
        for o in cands:
            if o.value == val and type(o.value) is type(val):
                flags.append(f"--{o.name}")
                break
        else:
            if not (val == known[key]):
                want = ", ".join(repr(o.value) for o in cands)
                raise OptionError(f"{key} must be one of {want}, not {val!r}")
    return flags
