"""A small Pythonic wrapper over nsnet's libslirp binding (``_slirp_cffi``).

The per-packet work (TAP reads, slirp_input, send_packet, poll, timers)
runs in C (csrc/datapath.c); this class owns the Slirp instance, keeps
every buffer libslirp points into alive for its whole life, and exposes
the control-plane calls: port forwards, connection info, statistics.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Any

from .._slirp_cffi import ffi, lib
from ..linux import TSO_MTU_LIMIT
from ..netconfig import NetConfig

RUN_BUDGET = lib.NSNET_DP_BUDGET
RUN_CONTROL = lib.NSNET_DP_CONTROL
RUN_TAP_ERROR = lib.NSNET_DP_TAP_ERROR
RUN_POLL_ERROR = lib.NSNET_DP_POLL_ERROR
RUN_EVENTS = lib.NSNET_DP_EVENTS

POLICY_STATS_FIELDS = (
    "flows_allowed",
    "flows_denied",
    "packets_denied",
    "unclassified_denied",
    "flows_cut",
    "dns_refused",
    "dns_learned",
    "audit_lost",
)

STATS_FIELDS = (
    "rx_frames",
    "rx_bytes",
    "tx_frames",
    "tx_bytes",
    "rx_dropped_invalid",
    "rx_dropped_ignored",
    "tx_dropped",
    "rx_csum_completed",
    "rx_gso_frames",
    "tx_gso_frames",
    "guest_errors",
    "loop_turns",
    "rx_mss_adjusted",
    "tx_fragmented",
    "tx_mss_raised",
    "pcap_frames",
    "pcap_dropped",
    "fd_refused",
)

# libslirp's if_mtu with TAP offloads below linux.TSO_MTU_LIMIT: libslirp
# then sends TCP segments of up to 32768 bytes (its TCP_MAXSEG_MAX),
# written as GSO frames the namespace's kernel cuts to the TAP's MTU.
OFFLOAD_SLIRP_MTU = 65520
# Otherwise at most this: libslirp's MSS is then NSNET_SLIRP_MSS (see
# csrc/datapath.h) on every connection, the namespace's included.  Not
# with IPv6: libslirp answers an IPv6 packet with a payload over its
# if_mtu with "packet too big", and it cannot reassemble IPv6 fragments,
# so the namespace's larger UDP datagrams would be lost.
CAPPED_SLIRP_MTU = lib.NSNET_SLIRP_MSS + 40


def slirp_mtu(net: NetConfig) -> int:
    """The if_mtu/if_mru libslirp runs with for this configuration.  The
    namespace never sees it (libslirp's router advertisements and DHCP
    replies carry no MTU): it sizes libslirp's TCP segments and paces its
    window updates."""
    if net.offload and (net.mtu < TSO_MTU_LIMIT or net.ipv6):
        return max(net.mtu, OFFLOAD_SLIRP_MTU)
    if net.ipv6:
        return net.mtu
    return min(net.mtu, CAPPED_SLIRP_MTU)


class SlirpError(RuntimeError):
    pass


def c_policy(pol: Any, owned: bool = False) -> Any:
    """The C tables (csrc/policy.c) of a policy.Policy.  owned: the
    caller frees it (tests); else it is meant for nsnet_filter_set_policy,
    which takes ownership."""
    c = pol.compile()
    rules = ffi.new("struct nsnet_pol_rule[]", max(1, len(c["rules"])))
    for i, (action, protos, lo, hi) in enumerate(c["rules"]):
        r = rules[i]
        r.action, r.protos, r.port_lo, r.port_hi = action, protos, lo, hi
    pfx = ffi.new("struct nsnet_pol_prefix[]", max(1, len(c["prefixes"])))
    for i, (fam, plen, raw, first, count) in enumerate(c["prefixes"]):
        x = pfx[i]
        x.family, x.plen, x.first, x.count = fam, plen, first, count
        ffi.memmove(x.addr, raw, 16)
    names = ffi.new("struct nsnet_pol_name[]", max(1, len(c["names"])))
    buf = bytearray()
    for i, (name, suffix, first, count) in enumerate(c["names"]):
        x = names[i]
        x.off, x.len, x.suffix, x.first, x.count = len(buf), len(name), suffix, first, count
        buf += name
    namebuf = ffi.new("char[]", bytes(buf) or b"\0")
    index = ffi.new("uint32_t[]", c["index"] or [0])
    p = lib.nsnet_policy_new(c["default"], rules, len(c["rules"]), pfx, len(c["prefixes"]),
                             names, len(c["names"]), namebuf, len(buf), index, len(c["index"]))
    if p == ffi.NULL:
        raise SlirpError("the data path refused the compiled policy (out of memory?)")
    return ffi.gc(p, lib.nsnet_policy_free) if owned else p


def c_decide(cpol: Any, proto: str, ip: str, port: int = 0, names: tuple[str, ...] = ()
             ) -> tuple[str, int | None]:
    """The C decision (tests: the same vectors as policy.Policy.decide)."""
    bits = {"tcp": 1, "udp": 2, "icmp": 4}[proto]
    a = ipaddress.ip_address(ip)
    raw = a.packed.ljust(16, b"\0")
    rule = ffi.new("int32_t *")
    blob = b"".join(n.encode() + b"\0" for n in names) + b"\0"
    action = lib.nsnet_policy_decide_v(cpol, bits, a.version, raw, port, blob, rule)
    return ("allow" if action == 0 else "deny"), (None if rule[0] < 0 else int(rule[0]))


def c_name_allowed(cpol: Any, name: str) -> bool:
    return bool(lib.nsnet_policy_name_allowed(cpol, name.encode()))


def version() -> str:
    return ffi.string(lib.slirp_version_string()).decode()


def config_version_max() -> int:
    return int(lib.SLIRP_CONFIG_VERSION_MAX)


def _in_addr(addr: ipaddress.IPv4Address | str) -> Any:
    a = ffi.new("struct in_addr *")
    a.s_addr = struct.unpack("=I", ipaddress.IPv4Address(addr).packed)[0]
    return a[0]


def _set_in6(cfg: Any, fieldname: str, addr: ipaddress.IPv6Address) -> None:
    ffi.memmove(ffi.addressof(cfg, fieldname), addr.packed, 16)


def sockaddr(addr: str, port: int) -> Any:
    """A struct sockaddr_in or sockaddr_in6 for slirp_add_hostxfwd."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + ip.packed
        raw += b"\0" * (ffi.sizeof("struct sockaddr_in") - len(raw))
    else:
        raw = (
            struct.pack("=H", socket.AF_INET6)
            + struct.pack("!HI", port, 0)
            + ip.packed
            + struct.pack("=I", 0)
        )
        raw += b"\0" * (ffi.sizeof("struct sockaddr_in6") - len(raw))
    buf = ffi.new("char[]", raw)
    return ffi.cast("struct sockaddr *", buf), len(raw), buf


