"""Every internal protocol's validation (nsnet/proto/), no root needed:
what a hostile or broken peer can send, and what the receiver makes of it
(a ProtocolError, never another exception)."""
from __future__ import annotations

import json
import socket

import pytest

from nsnet.proto import bypass as pb
from nsnet.proto import fastpath as fp
from nsnet.proto import forwarder as fw
from nsnet.proto import helper as hp
from nsnet.proto import run as rn
from nsnet.proto import wire
from nsnet.proto.wire import MAX_DEPTH, ProtocolError


def enc(obj) -> bytes:
    return json.dumps(obj).encode()


# -- wire: the bounded decoder ----------------------------------------------------

@pytest.mark.parametrize("depth", [1000, 10000])
def test_deep_nesting_is_a_protocol_error_not_recursion(depth):
    for data in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        with pytest.raises(ProtocolError, match="nested deeper"):
            wire.decode(data)


def test_depth_bound_is_exact():
    ok = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert wire.decode(ok) is not None
    deep = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    with pytest.raises(ProtocolError):
        wire.decode(deep)
    # objects and arrays mixed count alike
    assert wire.decode(b'{"a":[{"b":[1]}]}') == {"a": [{"b": [1]}]}


def test_brackets_inside_strings_do_not_count():
    text = '{"error": "' + "[{" * 500 + '\\"[[[' + '"}'
    assert wire.decode(text.encode())["error"].startswith("[{[{")
    assert wire.nesting_ok(enc({"e": "]]]]}}}}"}))


def test_unbalanced_is_refused():
    for data in (b"[}", b"[[[", b"]]]", b"{"):
        with pytest.raises(ProtocolError):
            wire.decode(data)


@pytest.mark.parametrize("data,what", [
    (b"x" * (wire.MAX_MSG + 1), "bytes"),
    (b'{"a": "\xff"}', "UTF-8"),
    (b'{"a": NaN}', "not JSON"),
    (b'{"a": Infinity}', "not JSON"),
    (b'{"a": 1, "a": 2}', "not JSON"),
    (b"", "not JSON"),
    (b"{'a': 1}", "not JSON"),
])
def test_decode_refuses(data, what):
    with pytest.raises(ProtocolError, match=what):
        wire.decode(data)


@pytest.mark.parametrize("spec,value", [
    (wire.Int(), "12"),          # ints as strings
    (wire.Int(), True),          # a bool is not an int
    (wire.Int(), 1.0),
    (wire.Int(0, 10), 11),
    (wire.Int(1), 0),
    (wire.Str(4), "12345"),
    (wire.Str(), 3),
    (wire.Str(8, ("tcp",)), "udp"),
    (wire.Bool(), 1),
    (wire.Bool(), "true"),
    (wire.List(wire.Int(), 2), {"0": 1}),   # a dict for a list
    (wire.List(wire.Int(), 2), [1, 2, 3]),
    (wire.List(wire.Int(), 2), [1, "2"]),
    (wire.Map(wire.Int(), 2), [1, 2]),       # a list for a dict
    (wire.Map(wire.Int(), 2), {"a": 1, "b": 2, "c": 3}),
    (wire.Map(wire.Int(), 2, key_len=3), {"abcd": 1}),
    (wire.Obj({"a": wire.Int()}), {}),
    (wire.Obj({"a": wire.Int()}), {"a": 1, "b": 2}),
    (wire.Obj({"a": wire.Int()}), [["a", 1]]),
    (wire.Either(wire.Str(), wire.Null()), 0),
])
def test_specs_refuse_wrong_types_and_bounds(spec, value):
    with pytest.raises(ProtocolError):
        spec(value, "x")


def test_spec_errors_name_the_field():
    with pytest.raises(ProtocolError, match=r"ready\.failed_forwards\[1\]: a string"):
        fw.parse_message(enc({"event": "ready", "pid": 5, "failed_forwards": [1, "2"]}))


# -- forwarder control ------------------------------------------------------------

READY = {"event": "ready", "pid": 1234, "failed_forwards": [2]}
STATS = {"reply_to": 3, "ok": True, "stats": {"rx_frames": 1}, "connections": "",
         "connections_total": 0}


@pytest.mark.parametrize("msg", [
    READY,
    {"event": "failed", "error": "slirp_new failed"},
    {"event": "tap_error", "error": "EBADFD: File descriptor in bad state"},
    {"event": "poll_error"},
    {"reply_to": 1, "ok": True},
    {"reply_to": 2, "ok": False, "error": "in use"},
    STATS,
])
def test_forwarder_messages_accepted(msg):
    assert fw.parse_message(enc(msg)) == msg


