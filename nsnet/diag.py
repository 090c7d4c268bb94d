"""Diagnostics shared by the front ends: checks a user's input can fail
before anything starts, each with a message that says what failed, why
(the real errno) and what to do; and the start-up and ready lines.

Only the standard library (errno, os): this is on the path to ready.
"""

from __future__ import annotations

import errno
import os

NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its CLONE_NEW* type
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_NS_KINDS = {"net": CLONE_NEWNET, "user": CLONE_NEWUSER}


class DiagError(Exception):
    """A check failed; str() is the whole message."""


def why(e: OSError) -> str:
    """"Permission denied (EACCES)": the errno's text and name."""
    code = e.errno or 0
    name = errno.errorcode.get(code, str(code))
    return f"{e.strerror or os.strerror(code)} ({name})"


def check_ns_file(path: str, kind: str, option: str) -> None:
    """path must be a namespace file of this kind ("net" or "user") the
    user may open.  Raises DiagError."""
    import fcntl

    what = "network" if kind == "net" else "user"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            hint = (f"it, or a directory on its path, is not readable by uid {os.getuid()}; "
                    "run nsnet as the namespace's owner or fix the permissions")
        elif e.errno == errno.ENOENT:
            hint = ("give an existing namespace file (/run/netns/NAME, "
                    "/proc/PID/ns/" + kind + ")")
        else:
            hint = f"give a readable {what} namespace file"
        raise DiagError(f"cannot open the {what} namespace {path} ({option}): {why(e)}; {hint}"
                        ) from None
    try:
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as e:
            raise DiagError(f"{path} ({option}) is not a namespace file "
                            f"(ioctl NS_GET_NSTYPE: {why(e)}); give a {what} namespace such as "
                            f"/run/netns/NAME or /proc/PID/ns/{kind}") from None
        if nstype != _NS_KINDS[kind]:
            raise DiagError(f"{path} ({option}) is a namespace, but not a {what} namespace; "
                            f"give /proc/PID/ns/{kind} or a bind mount of one")
    finally:
        os.close(fd)


def tap_error(tapname: str, e: OSError) -> str:
    """Why the TAP could not be opened or made, and what to do."""
    if e.filename:  # opening /dev/net/tun itself
        dev = e.filename
        if e.errno == errno.ENOENT:
            hint = ("load the tun module (modprobe tun), or in a container give it "
                    "/dev/net/tun (character device 10,200)")
        elif e.errno in (errno.EACCES, errno.EPERM):
            try:
                import stat

                mode = f"mode {stat.filemode(os.stat(dev).st_mode)}"
            except OSError:
                mode = "its mode"
            hint = (f"it must be readable and writable by uid {os.getuid()} "
                    f"(crw-rw-rw-, 0666; {mode}); in a container, allow the device "
                    "(e.g. --device /dev/net/tun)")
        else:
            hint = "check the tun device"
        return f"cannot open {dev} for TAP {tapname!r}: {why(e)}; {hint}"
    if e.errno == errno.EPERM:
        hint = ("creating a TAP needs CAP_NET_ADMIN in the user namespace that owns the "
                "network namespace: give the PID of a process in it, or --userns-path")
    elif e.errno == errno.EBUSY:
        hint = f"{tapname} exists and is in use (another nsnet on it?); pick another TAP name"
    elif e.errno == errno.EINVAL:
        hint = f"{tapname} exists and is not a TAP device; pick another name"
    else:
        hint = "see the kernel log"
    return f"cannot create TAP {tapname!r} (TUNSETIFF): {why(e)}; {hint}"


def check_socket_dir(path: str, what: str = "API socket") -> None:
    """The directory a unix socket is to be bound in must exist and be
    writable.  Raises DiagError."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(d)
    except OSError as e:
        raise DiagError(f"cannot create the {what} {path}: directory {d}: {why(e)}; "
                        "create it first or choose another path") from None
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise DiagError(f"cannot create the {what} {path}: {d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        e = OSError(errno.EACCES, os.strerror(errno.EACCES))
        raise DiagError(f"cannot create the {what} {path}: directory {d} is not writable "
                        f"by uid {os.getuid()}: {why(e)}; choose a directory you own "
                        "(e.g. $XDG_RUNTIME_DIR)")


def start_line(net, *, target: str, tapname: str, api_socket: str | None,
               pcap: str | None = None, pcap_max_bytes: int = 0,
               extra: dict | None = None) -> tuple[str, dict]:
    """The start-up line: the settings in effect (what slirp4netns prints
    as its "* MTU: ..." block, on one line), and the JSON fields."""
    fields = {"event": "start", "target": target, "tap": tapname, "mtu": net.mtu,
              "cidr": str(net.cidr), "guest": str(net.guest), "gateway": str(net.gateway),
              "dns": None if net.disable_dns else str(net.dns),
              "dhcp_start": str(net.dhcp_start), "ipv6": net.ipv6,
              "host_loopback": not net.disable_host_loopback, "egress": not net.restricted,
              "offload": net.offload, "api_socket": api_socket,
              "pcap": pcap, "pcap_max_bytes": pcap_max_bytes if pcap else None}
    if net.ipv6:
        fields["prefix6"] = f"{net.prefix6}/64"
    fields.update(extra or {})
    parts = [f"starting: {target}, {tapname}, MTU {net.mtu}, network {net.cidr}",
             f"guest {net.guest}", f"gateway {net.gateway}",
             "DNS off" if net.disable_dns else f"DNS {net.dns}",
             f"DHCP from {net.dhcp_start}"]
    if net.ipv6:
        parts.append(f"IPv6 {net.prefix6}/64")
    if net.restricted:
        parts.append("no egress")
    parts.append("offloads " + ("on" if net.offload else "off"))
    if api_socket:
        parts.append(f"API socket {api_socket}")
    if pcap:
        parts.append(f"capture to {pcap} (" + (f"at most {pcap_max_bytes} bytes)"
                                              if pcap_max_bytes else "no size limit)"))
    line = ", ".join(parts)
    if not net.disable_host_loopback and not net.restricted:
        line += (f"; 127.0.0.1 on the host is reachable as {net.gateway} "
                 "(--disable-host-loopback to prohibit)")
    return line, fields


RESOLV_CONF = "/etc/resolv.conf"


def nameservers(path: str = RESOLV_CONF) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order (a scope
    suffix such as %eth0 dropped).  OSError if it cannot be read."""
    import ipaddress

    with open(path, errors="replace") as f:
        lines = f.read(1 << 20).splitlines()
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
            except ValueError:
                continue
    return out


