"""The command line: `nsnet [OPTION]... PID|PATH [TAPNAME]`, the same as
slirp4netns 1.2.0 (every flag, short form and alias; the same exit codes),
plus nsnet's own options and the `nsnet run` subcommand."""

from __future__ import annotations

import ipaddress
import os
import sys

from .getopt_long import GetoptError, getopt_long
from .netconfig import (
    ConfigError,
    NetConfig,
    check_mtu,
    check_tapname,
    parse_cidr,
    parse_mac,
)

PROG = "nsnet"
EXIT_OK = 0
EXIT_FAILURE = 1

USAGE = f"""\
Usage: {PROG} [OPTION]... PID|PATH [TAPNAME]
       {PROG} run [OPTION]... -- COMMAND [ARG]...
User-mode networking for unprivileged network namespaces.

-c, --configure          bring up the interface
-e, --exit-fd=FD         specify the FD for terminating {PROG}
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

nsnet options:
--no-egress              nothing leaves the namespace (libslirp's restricted mode);
                         forwarded ports still work
--offload                TAP offloads (TSO, checksum) between the namespace and nsnet (default)
--no-offload             no TAP offloads: plain frames of at most the MTU on the TAP
--ignore-target-exit     keep running when the target PID exits (slirp4netns's behaviour)
--max-restarts=N         forwarder restarts allowed within the window (default=5)
--restart-window=SECONDS the window for --max-restarts (default=60)
--pidfile=PATH           write the supervisor's PID to PATH
--log-level=LEVEL        debug, info, warning or error (default=info)
--log-format=FORMAT      text or json (default=text)
"""

SHORT_OPTS = "ce:r:m:6a:hv"
# slirp4netns's options in the order of its getopt_long table (the order
# glibc lists the possibilities of an ambiguous abbreviation in), then nsnet's.
LONG_OPTS = [
    "configure",
    "exit-fd=",
    "ready-fd=",
    "mtu=",
    "cidr=",
    "disable-host-loopback",
    "no-host-loopback",
    "netns-type=",
    "userns-path=",
    "api-socket=",
    "enable-ipv6",
    "enable-sandbox",
    "create-sandbox",
    "enable-seccomp",
    "outbound-addr=",
    "outbound-addr6=",
    "disable-dns",
    "macaddress=",
    "target-type=",
    "help",
    "version",
    # nsnet's own
    "no-egress",
    "offload",
    "no-offload",
    "ignore-target-exit",
    "max-restarts=",
    "restart-window=",
    "pidfile=",
    "log-level=",
    "log-format=",
]


class UsageError(Exception):
    """Bad command line: message on stderr, usage on stdout, exit 1."""


class BadOption(Exception):
    """A bad option value: message on stderr, exit 1."""


def _nonneg_int(value: str, what: str) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise BadOption(f"{what} must be a non-negative integer") from None
    if n < 0:
        raise BadOption(f"{what} must be a non-negative integer")
    return n


def resolve_outbound(value: str, family: int) -> str:
    """An address of the given family, or the first one of an interface."""
    import socket

    kind = "ipv4" if family == 4 else "ipv6"
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version != family:
            raise BadOption(f"outbound-addr{'6' if family == 6 else ''} has to be valid "
                            f"{kind} address or interface name.")
        return str(ip)
    import psutil

    want = socket.AF_INET if family == 4 else socket.AF_INET6
    for addr in psutil.net_if_addrs().get(value, []):
        if addr.family == want:
            return addr.address.split("%")[0]
    raise BadOption(f"outbound-addr{'6' if family == 6 else ''} has to be valid "
                    f"{kind} address or interface name.")


def version_text() -> str:
    from . import __version__, _buildinfo, seccomp_info
    from .host import slirp

    return (
        f"{PROG} version {__version__}\n"
        f"commit: {_buildinfo.commit()}\n"
        f"libslirp: {slirp.version()}\n"
        f"SLIRP_CONFIG_VERSION_MAX: {slirp.config_version_max()}\n"
        f"libseccomp: {seccomp_info.version()}\n"
    )