class Slirp:
    """One libslirp instance bound to a TAP fd, driven by the C loop."""

    def __init__(self, net: NetConfig, tap_fd: int, ctl_fd: int) -> None:
        self.net = net
        self._keep: list[Any] = []  # everything libslirp may point into
        cfg = ffi.new("SlirpConfig *")
        cfg.version = 4
        cfg.restricted = 1 if net.restricted else 0
        cfg.in_enabled = True
        cfg.vnetwork = _in_addr(net.cidr.network_address)
        cfg.vnetmask = _in_addr(net.netmask)
        cfg.vhost = _in_addr(net.gateway)
        cfg.in6_enabled = net.ipv6
        if net.ipv6:
            _set_in6(cfg, "vprefix_addr6", net.prefix6)
            cfg.vprefix_len = 64
            _set_in6(cfg, "vhost6", net.gateway6)
            _set_in6(cfg, "vnameserver6", net.dns6)
        cfg.vdhcp_start = _in_addr(net.dhcp_start)
        cfg.vnameserver = _in_addr(net.dns)
        cfg.if_mtu = slirp_mtu(net)
        cfg.if_mru = slirp_mtu(net)
        cfg.disable_host_loopback = net.disable_host_loopback
        cfg.enable_emu = False
        cfg.disable_dns = net.disable_dns
        cfg.disable_dhcp = False
        if net.outbound_addr:
            sa = ffi.new("char[]", ffi.sizeof("struct sockaddr_in"))
            raw = struct.pack("=H", socket.AF_INET) + b"\0\0"
            raw += ipaddress.IPv4Address(net.outbound_addr).packed
            ffi.memmove(sa, raw, len(raw))
            cfg.outbound_addr = ffi.cast("struct sockaddr_in *", sa)
            self._keep.append(sa)
        if net.outbound_addr6:
            sa6 = ffi.new("char[]", ffi.sizeof("struct sockaddr_in6"))
            raw = struct.pack("=H", socket.AF_INET6) + b"\0" * 6
            raw += ipaddress.IPv6Address(net.outbound_addr6).packed
            ffi.memmove(sa6, raw, len(raw))
            cfg.outbound_addr6 = ffi.cast("struct sockaddr_in6 *", sa6)
            self._keep.append(sa6)
        self._keep.append(cfg)
        dp = lib.nsnet_dp_new(cfg, tap_fd, ctl_fd, 1 if net.offload else 0, net.mtu)
        if dp == ffi.NULL:
            raise SlirpError("slirp_new failed (libslirp refused the configuration)")
        self._dp = dp
        self._slirp = lib.nsnet_dp_slirp(dp)
        self._stats = ffi.new("struct nsnet_stats *")
        # The egress-policy filter exists from the start: it remembers which
        # connections are inbound (port forwards) and which were open
        # before a policy is set at run time (csrc/filter.c).
        self._flt = self._filter()

    def set_tap(self, tap_fd: int) -> None:
        """The TAP, for a Slirp made with tap_fd -1; before the first run()."""
        lib.nsnet_dp_set_tap(self._dp, tap_fd)

    # -- data path ---------------------------------------------------------

    def run(self, budget_ms: int) -> int:
        """Run the C loop for at most budget_ms (GIL released). Returns one
        of RUN_BUDGET, RUN_CONTROL, RUN_TAP_ERROR, RUN_POLL_ERROR."""
        return lib.nsnet_dp_run(self._dp, budget_ms)

    def tap_error(self) -> str:
        err = lib.nsnet_dp_tap_errno(self._dp)
        return f"{errno.errorcode.get(err, err)}: {os.strerror(err)}"

    def set_pcap(self, fd: int, offset: int, max_bytes: int) -> None:
        """Capture every frame to fd (pcap; see datapath.h)."""
        lib.nsnet_dp_set_pcap(self._dp, fd, offset, max_bytes)

    def pcap_full(self) -> int:
        """0 while capturing, 1 once the cap is reached, 2 after a write failed."""
        return int(lib.nsnet_dp_pcap_full(self._dp))

    def set_listener(self, fd: int, on: bool) -> None:
        """fd is (on) or was a TCP port forward's listener: at the fd limit
        the C loop refuses its connections instead of spinning."""
        lib.nsnet_dp_set_listener(self._dp, fd, int(on))

    def fd_refused(self) -> int:
        lib.nsnet_dp_get_stats(self._dp, self._stats)
        return int(self._stats.fd_refused)

    def stats(self) -> dict[str, int]:
        lib.nsnet_dp_get_stats(self._dp, self._stats)
        return {name: int(getattr(self._stats, name)) for name in STATS_FIELDS}

    # -- egress policy -----------------------------------------------------

    def _filter(self) -> Any:
        f = lib.nsnet_dp_filter(self._dp)
        if f == ffi.NULL:
            raise SlirpError("out of memory for the egress policy's tables")
        return f

    def set_policy(self, pol: Any, keep_established: bool = False,
                   audit_all: bool = False) -> None:
        """Enforce pol (a policy.Policy; None or an open policy: nothing
        is checked) from the next frame on."""
        if pol is None or (pol.is_open and not audit_all):
            lib.nsnet_filter_set_policy(self._flt, ffi.NULL, 0, 0)
            return
        lib.nsnet_filter_set_policy(self._flt, c_policy(pol), int(keep_established),
                                    int(audit_all))

    def set_udp_forward(self, guest_port: int, on: bool) -> None:
        """Datagrams to a published UDP guest port open inbound flows."""
        lib.nsnet_filter_set_udp_forward(self._flt, guest_port, int(on))

    def policy_stats(self) -> dict[str, int]:
        st = ffi.new("struct nsnet_filter_stats *")
        lib.nsnet_filter_get_stats(self._flt, st)
        return {name: int(getattr(st, name)) for name in POLICY_STATS_FIELDS}

    def audit_records(self, max_records: int = 256) -> list[dict[str, Any]]:
        """Pop the waiting audit records (see csrc/policy.h)."""
        if not lib.nsnet_filter_audit_pending(self._flt):
            return []
        buf = ffi.new("struct nsnet_pol_event[]", max_records)
        n = lib.nsnet_filter_audit_pop(self._flt, buf, max_records)
        out = []
        for i in range(n):
            e = buf[i]
            nb = 4 if e.family == 4 else 16
            src = ipaddress.ip_address(bytes(ffi.buffer(e.src, nb)))
            dst = ipaddress.ip_address(bytes(ffi.buffer(e.dst, nb)))
            proto = {6: "tcp", 17: "udp"}.get(e.proto, "icmp")
            rec: dict[str, Any] = {
                "time": e.time_ms / 1000.0, "proto": proto,
                "src": str(src), "dst": str(dst),
                "action": "allow" if e.action == 0 else "deny",
                "rule": None if e.rule < 0 else int(e.rule),
            }
            if e.rule == -2:  # NSNET_POL_RULE_DNS: a query refused by name
                rec["dns_refused"] = True
            if proto != "icmp":
                rec["sport"] = int(e.sport)
                rec["dport"] = int(e.dport)
            name = ffi.string(e.name).decode(errors="replace")
            if name:
                rec["name"] = name
            out.append(rec)
        return out

    def learned_name(self, ip: str) -> str:
        a = ipaddress.ip_address(ip)
        return ffi.string(lib.nsnet_filter_learned(self._flt, a.version,
                                                   a.packed.ljust(16, b"\0"))).decode()

    def last_guest_error(self) -> str:
        return ffi.string(lib.nsnet_dp_last_guest_error(self._dp)).decode(errors="replace")

    # -- port forwards -----------------------------------------------------

    def add_hostfwd(
        self, is_udp: bool, host_addr: str, host_port: int, guest_addr: str, guest_port: int
    ) -> None:
        """Forward host_addr:host_port to guest_addr:guest_port. IPv4 pairs
        use slirp_add_hostfwd; anything with IPv6 uses slirp_add_hostxfwd."""
        h = ipaddress.ip_address(host_addr)
        g = ipaddress.ip_address(guest_addr)
        if h.version == 4 and g.version == 4:
            rc = lib.slirp_add_hostfwd(
                self._slirp, int(is_udp), _in_addr(h), host_port, _in_addr(g), guest_port
            )
        else:
            hsa, hlen, _hb = sockaddr(host_addr, host_port)
            gsa, glen, _gb = sockaddr(guest_addr, guest_port)
            flags = lib.SLIRP_HOSTFWD_UDP if is_udp else 0
            if h.version == 6:
                flags |= lib.SLIRP_HOSTFWD_V6ONLY
            rc = lib.slirp_add_hostxfwd(self._slirp, hsa, hlen, gsa, glen, flags)
        if rc < 0:
            # libslirp keeps the errno of the socket()/bind()/listen() that
            # failed (tcp_listen, udp_listen): say why.
            code = ffi.errno
            why = f": {os.strerror(code)} ({errno.errorcode.get(code, code)})" if code else ""
            raise SlirpError(f"slirp_add_hostfwd failed{why}")

    def remove_hostfwd(self, is_udp: bool, host_addr: str, host_port: int) -> None:
        h = ipaddress.ip_address(host_addr)
        if h.version == 4:
            rc = lib.slirp_remove_hostfwd(self._slirp, int(is_udp), _in_addr(h), host_port)
        else:
            hsa, hlen, _hb = sockaddr(host_addr, host_port)
            flags = (lib.SLIRP_HOSTFWD_UDP if is_udp else 0) | lib.SLIRP_HOSTFWD_V6ONLY
            rc = lib.slirp_remove_hostxfwd(self._slirp, hsa, hlen, flags)
        if rc < 0:
            raise SlirpError("slirp_remove_hostfwd failed")

    # -- introspection -----------------------------------------------------

    def connection_info(self) -> str:
        p = lib.slirp_connection_info(self._slirp)
        if p == ffi.NULL:
            return ""
        try:
            return ffi.string(p).decode(errors="replace")
        finally:
            lib.free(p)  # g_malloc'd; glib allocates with the system malloc

    def close(self) -> None:
        dp, self._dp = getattr(self, "_dp", None), None
        if dp is not None:
            lib.nsnet_dp_free(dp)
        self._keep.clear()

    def __enter__(self) -> "Slirp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