def dns_warning(net, *, rewrite: bool, why_not: str = "", policy=None,
                path: str = RESOLV_CONF, attach: bool = False) -> tuple[str, dict] | None:
    """nsnet run: why COMMAND's names will not resolve, or None.

    attach: attach mode (`nsnet PID TAP`), which leaves the namespace's
    resolv.conf to its owner: why nsnet's DNS, if the namespace uses it,
    will not answer (rewrite must be True; --disable-dns: no warning).

    rewrite: COMMAND's /etc/resolv.conf names nsnet's DNS (CIDR+3, and
    the IPv6 one with -6), which forwards to the nameservers of the host's
    resolv.conf, IPv4 ones for CIDR+3, IPv6 ones for ::3 (libslirp 4.7;
    loopback ones too, even with --disable-host-loopback).  Otherwise
    COMMAND keeps the host's file (why_not: the option that said so), and
    its nameservers are reached from COMMAND's namespace like any address:
    a loopback one is COMMAND's own loopback there."""
    import ipaddress

    try:
        servers = nameservers(path)
        none = "no nameserver"
    except OSError as e:
        servers = []
        none = f"no nameserver (it cannot be read: {why(e)})"
    fields = {"event": "dns_unreachable", "resolv_conf": "nsnet" if rewrite else "host",
              "nameservers": servers}
    if attach:
        fields["resolv_conf"] = None  # the namespace's own: nsnet does not know it
    who = "the namespace" if attach else "COMMAND"
    off = "--disable-dns" if attach else "--no-dns"
    if rewrite:
        at = str(net.dns) + (f" and {net.dns6}" if net.ipv6 else "")
        v4 = [s for s in servers if ":" not in s]
        v6 = [s for s in servers if ":" in s]
        if net.restricted:
            reason = "no-egress"
            msg = ((f"nsnet's DNS ({at}) answers nothing: --no-egress drops every query to it "
                    "(libslirp's restricted mode); use addresses, or a resolver of the "
                    "namespace's own") if attach else
                   (f"COMMAND's resolv.conf names nsnet's DNS ({at}), and --no-egress drops "
                    "every query to it (libslirp's restricted mode); use addresses, or "
                    "--no-dns for a resolver of COMMAND's own"))
        elif not v4 and not (net.ipv6 and v6):
            reason = "no-nameserver"
            if v6:
                what = (f"only IPv6 nameservers ({', '.join(v6)}), which nsnet's DNS "
                        f"reaches only with -6; give -6, or {off}")
            else:
                what = f"{none}; fix the host's resolver configuration, or give {off}"
            msg = (f"nsnet's DNS ({at}) forwards queries to the host's resolver, but {path} "
                   f"names {what}")
        elif policy is not None and policy.refuses_every_name():
            reason = "policy"
            msg = ("the egress policy allows no DNS name (default deny, no --allow rule "
                   f"for a name), so nsnet's DNS ({at}) answers every query REFUSED; allow "
                   f"the names {who} needs (--allow='NAME[:PORTS]', --allow='*.SUFFIX')")
        else:
            return None
    else:
        keep = f"COMMAND keeps the host's {path} ({why_not})"
        usable = []
        blocked = []
        for s in servers:
            ip = ipaddress.ip_address(s)
            if ip.is_loopback:
                blocked.append(f"{s}: loopback, COMMAND's own in its namespace")
            elif net.restricted:
                blocked.append(f"{s}: --no-egress")
            elif ip.version == 6 and not net.ipv6:
                blocked.append(f"{s}: IPv6 without -6")
            elif policy is not None and not policy.decide("udp", ip, 53).allowed:
                blocked.append(f"{s}: denied by the egress policy")
            else:
                usable.append(s)
        if usable:
            return None
        reason = "host-resolv-conf"
        if not servers:
            msg = f"{keep}, which names {none}"
        else:
            msg = f"{keep}, and none of its nameservers can be reached ({'; '.join(blocked)})"
        if why_not == "--no-dns" and not net.restricted and not net.disable_dns:
            msg += "; without --no-dns, names resolve through nsnet's DNS"
        elif why_not == "--disable-dns" and not net.restricted:
            msg += "; without --disable-dns, names resolve through nsnet's DNS"
    fields["reason"] = reason
    return f"names will not resolve: {msg}", fields