@pytest.mark.parametrize("msg", [
    {"event": "ready", "pid": "1234", "failed_forwards": []},      # int as string
    {"event": "ready", "pid": 1234, "failed_forwards": {"1": 1}},  # dict for a list
    {"event": "ready", "pid": 1234},                               # missing field
    {"event": "ready", "pid": 0, "failed_forwards": []},           # not a PID
    {"event": "tap_error", "error": ["EBADFD"]},
    {"event": "tap_error", "error": "x" * 2000},
    {"event": "hello"},
    {"event": 1},
    {"event": ["ready"]},
    {"reply_to": "1", "ok": True},
    {"reply_to": 1, "ok": "yes"},
    {"reply_to": 1, "ok": True, "stats": ["rx", 1]},
    {"reply_to": 1, "ok": True, "stats": {"rx": "1"}},
    {"reply_to": 1, "ok": True, "stats": {f"k{i}": i for i in range(fw.MAX_STATS + 1)}},
    {"reply_to": 1, "ok": True, "connections_total": -1},
    {"reply_to": 1, "ok": True, "extra": 1},
    {"ok": True},
    [1, 2],
    "ready",
    None,
])
def test_forwarder_messages_refused(msg):
    with pytest.raises(ProtocolError):
        fw.parse_message(enc(msg))


def test_forwarder_reply_fields_per_op():
    assert fw.check_reply(fw.parse_message(enc(STATS)), "stats")
    with pytest.raises(ProtocolError, match="stats"):
        fw.check_reply(fw.parse_message(enc({"reply_to": 3, "ok": True})), "stats")
    with pytest.raises(ProtocolError, match="without an error"):
        fw.check_reply(fw.parse_message(enc({"reply_to": 3, "ok": False})), "add")


FWD = {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": 8080,
       "guest_addr": "10.0.2.100", "guest_port": 80, "mode": "slirp"}


def test_forwarder_checks_the_supervisors_requests():
    assert fw.parse_request(enc({"op": "add", "forward": FWD, "seq": 1}))["forward"] == FWD
    assert fw.parse_request(enc({"op": "stats", "seq": 9}))["seq"] == 9
    for bad in ({"op": "add", "forward": dict(FWD, host_port="8080"), "seq": 1},
                {"op": "add", "forward": dict(FWD, proto="sctp"), "seq": 1},
                {"op": "add", "forward": dict(FWD, host_port=70000), "seq": 1},
                {"op": "remove", "forward": [FWD], "seq": 1},
                {"op": "stats"},
                {"op": "stats", "seq": 0},
                {"op": "exec", "seq": 1},
                {"op": ["stats"], "seq": 1}):
        with pytest.raises(ProtocolError):
            fw.parse_request(enc(bad))
    fw.parse_tap(enc({"op": "tap"}), 1)
    for data, nfds in ((enc({"op": "tap"}), 0), (enc({"op": "tap"}), 2),
                       (enc({"op": "tap", "x": 1}), 1), (b"[" * 100 + b"]" * 100, 1)):
        with pytest.raises(ProtocolError):
            fw.parse_tap(data, nfds)


# -- fast path: supervisor <-> relay <-> connector ---------------------------------

def test_relay_protocol():
    assert fp.parse_relay_request(enc({"op": "connector", "seq": 2}), 1)["op"] == "connector"
    assert fp.parse_relay_request(enc({"op": "add", "forward": FWD, "seq": 3}), 0)
    for data, nfds in ((enc({"op": "connector", "seq": 2}), 0),
                       (enc({"op": "stats", "seq": 2}), 1),
                       (enc({"op": "add", "forward": {}, "seq": 3}), 0),
                       (enc({"op": "kill", "seq": 3}), 0)):
        with pytest.raises(ProtocolError):
            fp.parse_relay_request(data, nfds)
    assert fp.parse_relay_reply(enc({"reply_to": 1, "ok": True, "stats": {"active": 0}}),
                                "stats")["stats"] == {"active": 0}
    for reply, op in (({"reply_to": 1, "ok": True}, "stats"),
                      ({"reply_to": 1, "ok": False}, "add"),
                      ({"reply_to": 1, "ok": True, "stats": {"active": "0"}}, "stats"),
                      ({"reply_to": None, "ok": True}, "add")):
        with pytest.raises(ProtocolError):
            fp.parse_relay_reply(enc(reply), op)


