"""The JSON API's request parser and replies (nsnet's api module), driven
through a fake backend: every reply byte for byte, as slirp4netns 1.2.0
gives it (tests/api_cases.py), without a forwarder."""
from __future__ import annotations

import json

import pytest

import api_cases as C

from nsnet.supervisor import api
from nsnet.forwards import ForwardError, ForwardTable


class FakeBackend:
    """What the supervisor gives api.handle(): a forward table and answers."""

    default_guest_addr = "10.0.2.100"
    default_guest_addr6 = "fd00::100"

    def __init__(self, refuse: bool = False):
        self.table = ForwardTable()
        self.refuse = refuse
        self.calls: list[str] = []

    def api_add_forward(self, fwd):
        self.calls.append("add")
        if self.refuse or self.table.find(fwd) is not None:
            raise ForwardError("in use")
        return self.table.add(fwd)

    def api_remove_forward(self, fid):
        self.calls.append("remove")
        self.table.remove(fid)  # KeyError for an unknown id, as the supervisor

    def api_list_forwards(self):
        return self.table.items()

    def api_info(self, interface=False):
        return {"interface_asked": interface}

    def api_stats(self):
        return {"forwarders": 1}


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.mark.parametrize("name,request_,reply", C.STATELESS_ERRORS,
                         ids=[c[0] for c in C.STATELESS_ERRORS])
def test_error_replies_match_slirp4netns(backend, name, request_, reply):
    assert api.handle(request_, backend) == reply
    assert "add" not in backend.calls  # a refused request never reaches the backend


@pytest.mark.parametrize("name,request_", C.LIST_VARIANTS, ids=[c[0] for c in C.LIST_VARIANTS])
def test_list_variants(backend, name, request_):
    assert api.handle(request_, backend) == C.list_reply("nsnet", [])


def test_add_list_remove_round_trip(backend):
    assert api.handle(C.add(), backend) == b'{"return":{"id":1}}'
    assert api.handle(C.add(proto="udp", host_port=18081, guest_port=53), backend) == \
        b'{"return":{"id":2}}'
    want = [C.entry(1, "tcp", "127.0.0.1", 18080, "10.0.2.100", 80),
            C.entry(2, "udp", "127.0.0.1", 18081, "10.0.2.100", 53)]
    assert api.handle(C.LIST, backend) == C.list_reply("nsnet", want)
    assert api.handle(C.remove(1), backend) == b'{"return":{}}'
    assert C.entries_of(api.handle(C.LIST, backend)) == want[1:]
    assert api.handle(C.remove(1), backend) == C.BAD_ID  # gone


def test_add_defaults(backend):
    # no host_addr: every address; IPv6 host address: the IPv6 guest address
    api.handle(C.add(host_addr=None), backend)
    api.handle(C.add(host_addr="::1", host_port=18082), backend)
    entries = C.entries_of(api.handle(C.LIST, backend))
    assert [(e["host_addr"], e["guest_addr"]) for e in entries] == \
        [("0.0.0.0", "10.0.2.100"), ("::1", "fd00::100")]


def test_add_refused_by_backend(backend):
    backend.refuse = True
    assert api.handle(C.add(), backend) == C.ADD_FAILED


def test_add_same_forward_twice_fails(backend):
    assert api.handle(C.add(), backend) == b'{"return":{"id":1}}'
    assert api.handle(C.add(), backend) == C.ADD_FAILED


@pytest.mark.parametrize("port", [1.0, 80.0])
def test_whole_float_ports_accepted(backend, port):
    # slirp4netns reads ports with json_object_get_int: 80.0 is 80
    assert api.handle(C.add(guest_port=port), backend) == b'{"return":{"id":1}}'
    assert C.entries_of(api.handle(C.LIST, backend))[0]["guest_port"] == int(port)


@pytest.mark.parametrize("port", [80.5, True, None, 65536, -1, "80"])
def test_bad_guest_ports_refused(backend, port):
    assert api.handle(C.add(guest_port=port), backend) == C.BAD_GUEST_PORT
    assert backend.calls == []


@pytest.mark.parametrize("data", [b'{"execute":"list_hostfwd","x":NaN}',
                                  b'{"execute":"list_hostfwd","x":Infinity}',
                                  b"\xff\xfe", b"[" * 5000 + b"]" * 5000])
def test_not_json_is_refused_without_exception(backend, data):
    reply = api.handle(data, backend)
    assert reply in (C.CANNOT_PARSE, C.TOO_LARGE)


def test_address_families_must_match(backend):
    assert api.handle(C.add(host_addr="::1", guest_addr="10.0.2.100"), backend) == \
        C.BAD_GUEST_ADDR
    assert api.handle(C.add(host_addr="127.0.0.1", guest_addr="::1"), backend) == \
        C.BAD_GUEST_ADDR


def test_splice_mode(backend):
    assert api.handle(C.add(mode="splice"), backend) == b'{"return":{"id":1}}'
    (entry,) = C.entries_of(api.handle(C.LIST, backend))
    # The guest's TAP address by default, as libslirp's forwards (issue 11
    # item 3); the loopback only when named.
    assert entry["mode"] == "splice" and entry["guest_addr"] == "10.0.2.100"
    assert api.handle(C.add(mode="splice", host_port=3, guest_addr="127.0.0.1"), backend) == \
        b'{"return":{"id":2}}'
    assert C.entries_of(api.handle(C.LIST, backend))[1]["guest_addr"] == "127.0.0.1"
    assert api.handle(C.add(proto="udp", mode="splice", host_port=1), backend) == \
        C.err("bad request: add_hostfwd: bad arguments.mode: splice is for tcp only")
    assert api.handle(C.add(mode="fast", host_port=2), backend) == \
        C.err("bad request: add_hostfwd: bad arguments.mode")


def test_get_info_and_stats_pass_through(backend):
    assert json.loads(api.handle(b'{"execute":"get_info"}', backend)) == \
        {"return": {"interface_asked": False}}
    assert json.loads(api.handle(
        b'{"execute":"get_info","arguments":{"interface":true}}', backend)) == \
        {"return": {"interface_asked": True}}
    # only the JSON true asks for the interface
    assert json.loads(api.handle(
        b'{"execute":"get_info","arguments":{"interface":1}}', backend)) == \
        {"return": {"interface_asked": False}}
    assert json.loads(api.handle(b'{"execute":"get_stats"}', backend)) == \
        {"return": {"forwarders": 1}}


def test_is_complete():
    assert api.is_complete(C.LIST)
    assert not api.is_complete(C.LIST[:-1])
    assert not api.is_complete(b"")


def test_host_port_0_reply_names_the_port(backend):
    """nsnet's extension (slirp4netns refuses host_port 0): the backend
    (the supervisor) picks the port; the reply and list_hostfwd give it."""
    class Picking(FakeBackend):
        def api_add_forward(self, fwd):
            return super().api_add_forward(fwd._replace(host_port=fwd.host_port or 41234))

    b = Picking()
    assert api.handle(C.add(host_port=0), b) == b'{"return":{"id":1,"host_port":41234}}'
    assert b'"host_port":41234' in api.handle(C.LIST, b)
    assert api.handle(C.add(host_port=8080), b) == b'{"return":{"id":2}}'  # as slirp4netns


def test_ipv6_host_addr_without_ipv6_blames_host_addr(backend):
    backend.default_guest_addr6 = None  # nsnet without -6
    reply = api.handle(C.add(host_addr="::1"), backend)
    assert b"bad arguments.host_addr: an IPv6 host address needs IPv6" in reply
    assert b"start nsnet with -6" in reply
