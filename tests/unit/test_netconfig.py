"""nsnet.netconfig: addresses derived from --cidr, and the refusals."""
from __future__ import annotations

import ipaddress

import pytest

from nsnet import netconfig as nc


def test_defaults_are_slirp4netns_ones():
    net = nc.NetConfig()
    assert (str(net.cidr), str(net.gateway), str(net.dns), str(net.dhcp_start),
            str(net.guest), str(net.netmask)) == \
        ("10.0.2.0/24", "10.0.2.2", "10.0.2.3", "10.0.2.15", "10.0.2.100", "255.255.255.0")
    assert (str(net.gateway6), str(net.dns6)) == ("fd00::2", "fd00::3")
    assert net.mtu == 1500 and net.offload and not net.restricted


def test_offsets_follow_the_cidr():
    net = nc.NetConfig(cidr=nc.parse_cidr("10.5.0.0/16"))
    assert (str(net.gateway), str(net.dns), str(net.guest)) == \
        ("10.5.0.2", "10.5.0.3", "10.5.0.100")


@pytest.mark.parametrize("text,msg", [
    ("10.0.2.0", "invalid CIDR"),
    ("bogus/24", "invalid CIDR"),
    ("10.0.2.0/26", "prefix length needs to be 1-25"),
    ("10.0.2.0/0", "prefix length needs to be 1-25"),
    ("10.0.2.1/24", "network address"),
])
def test_bad_cidr(text, msg):
    with pytest.raises(nc.ConfigError, match=msg):
        nc.parse_cidr(text)


@pytest.mark.parametrize("text", ["10.0.2.0/25", "128.0.0.0/1", "192.168.7.0/24"])
def test_good_cidr(text):
    assert str(nc.parse_cidr(text)) == text


@pytest.mark.parametrize("mtu,ok", [(67, False), (68, True), (65521, True), (65522, False)])
def test_mtu_bounds(mtu, ok):
    if ok:
        assert nc.check_mtu(mtu) == mtu
    else:
        with pytest.raises(nc.ConfigError, match="MTU"):
            nc.check_mtu(mtu)


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", "a\0b", ".", ".."])
def test_bad_tap_names(name):
    with pytest.raises(nc.ConfigError, match="invalid TAP name"):
        nc.check_tapname(name)


def test_good_tap_name():
    assert nc.check_tapname("a" * 15) == "a" * 15


@pytest.mark.parametrize("text", ["02:00:00:00:00", "02:00:00:00:00:0g", "0200.0000.0001",
                                  "02:00:00:00:00:01:02"])
def test_bad_mac(text):
    with pytest.raises(nc.ConfigError, match="invalid MAC address"):
        nc.parse_mac(text)


def test_mac_and_slaac():
    mac = nc.parse_mac("02:AB:cd:00:00:01")
    assert mac == bytes([2, 0xAB, 0xCD, 0, 0, 1])
    assert str(nc.slaac_address(ipaddress.IPv6Address("fd00::"), mac)) == \
        "fd00::ab:cdff:fe00:1"


def test_wire_round_trip():
    net = nc.NetConfig(cidr=nc.parse_cidr("10.9.0.0/24"), mtu=9000, ipv6=True,
                       disable_host_loopback=True, disable_dns=True, restricted=True,
                       mac=nc.parse_mac("02:00:00:00:00:09"), outbound_addr="127.0.0.2",
                       outbound_addr6="::1", offload=False)
    wire = net.to_wire()
    assert wire["restricted"] is True and wire["disable_dns"] is True
    assert nc.NetConfig.from_wire(wire) == net
