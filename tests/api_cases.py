"""API requests and the exact replies slirp4netns 1.2.0 gives (observed on Debian 12).

Shared by test_api.py (each implementation against these bytes) and
test_differential.py (both implementations against each other).
"""
import json


def err(desc: str) -> bytes:
    return b'{"error":{"desc":"' + desc.encode() + b'"}}'


def add(proto="tcp", host_addr="127.0.0.1", host_port=18080, guest_port=80, **extra) -> bytes:
    args = {"proto": proto}
    if host_addr is not None:
        args["host_addr"] = host_addr
    args["host_port"] = host_port
    args["guest_port"] = guest_port
    args.update(extra)
    return json.dumps({"execute": "add_hostfwd", "arguments": args},
                      separators=(",", ":")).encode()


def remove(id_) -> bytes:
    return json.dumps({"execute": "remove_hostfwd", "arguments": {"id": id_}},
                      separators=(",", ":")).encode()


LIST = b'{"execute":"list_hostfwd"}'
BAD_PROTO = err("bad request: add_hostfwd: bad arguments.proto")
BAD_HOST_ADDR = err("bad request: add_hostfwd: bad arguments.host_addr")
BAD_HOST_PORT = err("bad request: add_hostfwd: bad arguments.host_port")
BAD_GUEST_ADDR = err("bad request: add_hostfwd: bad arguments.guest_addr")
BAD_GUEST_PORT = err("bad request: add_hostfwd: bad arguments.guest_port")
ADD_FAILED = err("bad request: add_hostfwd: slirp_add_hostfwd failed")
BAD_ID = err("bad request: remove_hostfwd: bad arguments.id")
CANNOT_PARSE = err("bad request: cannot parse JSON")
NOT_OBJECT = err("bad request: json_object() failed")
NO_EXECUTE = err("bad request: no execute found")
UNKNOWN_EXECUTE = err("bad request: unknown execute")
TOO_LARGE = err("bad request: too large message")

# Requests that do not change state, with slirp4netns's replies.  Each is
# sent on a fresh connection; none of these may crash either implementation.
STATELESS_ERRORS = [
    ("malformed JSON", b"{", CANNOT_PARSE),
    ("empty request", b"", CANNOT_PARSE),
    ("duplicate key", b'{"execute":"list_hostfwd","execute":"bogus"}', CANNOT_PARSE),
    ("array", b"[]", NOT_OBJECT),
    ("number", b"1", NOT_OBJECT),
    ("string", b'"x"', NOT_OBJECT),
    ("null", b"null", NOT_OBJECT),
    ("empty object", b"{}", NO_EXECUTE),
    ("no execute", b'{"foo":1}', NO_EXECUTE),
    ("execute not a string", b'{"execute":1}', NO_EXECUTE),
    ("execute null", b'{"execute":null}', NO_EXECUTE),
    ("unknown execute", b'{"execute":"bogus"}', UNKNOWN_EXECUTE),
    ("execute is case-sensitive", b'{"execute":"LIST_HOSTFWD"}', UNKNOWN_EXECUTE),
    ("4096 bytes", LIST + b" " * (4096 - len(LIST)), TOO_LARGE),
    ("5000 bytes", LIST + b" " * (5000 - len(LIST)), TOO_LARGE),
    ("proto unknown", add(proto="sctp"), BAD_PROTO),
    ("proto upper-case", add(proto="TCP"), BAD_PROTO),
    # slirp4netns checks the value of proto before any other field
    ("proto bad, nothing else", b'{"execute":"add_hostfwd","arguments":{"proto":"bad"}}',
     BAD_PROTO),
    ("proto bad, bad ports", add(proto="bad", host_port="x", guest_port=None), BAD_PROTO),
    ("host_addr not an address", add(host_addr="bogus"), BAD_HOST_ADDR),
    ("host_port a string", add(host_port="18080"), BAD_HOST_PORT),
    ("host_port missing",
     b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","guest_port":80}}',
     BAD_HOST_PORT),
    ("guest_addr not an address", add(guest_addr="bogus"), BAD_GUEST_ADDR),
    ("guest_port a string", add(guest_port="80"), BAD_GUEST_PORT),
    ("guest_port missing",
     b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":18080}}',
     BAD_GUEST_PORT),
    ("guest_port 0", add(guest_port=0), BAD_GUEST_PORT),
    ("remove unknown id", remove(99), BAD_ID),
    ("remove id 0", remove(0), BAD_ID),
    ("remove id -1", remove(-1), BAD_ID),
    ("remove id a string", remove("1"), BAD_ID),
    ("remove id true", remove(True), BAD_ID),
    ("remove without id", b'{"execute":"remove_hostfwd","arguments":{}}', BAD_ID),
    ("remove without arguments", b'{"execute":"remove_hostfwd"}', BAD_ID),
]

# Where nsnet differs on purpose (README, differences): slirp4netns refuses
# host_port 0; nsnet lets the kernel pick the port and replies with it,
# {"return":{"id":N,"host_port":P}}.
SLIRP4NETNS_ONLY = [
    ("host_port 0", add(host_port=0), BAD_HOST_PORT),
]

# Accepted variants of list_hostfwd (state-independent when nothing was added).
LIST_VARIANTS = [
    ("plain", LIST),
    ("with arguments", b'{"execute":"list_hostfwd","arguments":{}}'),
    ("whitespace", b' {"execute" : "list_hostfwd" } '),
    ("trailing newline (Podman)", LIST + b"\n"),
    ("4095 bytes", LIST + b" " * (4095 - len(LIST))),
]


def entry(id_, proto, host_addr, host_port, guest_addr, guest_port) -> dict:
    return {"id": id_, "proto": proto, "host_addr": host_addr, "host_port": host_port,
            "guest_addr": guest_addr, "guest_port": guest_port}


def entries_json(entries) -> bytes:
    return json.dumps(entries, separators=(",", ":")).encode()


def list_reply(impl_name: str, entries) -> bytes:
    """slirp4netns: {"entries":[...]}; nsnet additionally mirrors them under
    "return" (QMP-style clients look there): {"entries":E,"return":{"entries":E}}."""
    e = entries_json(entries)
    if impl_name == "nsnet":
        return b'{"entries":' + e + b',"return":{"entries":' + e + b"}}"
    return b'{"entries":' + e + b"}"


def entries_of(reply: bytes) -> list:
    return json.loads(reply)["entries"]
