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
    parse_cidr6,
    parse_mac,
)

from . import options as O

PROG = "nsnet"
EXIT_OK = 0
EXIT_FAILURE = 1

USAGE_HEAD = f"""\
Usage: {PROG} [OPTION]... PID|PATH [TAPNAME]
       {PROG} run [OPTION]... -- COMMAND [ARG]...
       {PROG} ctl [--socket PATH | --instance NAME] COMMAND [ARG]... [--json]
       {PROG} ps [--json]
User-mode networking for unprivileged network namespaces.

"""


def usage() -> str:
    """--help: slirp4netns's options (the same lines as slirp4netns 1.2.0
    prints; RootlessKit and Podman read them), then nsnet's own."""
    return (USAGE_HEAD + O.usage_rows(O.ATTACH, s4n=True) + "\nnsnet options:\n"
            + O.usage_rows(O.ATTACH, s4n=False))


SHORT_OPTS = O.shortopts(O.ATTACH)
# slirp4netns's options in the order of its getopt_long table (the order
# glibc lists the possibilities of an ambiguous abbreviation in), then nsnet's.
LONG_OPTS = O.longopts(O.ATTACH)


class UsageError(Exception):
    """Bad command line: message on stderr, usage on stdout, exit 1."""


class BadOption(Exception):
    """A bad option value: message on stderr, exit 1."""


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
        v, args, stop = O.parse(O.ATTACH, argv)
    except GetoptError as e:
        raise UsageError(str(e)) from None
    except O.OptionError as e:
        raise BadOption(str(e)) from None
    if stop == "help":
        sys.stdout.write(usage())
        sys.stdout.flush()
        return EXIT_OK
    if stop == "version":
        sys.stdout.write(version_text())
        sys.stdout.flush()
        return EXIT_OK
    configure = v["configure"]
    target_type = v["target_type"]
    netns_type = v["netns_type"]
    mac = v["mac"]
    userns_path = v["userns_path"]
    api_socket = v["api_socket"]

    if target_type not in ("netns", "bess"):
        raise BadOption('--target-type must be either "netns" or "bess"')
    if target_type == "bess":
        raise BadOption("--target-type=bess is not supported by nsnet")
    if netns_type not in ("pid", "path"):
        raise BadOption('--netns-type must be either "pid" or "path"')
    if mac is not None and not configure:
        raise BadOption("--macaddr cannot be specified when --configure or -c is not specified")
    if v["bypass_bytes"] is not None and not v["bypass_listener"]:
        raise BadOption("--bypass-bytes needs --bypass-listener (it says how the bytes of "
                        "bypassed connections are counted)")
    if len(args) != 2:
        if len(args) > 2:
            raise BadOption("too many arguments")
        raise UsageError(None)

    try:
        net_cidr = parse_cidr(v["cidr"])
        net_cidr6 = parse_cidr6(v["cidr6"]) if v["cidr6"] else None
        if net_cidr6 is not None and not v["ipv6"]:
            raise ConfigError("--cidr6 needs -6 (--enable-ipv6)")
        check_mtu(v["mtu"])
        mac_bytes = parse_mac(mac) if mac is not None else None
        tapname = check_tapname(args[1])
    except ConfigError as e:
        raise BadOption(str(e)) from None

    from .diag import DiagError, check_ns_file, check_socket_dir

    try:
        if netns_type == "pid":
            try:
                pid = int(args[0], 10)
            except ValueError:
                raise BadOption(f"PID must be a positive integer, not {args[0]!r} "
                                "(use --netns-type=path for a path)") from None
            if pid <= 0:
                raise BadOption(f"PID must be a positive integer, not {args[0]!r}")
            if not os.path.exists(f"/proc/{pid}"):
                raise BadOption(f"target PID {pid} does not exist (has the process exited?)")
            target = Target.from_pid(pid)
            if userns_path is not None:
                # slirp4netns 1.2.0: joins that user namespace instead of the PID's.
                check_ns_file(userns_path, "user", "--userns-path")
                target = target._replace(userns=userns_path)
        else:
            check_ns_file(args[0], "net", "--netns-type=path")
            if userns_path is not None:
                check_ns_file(userns_path, "user", "--userns-path")
            target = Target.from_path(args[0], userns_path)
        if api_socket is not None:
            check_socket_dir(api_socket)
    except DiagError as e:
        raise BadOption(str(e)) from None

    policy = None
    if v["egress"] or v["policy_rules"] or v["policy_file"]:  # else not on the path to ready
        from .policy import PolicyError, from_options

        try:
            policy = from_options(v["egress"], v["policy_rules"], v["policy_file"])
        except PolicyError as e:
            raise BadOption(str(e)) from None

    out4 = resolve_outbound(v["outbound4"], 4) if v["outbound4"] else None
    out6 = resolve_outbound(v["outbound6"], 6) if v["outbound6"] else None

    net = NetConfig(
        cidr=net_cidr,
        mtu=v["mtu"],
        ipv6=v["ipv6"],
        disable_host_loopback=v["disable_host_loopback"],
        disable_dns=v["disable_dns"],
        mac=mac_bytes,
        outbound_addr=out4,
        outbound_addr6=out6,
        offload=v["offload"],
        restricted=v["no_egress"],
        cidr6=net_cidr6,
    )
    from . import log

    log.setup(v["log_level"], v["log_format"])
    opts = Options(
        target=target,
        tapname=tapname,
        net=net,
        configure=configure,
        exit_fd=v["exit_fd"],
        ready_fd=v["ready_fd"],
        api_socket=api_socket,
        exit_with_target=v["exit_with_target"],
        max_restarts=v["max_restarts"],
        restart_window=float(v["restart_window"]),
        pidfile=v["pidfile"],
        sandbox=v["sandbox"],
        seccomp=v["seccomp"],
        policy=policy,
        audit_all=v["audit"] == "all",
        audit_log=v["audit_log"],
        pcap=v["pcap"],
        pcap_max_bytes=v["pcap_max_bytes"],
        bypass_listener=v["bypass_listener"],
        bypass_bytes=v["bypass_bytes"] or O.BYPASS_BYTES_DEFAULT,
    )
    opts.name = v["name"]  # nsnet ps, nsnet ctl --instance (the registry: cli.main)
    return opts


