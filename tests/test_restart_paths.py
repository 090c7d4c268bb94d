"""Forwarder restarts that go wrong: a replacement that never gets ready
(the start timeout kills it and starts another), and a termination signal
while a replacement is being set up.  The hang is injected from outside
with NSNET_FAULT_FORWARDER_START=FILE holding "hang" (docs/lifecycle.md)."""
from __future__ import annotations

import json
import os
import select
import signal

import pytest

import harness
from harness import Impl, api_call, wait_until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.parametrize("user", ["unpriv"], indirect=True)]

GW = "10.0.2.2"
START_TIMEOUT = 10.0  # nsnet/supervisor/forwarder.py FORWARDER_START_TIMEOUT


@pytest.fixture
def faulty(workdir):
    """(Impl running nsnet with the fault hook set, path of the fault file)."""
    fault = os.path.join(workdir, "fault")
    wrapper = os.path.join(workdir, "nsnet-fault.sh")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec /usr/bin/env NSNET_FAULT_FORWARDER_START={fault} '
                f'{harness.nsnet_bin()} "$@"\n')
    os.chmod(wrapper, 0o755)
    return Impl("nsnet", wrapper), fault


def info(api: str) -> dict:
    return json.loads(api_call(api, {"execute": "get_info"}))["return"]


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""  # exited (and reaped) between the listing and the read


def forwarder_children(pid: int) -> list[int]:
    return [c for c in harness.child_pids(pid) if _comm(c) == "nsnet-forwarder"]


def hang_next_start(fault: str) -> None:
    with open(fault, "w") as f:
        f.write("hang\n")
    os.chmod(fault, 0o644)


def test_start_timeout_kills_and_replaces(faulty, ns, attach, host_server, user):
    impl, fault = faulty
    net = attach(impl, ns)
    srv = host_server("echo")
    assert ns.client("connect", GW, srv.port)["ok"] is True
    first = info(net.api)["forwarder_pid"]
    hang_next_start(fault)
    os.kill(first, signal.SIGKILL)
    # The replacement hangs; the supervisor kills it after the start timeout.
    hung = wait_until(lambda: [p for p in forwarder_children(net.fwd.pid) if p != first],
                      10, what="a replacement forwarder")[0]
    os.unlink(fault)  # the next start works
    pidfd = os.pidfd_open(hung)
    try:
        r, _, _ = select.select([pidfd], [], [], START_TIMEOUT + 10)
        assert r, f"hung forwarder {hung} still alive after {START_TIMEOUT + 10} s"
    finally:
        os.close(pidfd)
    wait_until(lambda: info(net.api)["restarts"] >= 1, 20, interval=0.1,
               what="a working forwarder")
    now = info(net.api)["forwarder_pid"]
    assert now not in (first, hung)
    assert ns.client("connect", GW, srv.port)["ok"] is True
    log = net.fwd.log()
    assert f"not ready within {START_TIMEOUT:g} s" in log, log


def test_signal_while_replacement_starts(faulty, ns, attach, user):
    """SIGTERM while the replacement hangs in set-up: nsnet exits 0 at once
    (not after the start timeout) and takes the hung forwarder with it."""
    impl, fault = faulty
    net = attach(impl, ns)
    first = info(net.api)["forwarder_pid"]
    hang_next_start(fault)
    os.kill(first, signal.SIGKILL)
    hung = wait_until(lambda: [p for p in forwarder_children(net.fwd.pid) if p != first],
                      10, what="a replacement forwarder")[0]
    os.kill(net.fwd.pid, signal.SIGTERM)
    assert net.fwd.wait_exit(START_TIMEOUT / 2) == 0
    wait_until(lambda: not os.path.exists(f"/proc/{hung}") or
               open(f"/proc/{hung}/stat").read().split(") ")[1][0] == "Z", 5,
               what="the hung forwarder gone")
    assert not os.path.exists(net.api)
