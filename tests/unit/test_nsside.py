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
