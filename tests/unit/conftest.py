"""The unit tier: tests that need no root and no namespace.

They import the INSTALLED nsnet (the venv's site-packages, compiled cffi
modules included) and call it directly: protocol validation, the JSON API
parser through a fake backend, port specs, netconfig, rtnetlink message
building, seccomp rule building, command-line parsing.

How it runs (scripts/test.sh does this first, before the end-to-end tier):

    $VENV/bin/pytest -p no:cacheprovider --rootdir . --confcutdir tests/unit tests/unit

`--confcutdir tests/unit` keeps tests/conftest.py (the end-to-end tier's,
which re-executes pytest as root in a private network namespace) out of
this run; scripts/test.sh runs the tier as the unprivileged test user when
it can, which proves the "no root" part.  To add unit tests, drop a
`test_*.py` file here; nothing else to register.  Rules: no root, no
namespaces, no subprocesses that need privileges, no network but sockets
this process makes itself (netlink to its own namespace, socketpairs).
"""
from __future__ import annotations

import os

import pytest

import nsnet


def pytest_report_header(config):
    return [f"nsnet unit tier: uid {os.geteuid()}, nsnet from {os.path.dirname(nsnet.__file__)}"]


def pytest_configure(config):
    # NSNET_VENV selects the build under test (tests/harness.py): the unit
    # tier must import that build, not whatever the running pytest has.
    venv = os.environ.get("NSNET_VENV")
    if venv:
        real = os.path.realpath(nsnet.__file__)
        if not real.startswith(os.path.realpath(venv) + os.sep):
            pytest.exit(f"NSNET_VENV={venv} but nsnet is imported from {real}: run "
                        f"{venv}/bin/pytest (the unit tier imports nsnet in-process)",
                        returncode=3)


# Case tables shared with the end-to-end tier (pure data: tests/api_cases.py).
import sys  # noqa: E402

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
