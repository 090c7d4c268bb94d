"""nsnet against slirp4netns in the same scenario: what the namespace sees, API replies."""
import json

import pytest

from api_cases import (LIST, LIST_VARIANTS, STATELESS_ERRORS, add, entries_json, entries_of,
                       remove)
from harness import api_call, free_ports, unpriv_only

pytestmark = pytest.mark.timeout(180)

MAC = "02:5a:00:00:00:01"

LINK_KEYS = ("ifname", "mtu", "link_type", "address", "broadcast", "txqlen", "operstate")
ADDR_KEYS = ("family", "local", "prefixlen", "scope", "broadcast", "label")
ROUTE_KEYS = ("type", "table", "dst", "gateway", "dev", "protocol", "scope", "prefsrc", "metric", "pref")


def pick(d: dict, keys) -> dict:
    return {k: d[k] for k in keys if k in d}


def ns_view(ns, ipv6: bool) -> dict:
    """What a process in the namespace can observe about its network."""
    if ipv6:
        ns.wait_slaac()
    ns.wait_dad()
    links = {}
    for link in ns.ip_json("-d", "addr"):
        info = link.get("linkinfo", {})
        links[link["ifname"]] = {
            **pick(link, LINK_KEYS),
            "flags": ",".join(sorted(link["flags"])),
            "kind": info.get("info_kind"),
            "tun": pick(info.get("info_data", {}), ("type", "pi", "multi_queue", "persist")),
            "addrs": sorted((pick(a, ADDR_KEYS) for a in link.get("addr_info", [])),
                            key=json.dumps),
        }
    routes = {}
    for family in ("-4", "-6"):
        got = ns.ip_json(family, "route", "show", "table", "all")
        routes[family] = sorted(
            (dict(pick(r, ROUTE_KEYS), flags=",".join(sorted(r.get("flags", [])))) for r in got),
            key=json.dumps)
    sysctls = ns.sh("cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/tap0/disable_ipv6",
                    ).stdout
    return {"links": links, "routes": routes, "sysctls": sysctls}


def flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: obj}


def link_local_masked(flat: dict) -> dict:
    """slirp4netns brings tap0 up before it sets --macaddress, so its fe80::
    address comes from the kernel's random MAC: mask link-local host addresses."""
    return {k: ("fe80::<random>" if isinstance(v, str) and v.startswith("fe80::")
                and "/" not in v else v) for k, v in flat.items()}


def assert_same_view(views: dict) -> None:
    a, b = (link_local_masked(flatten(views[n])) for n in ("slirp4netns", "nsnet"))
    diffs = [f"{k}: slirp4netns={a.get(k, '<absent>')!r} nsnet={b.get(k, '<absent>')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    assert not diffs, "namespace views differ:\n" + "\n".join(diffs)


SCENARIOS = {
    "default": ["--macaddress", MAC],
    "mtu-cidr": ["--mtu", "65520", "--cidr", "10.8.0.0/24", "--macaddress", MAC],
    "ipv6": ["--enable-ipv6", "--macaddress", MAC],
    "no-loopback-wide-cidr": ["--disable-host-loopback", "--cidr", "172.20.0.0/16",
                              "--macaddress", MAC],
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_namespace_view_identical(nsnet_impl, slirp4netns_impl, make_ns, attach, scenario):
    flags = SCENARIOS[scenario]
    views = {}
    for impl in (slirp4netns_impl, nsnet_impl):
        net = attach(impl, make_ns(), *flags)
        views[impl.name] = ns_view(net.ns, "--enable-ipv6" in flags)
    assert_same_view(views)


def test_second_instance_on_the_same_namespace(nsnet_impl, slirp4netns_impl, make_ns, attach):
    """slirp4netns 1.2.0: a second -c instance with another TAP and --cidr
    adds its address and a second default route (nsnet failed with "File
    exists"); both networks work."""
    views = {}
    for impl in (slirp4netns_impl, nsnet_impl):
        ns = make_ns()
        attach(impl, ns, "--macaddress", MAC)
        second = attach(impl, ns, "--cidr", "10.0.3.0/24", "--macaddress", "02:5a:00:00:00:02",
                        tap="tap1", api=False)
        assert second.fwd.alive(), second.fwd.log()
        view = ns_view(ns, False)
        # tap1's fe80:: address (and its IPv6 routes) depend on DAD timing:
        # IPv4 is what the two instances configure
        tap1 = view["links"]["tap1"]
        tap1["addrs"] = [a for a in tap1["addrs"] if a.get("family") == "inet"]
        del view["routes"]["-6"]
        views[impl.name] = view
        assert [a["local"] for a in ns.addrs("tap1", "inet")] == ["10.0.3.100"]
    assert_same_view(views)
    assert sum(1 for r in views["nsnet"]["routes"]["-4"] if r.get("dst") == "default") == 2


def test_namespace_view_without_configure(nsnet_impl, slirp4netns_impl, make_ns, attach):
    """Without -c neither implementation touches the namespace beyond the TAP."""
    views = {}
    for impl in (slirp4netns_impl, nsnet_impl):
        net = attach(impl, make_ns(), configure=False)
        view = ns_view(net.ns, False)
        view["links"]["tap0"].pop("address")  # random MAC
        views[impl.name] = view
    assert_same_view(views)


def api_sequence(path: str, p1: int, p2: int, p3: int) -> list[tuple[str, bytes]]:
    """Run the same API conversation; return (label, reply) pairs."""
    steps = [
        ("list empty", LIST),
        ("add tcp", add("tcp", "127.0.0.1", p1, 80)),
        ("add udp defaults", add("udp", "", p2, 81, guest_addr="")),
        ("add no host_addr", add("tcp", None, p3, 82)),
        ("add duplicate", add("tcp", "127.0.0.1", p1, 83)),
        ("list three", LIST),
        ("remove 2", remove(2)),
        ("remove 2 again", remove(2)),
        ("add after remove", add("udp", "127.0.0.1", p2, 84, guest_addr="10.0.2.100")),
        ("list final", LIST),
    ]
    steps += [(f"error: {what}", req) for what, req, _ in STATELESS_ERRORS]
    steps += [(f"list variant: {what}", req) for what, req in LIST_VARIANTS]
    out = []
    for label, request in steps:
        reply = api_call(path, request)
        if reply.startswith(b'{"entries":'):
            # nsnet adds a "return" key on purpose; the entries must be identical.
            reply = b"entries=" + entries_json(entries_of(reply))
        out.append((label, reply))
    return out


@unpriv_only
def test_api_replies_identical(nsnet_impl, slirp4netns_impl, make_ns, attach):
    replies = {}
    ports = free_ports(3)
    for impl in (slirp4netns_impl, nsnet_impl):
        net = attach(impl, make_ns())
        replies[impl.name] = api_sequence(net.api, *ports)
        assert net.fwd.alive()
        net.fwd.stop()  # frees the host ports for the other implementation
    diffs = [f"{a[0]}:\n  slirp4netns {a[1]!r}\n  nsnet       {b[1]!r}"
             for a, b in zip(replies["slirp4netns"], replies["nsnet"]) if a != b]
    assert not diffs, "\n".join(diffs)
