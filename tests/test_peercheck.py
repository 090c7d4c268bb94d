"""The API's peer check (nsnet/supervisor/peercheck.py) on its own: real
user namespaces (an unprivileged user may make them), a real AF_UNIX
listener, no nsnet process.  A client in the guarded user namespace or one
below it is refused; this process, its children outside, and a sibling
namespace are served."""
from __future__ import annotations

import ctypes
import json
import os
import socket
import tempfile

import pytest

pytestmark = pytest.mark.timeout(60)

from nsnet.supervisor.apiserver import refusal_reply
from nsnet.supervisor.peercheck import PeerCheck

CLONE_NEWUSER = 0x10000000


def _unshare_user(map_ids: bool) -> None:
    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        os._exit(3)
    if map_ids:  # root inside is the outer uid: it may nest another one
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                           ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


class Proc:
    """A child: optionally in a new user namespace (nested `depth` deep);
    on a line from the parent it connects to PATH and waits."""

    def __init__(self, depth: int, map_ids: bool = True) -> None:
        self.go_r, go_w = os.pipe()
        ready_r, self.ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(go_w)
            os.close(ready_r)
            for _ in range(depth):
                _unshare_user(map_ids)
            os.write(self.ready_w, b"u")
            path = os.read(self.go_r, 4096).decode()
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            os.write(self.ready_w, b"c")
            os.read(self.go_r, 1)  # until the parent is done
            os._exit(0)
        os.close(self.go_r)
        os.close(self.ready_w)
        self.go_w, self.ready_r = go_w, ready_r
        if os.read(ready_r, 1) != b"u":
            pytest.skip("unprivileged user namespaces are not available")

    def connect(self, path: str) -> None:
        os.write(self.go_w, path.encode())
        assert os.read(self.ready_r, 1) == b"c"

    def close(self) -> None:
        os.close(self.go_w)
        os.waitpid(self.pid, 0)
        os.close(self.ready_r)


@pytest.fixture
def listener():
    d = tempfile.mkdtemp(prefix="peercheck.")
    path = os.path.join(d, "s")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    yield path, srv
    srv.close()
    os.unlink(path)
    os.rmdir(d)


def _check_for(check: PeerCheck, proc: Proc, path: str, srv: socket.socket):
    proc.connect(path)
    conn, _ = srv.accept()
    try:
        return check.refusal(conn)
    finally:
        conn.close()


def test_refuses_the_target_and_below_serves_the_rest(listener):
    path, srv = listener
    target = Proc(1, map_ids=False)  # no map: its creator's uid stays its own
    procs = [target]
    try:
        fd = os.open(f"/proc/{target.pid}/ns/user", os.O_RDONLY)
        try:
            check = PeerCheck(fd, None, target.pid)
        finally:
            os.close(fd)
        assert check.active
        got = _check_for(check, target, path, srv)
        assert got is not None and got[0] == target.pid and "inside" in got[1], got
        # Outside: this process's child in our own namespace; a sibling namespace.
        for depth in (0, 1):
            p = Proc(depth)
            procs.append(p)
            assert _check_for(check, p, path, srv) is None
        check.close()
    finally:
        for p in reversed(procs):  # later children hold earlier pipes too
            p.close()


def test_nested_below_the_target_is_refused(listener):
    """The nested process's user namespace is a grandchild of ours; the
    target is the child on its path (found by walking up)."""
    path, srv = listener
    p = Proc(2)
    try:
        # The nested namespace's parent: open it from the child's own.
        import fcntl

        fd = os.open(f"/proc/{p.pid}/ns/user", os.O_RDONLY)
        parent = fcntl.ioctl(fd, 0xB702)  # NS_GET_PARENT
        os.close(fd)
        try:
            check = PeerCheck(parent, None, None)
        finally:
            os.close(parent)
        got = _check_for(check, p, path, srv)
        assert got is not None and "inside" in got[1], got
        check.close()
    finally:
        p.close()


def test_own_namespace_is_no_boundary(listener):
    with open("/proc/self/ns/user", "rb", buffering=0) as f:
        check = PeerCheck(f.fileno(), None, os.getpid())
    assert not check.active
    path, srv = listener
    p = Proc(0)
    try:
        assert _check_for(check, p, path, srv) is None
    finally:
        p.close()


def test_refusal_reply_shape():
    reply = json.loads(refusal_reply("the client runs inside the namespace nsnet serves"))
    assert list(reply) == ["error"] and list(reply["error"]) == ["desc"]
    assert reply["error"]["desc"].startswith("permission denied: the client runs inside")