def test_connector_protocol():
    assert fp.parse_connector_start(enc({"event": "ready", "pid": 7}))["pid"] == 7
    assert fp.parse_connector_start(enc({"event": "failed", "error": "setns"}))
    for msg in ({"event": "ready"}, {"event": "ready", "pid": [7]}, {"tag": 1, "ok": True}):
        with pytest.raises(ProtocolError):
            fp.parse_connector_start(enc(msg))
    assert fp.parse_connect_request(enc({"tag": 1, "addr": "127.0.0.1", "port": 80}))
    with pytest.raises(ProtocolError):
        fp.parse_connect_request(enc({"tag": 1, "addr": "127.0.0.1", "port": "80"}))
    pending = {5: object()}
    assert fp.parse_connect_reply(enc({"tag": 5, "ok": True}), 1, pending)["tag"] == 5
    assert fp.parse_connect_reply(enc({"tag": 5, "ok": False, "error": "refused"}), 0, pending)
    assert fp.parse_connect_reply(enc({"tag": 5, "ok": False, "error": "Connection refused",
                                       "errno": 111}), 0, pending)["errno"] == 111
    # What a connector taken over from inside the namespace might forge
    # (a list as tag crashed the relay: unhashable).
    for msg, nfds in (({"tag": [5], "ok": True}, 1),
                      ({"tag": {"5": 5}, "ok": True}, 1),
                      ({"tag": 6, "ok": True}, 1),      # not pending
                      ({"tag": 5, "ok": True}, 0),      # ok without the fd
                      ({"tag": 5, "ok": True}, 2),
                      ({"tag": 5, "ok": False}, 1),     # an fd with a refusal
                      ({"tag": 5, "ok": 1}, 1),
                      ({"tag": 5, "ok": False, "errno": 0}, 0),      # errno 1..4095
                      ({"tag": 5, "ok": False, "errno": 4096}, 0),
                      ({"tag": 5, "ok": False, "errno": "111"}, 0),
                      ({"tag": 5, "ok": False, "errno": True}, 0)):
        with pytest.raises(ProtocolError):
            fp.parse_connect_reply(enc(msg), nfds, pending)


# -- namespace helpers --------------------------------------------------------------

IFACE = {"ifname": "tap0", "ifindex": 2, "mtu": 65520, "mac": "02:50:00:00:00:01",
         "operstate": "UNKNOWN", "up": True, "addresses": ["10.0.2.100/24"],
         "routes": [{"dst": "default", "gateway": "10.0.2.2", "family": "inet"}]}


def test_helper_protocol():
    assert hp.parse_tap_result(enc({"ifindex": 3, "mac": "025000000001"}), 1) == (
        3, bytes.fromhex("025000000001"))
    assert hp.parse_tap_result(enc({"ifindex": 3, "mac": None}), 1) == (3, None)
    for msg, nfds in (({"ifindex": 3, "mac": None}, 0),
                      ({"ifindex": "3", "mac": None}, 1),
                      ({"ifindex": 3, "mac": "zz5000000001"}, 1),
                      ({"ifindex": 3, "mac": "0250"}, 1),
                      ({"ifindex": 3}, 1)):
        with pytest.raises(ProtocolError):
            hp.parse_tap_result(enc(msg), nfds)
    assert hp.parse_interface(enc(IFACE), 0) == IFACE
    assert hp.parse_interface(enc({"error": "no interface tap0"}), 0)
    for msg, nfds in ((IFACE, 1),
                      (dict(IFACE, addresses="10.0.2.100/24"), 0),
                      (dict(IFACE, routes=[{"dst": "x"}]), 0),
                      (dict(IFACE, addresses=["a"] * (hp.MAX_ADDRESSES + 1)), 0),
                      (dict(IFACE, up="yes"), 0),
                      ({"error": {"x": 1}}, 0)):
        with pytest.raises(ProtocolError):
            hp.parse_interface(enc(msg), nfds)


def test_run_handshake_error_text():
    assert rn.error_text(b"Ecannot unshare") == "cannot unshare"
    assert rn.error_text(b"E\x1b[2Jbad\xff") == "?[2Jbad\ufffd"
    assert len(rn.error_text(b"E" + b"x" * 100000)) == rn.MAX_ERROR_TEXT
    assert rn.error_text(b"U") is None


# -- a real socketpair: what the receiver reads --------------------------------------

def test_oversized_seqpacket_message_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        a.send(enc({"event": "failed", "error": "x" * (wire.MAX_MSG + 10)}))
        data = b.recv(wire.MAX_MSG + 1)  # the receivers read one byte more than allowed
        with pytest.raises(ProtocolError, match="bytes"):
            fw.parse_message(data)


AUDIT = {"event": "audit", "records": [
    {"time": 12.5, "proto": "tcp", "src": "10.0.2.100", "dst": "192.0.2.1", "action": "deny",
     "rule": 0, "sport": 40000, "dport": 443, "name": "x.test", "rule_text": "deny x.test"},
    {"time": 13, "proto": "icmp", "src": "10.0.2.100", "dst": "192.0.2.1", "action": "allow",
     "rule": None, "rule_text": "default allow"}]}


