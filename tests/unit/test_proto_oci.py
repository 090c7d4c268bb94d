"""The OCI runtime's seccomp listener message (nsnet/proto/oci.py), as a
hostile sender can shape it: every refusal is a ProtocolError."""
from __future__ import annotations

import json

import pytest

from nsnet.proto import helper as hp
from nsnet.proto import oci
from nsnet.proto.wire import ProtocolError

# What runc 1.1.5 sends (recorded from a real run; pid changed)
RUNC = (b'{"ociVersion":"1.0.2-dev","fds":["seccompFd"],"pid":8128,"metadata":"hello",'
        b'"state":{"ociVersion":"1.0.2-dev","id":"t1","status":"creating","pid":8128,'
        b'"bundle":"/tmp/ocix/b"}}')


def state(**over):
    msg = json.loads(RUNC)
    for k, v in over.items():
        if v is None:
            msg.pop(k)
        else:
            msg[k] = v
    return json.dumps(msg).encode()


def test_runc_message_parses():
    msg = oci.parse_state(RUNC, 1)
    assert msg["pid"] == 8128 and msg["state"]["id"] == "t1" and msg["metadata"] == "hello"
    # optional: metadata, state.pid, state.annotations
    st = json.loads(RUNC)["state"]
    st.pop("pid")
    st["annotations"] = {"a": "b"}
    assert oci.parse_state(state(metadata=None, state=st), 1)["state"]["annotations"] == {"a": "b"}


@pytest.mark.parametrize("data, nfds, what", [
    (RUNC, 0, "with 0 fds"),
    (RUNC, 2, "with 2 fds"),
    (state(fds=["seccompFd", "other"]), 2, "fds is"),
    (state(fds=[]), 1, "fds is"),
    (state(fds=["notseccomp"]), 1, "fds is"),
    (state(pid=0), 1, "pid"),
    (state(pid=-5), 1, "pid"),
    (state(pid="1"), 1, "pid"),
    (state(pid=1 << 40), 1, "pid"),
    (state(pid=4242), 1, "pid and state.pid differ"),
    (state(extra=1), 1, "unexpected field"),
    (state(state={"ociVersion": "1", "id": "x", "status": "stopped", "bundle": "/"}), 1,
     "status"),
    (state(state={"ociVersion": "1", "id": "x", "status": "creating"}), 1, "bundle"),
    (state(metadata="m" * 5000), 1, "metadata"),
    (state(ociVersion=None), 1, "ociVersion"),
    (b"[]", 1, "not an object"),
    (b"\xff\xfe", 1, "UTF-8"),
    (RUNC[:-1], 1, "nested|JSON"),  # not whole: brackets unbalanced
    (b" " * (oci.MAX_STATE + 1), 1, "more than"),
])
def test_refused(data, nfds, what):
    with pytest.raises(ProtocolError, match=what):
        oci.parse_state(data, nfds)


def test_whole_or_not():
    """decode_state tells a prefix (wait for more) from a whole value."""
    for cut in (1, 10, len(RUNC) - 1):
        with pytest.raises(ProtocolError):
            oci.decode_state(RUNC[:cut])
    assert oci.decode_state(RUNC)["pid"] == 8128


def test_netfacts_message():
    ok = json.dumps({"cookie": 4096, "sndbuf": 16384, "rcvbuf": 131072}).encode()
    assert hp.parse_netfacts(ok, 0)["cookie"] == 4096
    assert hp.parse_netfacts(b'{"error":"no"}', 0) == {"error": "no"}
    for bad, n in ((ok, 1), (b'{"cookie":0,"sndbuf":1,"rcvbuf":1}', 0),
                   (b'{"cookie":1,"sndbuf":1}', 0), (b"1", 0)):
        with pytest.raises(ProtocolError):
            hp.parse_netfacts(bad, n)