def _describe_target(target) -> str:
    if target.pid is not None:
        return f"pid {target.pid}"
    return f"netns {target.netns}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        from .run import main as run_main

        return run_main(argv[1:])
    if argv and argv[0] in ("ctl", "ps"):
        from . import ctl

        return ctl.ctl_main(argv[1:]) if argv[0] == "ctl" else ctl.ps_main(argv[1:])
    from . import log

    if log.wants_json(argv):
        log.setup("info", "json")
    try:
        opts = parse(argv)
    except UsageError as e:
        if e.args and e.args[0]:
            log.fail(PROG, e.args[0])
        sys.stdout.write(usage())
        sys.stdout.flush()
        return EXIT_FAILURE
    except BadOption as e:
        log.fail(PROG, str(e))
        return EXIT_FAILURE
    if isinstance(opts, int):
        return opts
    from . import fdlimit

    try:
        fdlimit.raise_at_start()
    except fdlimit.FdLimitError as e:
        log.fail(PROG, str(e))
        return EXIT_FAILURE
    import time

    from . import diag, registry
    from .supervisor import run

    t0 = time.monotonic()
    logger = log.get("nsnet")
    try:
        entry = _registry_entry(opts, opts.name, "attach", None)
    except (registry.RegistryError, O.OptionError) as e:
        log.fail(PROG, str(e))
        return EXIT_FAILURE
    line, fields = diag.start_line(opts.net, target=_describe_target(opts.target),
                                   tapname=opts.tapname, api_socket=opts.api_socket,
                                   pcap=opts.pcap, pcap_max_bytes=opts.pcap_max_bytes)
    logger.info(line, extra={"fields": fields})
    if not opts.net.disable_dns:
        warn = diag.dns_warning(opts.net, rewrite=True, policy=opts.policy, attach=True)
        if warn is not None:
            logger.warning(warn[0], extra={"fields": warn[1]})

    def ready(sup) -> None:
        ms = (time.monotonic() - t0) * 1000
        logger.info(f"ready in {ms:.1f} ms: {opts.tapname} in {_describe_target(opts.target)}"
                    + (" configured" if opts.configure else ""),
                    extra={"fields": {"event": "ready", "ms": round(ms, 3),
                                      "tap": opts.tapname}})
        _registry_add(entry)

    opts.on_ready = ready
    try:
        return run(opts)
    finally:
        entry.remove()


def _registry_entry(opts, name: str | None, kind: str, command: list[str] | None):
    """This instance's registry entry (nsnet ps); a named instance without
    an API socket gets one in the registry.  RegistryError for a bad or
    taken name."""
    from . import registry

    own_socket = False
    if name is not None:
        sock = registry.claim_name(name)
        if opts.api_socket is None:
            O.socket_path(sock)
            opts.api_socket = sock
            own_socket = True
    return registry.Entry(name=name, kind=kind, target=_describe_target(opts.target),
                          tapname=opts.tapname, api_socket=opts.api_socket,
                          command=command, registry_socket=own_socket)


def _registry_add(entry) -> None:
    from . import log, registry

    try:
        entry.add()
    except (OSError, registry.RegistryError) as e:
        log.get("nsnet").warning(f"not listed by nsnet ps: {e}")


def entry() -> None:
    sys.exit(main())