def parse(argv: list[str]):
    """Parse the slirp4netns-compatible command line into supervisor
    Options; returns an int exit code for -h/-v."""
    from .ns.helper import Target
    from .supervisor import Options

    try:
        opts, args = getopt_long(argv, SHORT_OPTS, LONG_OPTS)
    except GetoptError as e:
        raise UsageError(str(e)) from None

    configure = False
    exit_fd = ready_fd = None
    mtu = 1500
    ipv6 = False
    api_socket = None
    cidr = "10.0.2.0/24"
    disable_host_loopback = False
    netns_type = "pid"
    userns_path = None
    sandbox = seccomp = False
    outbound4 = outbound6 = None
    disable_dns = False
    mac = None
    target_type = "netns"
    offload = True
    no_egress = False
    exit_with_target = True
    max_restarts = 5
    restart_window = 60.0
    pidfile = None
    log_level = "info"
    log_format = "text"

    for opt, val in opts:
        if opt in ("-h", "--help"):
            sys.stdout.write(USAGE)
            sys.stdout.flush()
            return EXIT_OK
        if opt in ("-v", "--version"):
            sys.stdout.write(version_text())
            sys.stdout.flush()
            return EXIT_OK
        if opt in ("-c", "--configure"):
            configure = True
        elif opt in ("-e", "--exit-fd"):
            exit_fd = _nonneg_int(val, "exit-fd")
        elif opt in ("-r", "--ready-fd"):
            ready_fd = _nonneg_int(val, "ready-fd")
        elif opt in ("-m", "--mtu"):
            try:
                mtu = int(val, 10)
            except ValueError:
                raise BadOption("MTU must be a positive integer (< 65522)") from None
            if mtu <= 0 or mtu > 65521:
                raise BadOption("MTU must be a positive integer (< 65522)")
        elif opt in ("-6", "--enable-ipv6"):
            ipv6 = True
        elif opt in ("-a", "--api-socket"):
            api_socket = val
        elif opt == "--cidr":
            cidr = val
        elif opt in ("--disable-host-loopback", "--no-host-loopback"):
            disable_host_loopback = True
        elif opt == "--netns-type":
            netns_type = val
        elif opt == "--userns-path":
            userns_path = val
        elif opt in ("--enable-sandbox", "--create-sandbox"):
            sandbox = True
        elif opt == "--enable-seccomp":
            seccomp = True
        elif opt == "--outbound-addr":
            outbound4 = val
        elif opt == "--outbound-addr6":
            outbound6 = val
        elif opt == "--disable-dns":
            disable_dns = True
        elif opt == "--macaddress":
            mac = val
        elif opt == "--target-type":
            target_type = val
        elif opt == "--no-egress":
            no_egress = True
        elif opt == "--offload":
            offload = True
        elif opt == "--no-offload":
            offload = False
        elif opt == "--ignore-target-exit":
            exit_with_target = False
        elif opt == "--max-restarts":
            max_restarts = _nonneg_int(val, "max-restarts")
        elif opt == "--restart-window":
            try:
                restart_window = float(val)
            except ValueError:
                raise BadOption("restart-window must be a number of seconds") from None
            if not restart_window > 0:
                raise BadOption("restart-window must be a number of seconds")
        elif opt == "--pidfile":
            pidfile = val
        elif opt == "--log-level":
            if val not in ("debug", "info", "warning", "error"):
                raise BadOption("log-level must be debug, info, warning or error")
            log_level = val
        elif opt == "--log-format":
            if val not in ("text", "json"):
                raise BadOption("log-format must be text or json")
            log_format = val

    if target_type not in ("netns", "bess"):
        raise BadOption('--target-type must be either "netns" or "bess"')
    if target_type == "bess":
        raise BadOption("--target-type=bess is not supported by nsnet")
    if netns_type not in ("pid", "path"):
        raise BadOption('--netns-type must be either "pid" or "path"')
    if mac is not None and not configure:
        raise BadOption("--macaddr cannot be specified when --configure or -c is not specified")
    if len(args) != 2:
        if len(args) > 2:
            raise BadOption("too many arguments")
        raise UsageError(None)

    try:
        net_cidr = parse_cidr(cidr)
        check_mtu(mtu)
        mac_bytes = parse_mac(mac) if mac is not None else None
        tapname = check_tapname(args[1])
    except ConfigError as e:
        raise BadOption(str(e)) from None

    if netns_type == "pid":
        try:
            pid = int(args[0], 10)
        except ValueError:
            raise BadOption(f"PID must be a positive integer, not {args[0]!r} "
                            "(use --netns-type=path for a path)") from None
        if pid <= 0:
            raise BadOption(f"PID must be a positive integer, not {args[0]!r}")
        if userns_path is not None:
            raise BadOption("--userns-path requires --netns-type=path")
        target = Target.from_pid(pid)
    else:
        if not os.path.exists(args[0]):
            raise BadOption("existing path expected when --netns-type=path: "
                            "No such file or directory")
        if userns_path is not None and not os.path.exists(userns_path):
            raise BadOption(f"userns path doesn't exist: {userns_path}")
        target = Target.from_path(args[0], userns_path)

    if api_socket is not None and len(api_socket.encode()) >= 108:
        raise BadOption(f"API socket path too long ({len(api_socket.encode())} bytes, "
                        "max 107)")

    out4 = resolve_outbound(outbound4, 4) if outbound4 else None
    out6 = resolve_outbound(outbound6, 6) if outbound6 else None

    net = NetConfig(
        cidr=net_cidr,
        mtu=mtu,
        ipv6=ipv6,
        disable_host_loopback=disable_host_loopback,
        disable_dns=disable_dns,
        mac=mac_bytes,
        outbound_addr=out4,
        outbound_addr6=out6,
        offload=offload,
        restricted=no_egress,
    )
    from . import log

    log.setup(log_level, log_format)
    return Options(
        target=target,
        tapname=tapname,
        net=net,
        configure=configure,
        exit_fd=exit_fd,
        ready_fd=ready_fd,
        api_socket=api_socket,
        exit_with_target=exit_with_target,
        max_restarts=max_restarts,
        restart_window=restart_window,
        pidfile=pidfile,
        sandbox=sandbox,
        seccomp=seccomp,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        from .run import main as run_main

        return run_main(argv[1:])
    try:
        opts = parse(argv)
    except UsageError as e:
        if e.args and e.args[0]:
            print(f"{PROG}: {e.args[0]}", file=sys.stderr)
        sys.stdout.write(USAGE)
        sys.stdout.flush()
        return EXIT_FAILURE
    except BadOption as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if isinstance(opts, int):
        return opts
    from .supervisor import run

    return run(opts)


def entry() -> None:
    sys.exit(main())
