"""Property: whatever arrives on nsnet's API socket, it answers one JSON object and stays up.

nsnet only: slirp4netns 1.2.0 segfaults on several of these inputs.
Addresses are drawn from loopback, the namespace's own subnet and junk, so
even a forward that gets added leads nowhere else (nobody connects to it).
"""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import api_call, nsnet_only, unpriv_only

pytestmark = [pytest.mark.timeout(300),
              nsnet_only,
              unpriv_only]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**33, 2**33),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
addresses = st.sampled_from(["127.0.0.1", "0.0.0.0", "", "::1", "::", "10.0.2.100",
                             "10.0.2.15", "junk", "1.2.3", "127.0.0.1 ", "fd00::100"])
ports = st.one_of(st.integers(-5, 70000), st.sampled_from([0, 1, 65535, 65536]),
                  st.text(max_size=6), st.none())
add_arguments = st.fixed_dictionaries({}, optional={
    "proto": st.one_of(st.sampled_from(["tcp", "udp", "TCP", "sctp", ""]), json_values),
    "host_addr": st.one_of(addresses, json_values),
    "host_port": ports,
    "guest_addr": st.one_of(addresses, json_values),
    "guest_port": ports,
})
requests = st.one_of(
    st.builds(lambda a: {"execute": "add_hostfwd", "arguments": a}, add_arguments),
    st.builds(lambda i: {"execute": "remove_hostfwd", "arguments": {"id": i}},
              st.one_of(st.integers(-3, 50), json_values)),
    st.builds(lambda e, a: {"execute": e, "arguments": a},
              st.one_of(st.sampled_from(["list_hostfwd", "add_hostfwd", "remove_hostfwd",
                                         "bogus", ""]), json_values), json_values),
    json_values,
)
encoded = st.one_of(requests.map(lambda r: json.dumps(r).encode()),
                    st.binary(max_size=300),
                    requests.map(lambda r: json.dumps(r).encode()[:-1]))  # truncated


def test_nsnet_api_never_breaks(impl, connect):
    net = connect()

    first_failure: list[bytes] = []

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(encoded)
    def one(request: bytes):
        try:
            check(request)
        except BaseException:
            if not first_failure:
                first_failure.append(request)
            raise

    def check(request: bytes):
        reply = api_call(net.api, request)
        obj = json.loads(reply)  # exactly one JSON document
        assert isinstance(obj, dict) and obj, reply
        assert set(obj) <= {"return", "error", "entries"}, reply
        if "error" in obj:
            assert set(obj) == {"error"}
            assert isinstance(obj["error"].get("desc"), str), reply
            assert obj["error"]["desc"].startswith("bad request: "), reply
        assert net.fwd.alive(), f"nsnet died on {request!r}"

    try:
        one()
    except BaseException as e:
        # Once the process is dead every later example fails too: name the first.
        if first_failure:
            raise AssertionError(f"first failing request: {first_failure[0]!r}") from e
        raise
    reply = json.loads(api_call(net.api, b'{"execute":"list_hostfwd"}'))
    # Every listed forward is well-formed.
    for e in reply["entries"]:
        assert e["proto"] in ("tcp", "udp")
        assert 1 <= e["host_port"] <= 65535 and 1 <= e["guest_port"] <= 65535, e