def test_forwarder_policy_messages():
    assert fw.parse_message(enc(AUDIT)) == AUDIT
    for bad in (dict(AUDIT, records={"0": AUDIT["records"][0]}),
                dict(AUDIT, records=[dict(AUDIT["records"][0], time="12.5")]),
                dict(AUDIT, records=[dict(AUDIT["records"][0], rule=-1)]),
                dict(AUDIT, records=[dict(AUDIT["records"][0], action="maybe")]),
                dict(AUDIT, records=AUDIT["records"][:1] * (fw.MAX_AUDIT + 1))):
        with pytest.raises(ProtocolError):
            fw.parse_message(enc(bad))
    with pytest.raises(ProtocolError):  # NaN is not JSON, a fortiori not a time
        fw.parse_message(enc(AUDIT).replace(b"12.5", b"NaN"))
    assert fw.parse_message(enc(dict(STATS, policy={"flows_denied": 2})))["policy"]
    assert fw.parse_request(enc({"op": "policy_part", "index": 0, "data": "{", "seq": 4}))
    assert fw.parse_request(enc({"op": "policy", "last_part": "}", "parts": 2,
                                 "keep_established": False, "audit_all": True, "seq": 5}))
    with pytest.raises(ProtocolError):
        fw.parse_request(enc({"op": "policy", "last_part": "}", "parts": "2",
                              "keep_established": False, "audit_all": True, "seq": 5}))


# -- the bypass handler's audit stream ------------------------------------------------

GW, GUEST = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 100])


def test_bypass_audit_records():
    one = pb.pack(1_800_000_000_123, 4, 0, 40000, 8000, GUEST, GW)
    six = pb.pack(1_800_000_000_456, 6, 1, 0, 443, bytes(16),
                  bytes.fromhex("fd000000000000000000000000000002"))
    assert len(one) == pb.RECORD_SIZE == 48
    recs, rest = pb.parse(one + six + one[:10])
    assert rest == one[:10]
    assert recs == [
        {"time": 1_800_000_000.123, "proto": "tcp", "src": "10.0.2.100", "sport": 40000,
         "dst": "10.0.2.2", "dport": 8000, "action": "allow"},
        {"time": 1_800_000_000.456, "proto": "tcp", "src": "::", "sport": 0,
         "dst": "fd00::2", "dport": 443, "action": "deny"}]
    assert pb.parse(rest + one[10:])[0] == recs[:1]  # a record split over two reads
    for bad in (pb.pack(1, 5, 0, 1, 80, GUEST, GW),            # family
                pb.pack(1, 4, 2, 1, 80, GUEST, GW),            # action
                pb.pack(1, 4, 0, 1, 80, GUEST, GW, pad=b"\0x"),  # padding
                pb.pack(1, 4, 0, 1, 80, GUEST + b"x", GW),     # IPv4 with more bytes
                pb.pack(1, 4, 0, 1, 0, GUEST, GW),             # destination port 0
                pb.pack(0, 4, 0, 1, 80, GUEST, GW),            # no time
                pb.pack(-5, 4, 0, 1, 80, GUEST, GW),
                pb.pack(1 << 62, 4, 0, 1, 80, GUEST, GW)):
        with pytest.raises(ProtocolError):
            pb.parse(one + bad)


def test_bypass_audit_capped_by_the_supervisor():
    """The supervisor writes at most the forwarder's burst of the handler's
    records at once, whatever the handler sends; the rest are counted."""
    from nsnet.policy import Policy
    from nsnet.supervisor.policy import BYPASS_AUDIT_BURST, PolicyControl

    pc = PolicyControl(Policy.parse_json({"egress": "deny", "rules": [
        {"action": "allow", "proto": "tcp", "dest": "10.0.2.2"}]}), audit_all=True)
    got = []
    pc.on_audit = lambda msg: got.extend(msg["records"])
    rec = pb.parse(pb.pack(1_800_000_000_000, 4, 0, 40000, 8000, GUEST, GW))[0][0]
    pc.on_bypass_audit([rec] * (BYPASS_AUDIT_BURST + 500))
    assert len(got) == BYPASS_AUDIT_BURST and pc.bypass_audit_capped == 500
    assert got[0] == dict(rec, rule=0, rule_text="allow tcp:10.0.2.2", bypass=True)
    deny = dict(rec, dst="192.0.2.1", action="deny")
    got.clear()
    pc._bypass_tokens = 10.0
    # a refusal the policy decided names its rule; one it did not (the
    # policy allows the gateway, the handler refused) says so
    pc.on_bypass_audit([deny, dict(rec, dport=22, action="deny")])
    assert [(r["rule"], r["rule_text"]) for r in got] == [
        (None, "default deny"), (None, "bypass: a host socket cannot connect there")]
