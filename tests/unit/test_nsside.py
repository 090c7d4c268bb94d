"""Namespace-side children never have libslirp mapped (issue 11): they are
forked from the supervisor only while it has not loaded the libslirp
binding, so nothing the supervisor and the front ends import on the path
to ready may load it (tests/test_ns_attack.py checks /proc/PID/maps of the
children themselves)."""
from __future__ import annotations

import subprocess
import sys


def test_front_ends_and_supervisor_do_not_load_libslirp_at_import():
    code = ("import sys, nsnet.cli, nsnet.run, nsnet.supervisor, nsnet.supervisor.fastpath, "
            "nsnet.ns.helper, nsnet.ns.connector; "
            "print('nsnet._slirp_cffi' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         timeout=60, check=True).stdout.strip()
    assert out == "False"


def test_spawn_execs_once_the_binding_is_loaded(monkeypatch):
    from nsnet.ns import helper

    monkeypatch.delitem(sys.modules, "nsnet._slirp_cffi", raising=False)
    assert not helper._libslirp_loaded()
    monkeypatch.setitem(sys.modules, "nsnet._slirp_cffi", object())
    assert helper._libslirp_loaded()


def test_exec_spawn_not_named_before_the_exec(monkeypatch):
    """Once the binding is loaded, spawn() forks and execs a fresh
    interpreter, which names itself: the fork must not take the
    namespace-side name before the exec, while libslirp is still mapped in
    it (a /proc watcher, tests/test_ns_attack.py, tells the children apart
    by name).  Records, in the child, each naming and the exec."""
    import os
    import socket

    from nsnet import children
    from nsnet.ns import helper

    r, w = os.pipe()
    monkeypatch.setitem(sys.modules, "nsnet._slirp_cffi", object())
    monkeypatch.setattr(children.linux, "set_process_name",
                        lambda name: os.write(w, f"name {name}\n".encode()))

    def fake_exec(path, argv):  # in the child: say so, and end there
        os.write(w, b"exec\n")
        os._exit(0)

    monkeypatch.setattr(helper.os, "execv", fake_exec)
    a, b = socket.socketpair()
    null = os.open(os.devnull, os.O_RDONLY)
    ns = helper.NsFds(null, w)  # w rides as the "user namespace" fd: spawn keeps it
    try:
        pid = helper.spawn("nsnet-connect", "connector", ns, b, {})
        os.waitpid(pid, 0)
        os.set_blocking(r, False)
        seen = os.read(r, 4096).decode().split("\n")
    finally:
        for fd in (r, w, null):
            os.close(fd)
        a.close()
        b.close()
    assert "exec" in seen, seen
    assert not [s for s in seen[:seen.index("exec")] if s.startswith("name")], seen
