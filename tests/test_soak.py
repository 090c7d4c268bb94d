"""Load and soak, loopback only, bounded in time.

- N concurrent TCP connections from the namespace to a host server on
  127.0.0.1 (through 10.0.2.2), all open at once, every byte checked;
- N concurrent TCP connections from the host through a port forward into
  the namespace, likewise;
- minutes of mixed traffic (TCP, UDP, forwards, API calls) while the RSS
  and open fds of the supervisor and the forwarder are sampled: no growth
  trend, nothing lost.

CI runs short versions (200 connections, NSNET_SOAK_SHORT_SECONDS=20 s of
mixed traffic: bounds only); `-m soak` runs 1,000 connections each way
and NSNET_SOAK_SECONDS (default 600 s) of mixed traffic, whose last
part (after libslirp's 240 s UDP expiry has come round) must show no
growth trend.  The forwarder runs
sandboxed with the seccomp filter, as RootlessKit starts it.
"""
import json
import os
import resource
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import (NS_PYTHON, add_hostfwd, api_call, free_port, payload, read_line,
                     tcp_send, wait_until)

GW = "10.0.2.2"
SHORT_SECONDS = float(os.environ.get("NSNET_SOAK_SHORT_SECONDS", "20"))
SOAK_SECONDS = float(os.environ.get("NSNET_SOAK_SECONDS", "600"))
# libslirp keeps a host UDP socket for 240 s after a guest flow's last
# datagram, and every round opens new flows: memory and fds only reach
# their steady state after that.  The trend is judged after it.
WARMUP_SECONDS = 260
FLAGS = ("--enable-sandbox", "--enable-seccomp")
CONN_BYTES = 16 * 1024

pytestmark = [pytest.mark.timeout(1800),
              pytest.mark.parametrize("impl", ["nsnet"], indirect=True),
              pytest.mark.parametrize("user", ["unpriv"], indirect=True)]


@pytest.fixture(autouse=True)
def nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def nsload(base_dir):
    """Path of tests/nsload.py as installed for the namespace (harness.install_helpers)."""
    return os.path.join(base_dir, "nsload.py")


def info(api):
    return json.loads(api_call(api, {"execute": "get_info"}))["return"]


def proc_sample(pid: int) -> tuple[int, int]:
    """(RSS in kB, open fds) of pid."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """Samples (t, sup rss, sup fds, fwd rss, fwd fds) every `interval` s."""

    def __init__(self, sup: int, fwd: int, interval: float = 1.0, work=lambda: 0):
        self.sup, self.fwd, self.interval, self.work = sup, fwd, interval, work
        self.samples: list[tuple[float, int, int, int, int]] = []
        self._stop = threading.Event()
        self.t0 = time.monotonic()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                s = proc_sample(self.sup)
                f = proc_sample(self.fwd)
            except OSError:
                break
            self.samples.append((round(time.monotonic() - self.t0, 1), *s, *f, self.work()))
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._t.join(10)

    def peak_fwd_fds(self) -> int:
        return max((s[4] for s in self.samples), default=0)


class HostLoad:
    """nsload.py on the host side (in the isolated test netns)."""

    def __init__(self, script: str, *args):
        self.proc = subprocess.Popen(["/usr/bin/python3", script, *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.port = None
        if args[0] == "serve":
            line = read_line(self.proc.stdout, 15)
            assert line.startswith(b"READY"), line
            self.port = int(line.split()[1])

    def result(self, timeout: float = 600) -> dict:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return json.loads(out.decode().strip().splitlines()[-1])

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def fds_settle(pid: int, baseline: int, slack: int = 2, timeout: float = 60) -> int:
    """Wait until pid holds at most baseline+slack fds again (libslirp frees a
    closed connection's socket after its TCP timers, up to 2*MSL = 10 s);
    return the count.  Fails if it never does: a leak."""
    last = [0]

    def settled():
        last[0] = proc_sample(pid)[1]
        return last[0] <= baseline + slack

    try:
        wait_until(settled, timeout, interval=0.5, what="fds back to baseline")
    except AssertionError:
        raise AssertionError(f"pid {pid}: {last[0]} fds {timeout} s after the load, "
                             f"baseline {baseline} (+{slack})") from None
    return last[0]


def conn_counts():
    return [pytest.param(200, id="200"), pytest.param(1000, id="1000", marks=pytest.mark.soak)]


@pytest.mark.parametrize("n", conn_counts())
def test_concurrent_connections_ns_to_host(connect, nsload, n, record_property):
    net = connect(*FLAGS)
    fwd = info(net.api)["forwarder_pid"]
    server = HostLoad(nsload, "serve", "127.0.0.1", 0, n)
    baseline = proc_sample(fwd)[1]
    sampler = Sampler(net.fwd.pid, fwd, 0.2)
    try:
        cp = net.ns.run([NS_PYTHON, nsload, "client", GW, server.port, n, CONN_BYTES, 64, 2],
                        timeout=900, text=True)
        client = json.loads(cp.stdout.strip().splitlines()[-1])
        served = server.result()
    finally:
        sampler.stop()
        server.close()
    print(f"\nns->host: {client} server={served} peak forwarder fds={sampler.peak_fwd_fds()}")
    record_property("ns_to_host", dict(client, peak_forwarder_fds=sampler.peak_fwd_fds()))
    assert client["peak_open"] == n and client["verified"] == n
    assert served["served"] == n and served["peak_open"] == n
    assert sampler.peak_fwd_fds() >= n  # the forwarder held them all at once
    fds_settle(fwd, baseline)  # ... and let them all go
    assert info(net.api)["forwarder_pid"] == fwd and info(net.api)["restarts"] == 0


@pytest.mark.parametrize("n", conn_counts())
def test_concurrent_connections_via_port_forward(connect, nsload, n, record_property):
    net = connect(*FLAGS)
    fwd = info(net.api)["forwarder_pid"]
    proc = net.ns.popen([NS_PYTHON, nsload, "serve", "0.0.0.0", 0, n],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = Sampler(net.fwd.pid, fwd, 0.2)
    try:
        line = read_line(proc.stdout, 15)
        assert line.startswith(b"READY"), line
        guest_port = int(line.split()[1])
        host_port = free_port()
        assert add_hostfwd(net.api, "tcp", host_port, guest_port) == b'{"return":{"id":1}}'
        baseline = proc_sample(fwd)[1]  # with the forward's listening socket
        # libslirp listens with a backlog of 1: connect in waves of 16.
        client = HostLoad(nsload, "client", "127.0.0.1", host_port, n, CONN_BYTES, 16, 2)
        try:
            res = client.result()
        finally:
            client.close()
        out, err = proc.communicate(timeout=120)
        served = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        sampler.stop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    print(f"\nhost->ns via forward: {res} server={served} "
          f"peak forwarder fds={sampler.peak_fwd_fds()}")
    record_property("via_forward", dict(res, peak_forwarder_fds=sampler.peak_fwd_fds()))
    assert res["peak_open"] == n and res["verified"] == n
    assert served["served"] == n and served["peak_open"] == n
    assert sampler.peak_fwd_fds() >= n
    fds_settle(fwd, baseline)
    assert info(net.api)["forwarder_pid"] == fwd and info(net.api)["restarts"] == 0


def trend(samples, col: int, warmup: float) -> dict:
    """Over the samples after `warmup` seconds: medians of the first and
    last quarter, min, max, and the least-squares slope per minute."""
    body = [s for s in samples if s[0] >= warmup] or samples[len(samples) // 2:]
    q = max(1, len(body) // 4)
    first = statistics.median(s[col] for s in body[:q])
    last = statistics.median(s[col] for s in body[-q:])
    xs = [s[0] for s in body]
    ys = [s[col] for s in body]
    slope = 0.0
    if len(body) > 2 and max(xs) > min(xs):
        slope = statistics.linear_regression(xs, ys).slope * 60
    return {"from_s": body[0][0], "first": first, "last": last, "min": min(ys),
            "max": max(ys), "slope_per_min": round(slope, 2)}


def second_half_growth(samples, col: int) -> dict:
    """Growth of column col over the second half of the load (by rounds of
    work done, the last column), per round: the first half is libslirp's
    warm-up (its working set: mbufs, socket buffers, the allocator's arenas)."""
    if len(samples) < 3 or samples[-1][-1] < 4:
        return {"rounds": 0, "kb": 0, "kb_per_round": 0.0}
    half = samples[-1][-1] / 2
    mid = next(x for x in samples if x[-1] >= half)
    rounds = samples[-1][-1] - mid[-1]
    grew = samples[-1][col] - mid[col]
    return {"rounds": rounds, "kb": grew, "kb_per_round": round(grew / max(1, rounds), 1)}


@pytest.mark.parametrize("seconds", [pytest.param(SHORT_SECONDS, id="short"),
                                     pytest.param(SOAK_SECONDS, id="long",
                                                  marks=pytest.mark.soak)])
def test_mixed_traffic_soak(connect, host_server, nsload, seconds, record_property):
    net = connect(*FLAGS)
    fwd = info(net.api)["forwarder_pid"]
    echo = host_server("echo")
    uecho = host_server("echo", "udp")
    unlimited = 10 ** 9  # the servers run until the test stops them
    limit = int(seconds) + 300  # nsload's own hard alarm
    guest = net.ns.popen([NS_PYTHON, nsload, "serve", "0.0.0.0", 0, unlimited, limit],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    counts = {"rounds": 0, "tcp_ns_to_host": 0, "udp_datagrams": 0, "tcp_via_forward": 0,
              "burst_connections": 0, "api_calls": 0, "forwards_added_removed": 0,
              "bytes_verified": 0}
    failures: list[dict] = []
    burst = HostLoad(nsload, "serve", "127.0.0.1", 0, unlimited, limit)
    try:
        line = read_line(guest.stdout, 15)
        guest_port = int(line.split()[1])
        host_port = free_port()
        assert add_hostfwd(net.api, "tcp", host_port, guest_port) == b'{"return":{"id":1}}'
        sampler = Sampler(net.fwd.pid, fwd, 1.0, work=lambda: counts["rounds"])
        deadline = time.monotonic() + seconds
        t0 = time.monotonic()

        def leg(name, fn):
            """Run one check; a failure is recorded (and fails the test at the
            end, after the report is written), the soak goes on."""
            try:
                fn()
                return True
            except (AssertionError, OSError, ValueError, subprocess.SubprocessError) as e:
                failures.append({"leg": name, "round": counts["rounds"],
                                 "t": round(time.monotonic() - t0, 1), "error": repr(e)[:300]})
                return False

        def tcp_ns_to_host():
            r = net.ns.client("tcp-echo", GW, echo.port, 64 * 1024)
            assert r["received"] == 64 * 1024 and r["sha_received"] == r["sha_sent"], r
            counts["tcp_ns_to_host"] += 1
            counts["bytes_verified"] += 2 * 64 * 1024

        def udp():
            # One UDP flow (fixed source port) for the whole soak: a new flow
            # per round would hold a host socket 240 s each (libslirp's UDP
            # expiry) and make the fd count follow the round rate.
            cp = net.ns.run([NS_PYTHON, nsload, "udp", GW, uecho.port, 10, 1000, 40000],
                            timeout=60, text=True)
            r = json.loads(cp.stdout.strip().splitlines()[-1])
            assert r == {"sent": 10, "echoed": 10}, r
            counts["udp_datagrams"] += 10

        def via_forward():
            data = payload(128 * 1024)
            assert tcp_send("127.0.0.1", host_port, data) == data
            counts["tcp_via_forward"] += 1
            counts["bytes_verified"] += 2 * len(data)

        def burst_of_50():
            cp = net.ns.run([NS_PYTHON, nsload, "client", GW, burst.port, 50, 4096],
                            timeout=300, text=True)
            res = json.loads(cp.stdout.strip().splitlines()[-1])
            assert res["verified"] == 50, res
            counts["burst_connections"] += 50

        def api_churn():
            p = free_port(socket.SOCK_DGRAM)
            reply = json.loads(add_hostfwd(net.api, "udp", p, 9))
            assert "return" in reply, (p, reply)
            fid = reply["return"]["id"]
            assert api_call(net.api, {"execute": "remove_hostfwd",
                                      "arguments": {"id": fid}}) == b'{"return":{}}'
            stats = json.loads(api_call(net.api, {"execute": "get_stats"}))["return"]
            assert stats["rx_frames"] > 0
            counts["api_calls"] += 3
            counts["forwards_added_removed"] += 1

        try:
            while time.monotonic() < deadline and len(failures) < 20:
                i = counts["rounds"]
                leg("tcp_ns_to_host", tcp_ns_to_host)
                leg("udp", udp)
                leg("via_forward", via_forward)
                leg("via_forward", via_forward)
                if i % 5 == 0:
                    leg("burst_of_50", burst_of_50)
                leg("api_churn", api_churn)
                counts["rounds"] += 1
        finally:
            sampler.stop()
    finally:
        burst.close()
        if guest.poll() is None:
            guest.kill()
        guest.wait(10)
        guest.stdout.close()
        guest.stderr.close()
    s = sampler.samples
    long_run = seconds >= 2 * WARMUP_SECONDS
    warmup = WARMUP_SECONDS if long_run else 0
    # Once the load stops, the forwarder lets go of every socket but the one
    # UDP flow's (libslirp keeps it 240 s) within its TCP timers.
    fds_after = fds_settle(fwd, s[0][4], slack=2) if s else None
    report = {"seconds": seconds, "samples": len(s), **counts, "failures": failures,
              "supervisor_rss_kb": trend(s, 1, warmup), "supervisor_fds": trend(s, 2, warmup),
              "forwarder_rss_kb": trend(s, 3, warmup), "forwarder_fds": trend(s, 4, warmup),
              "forwarder_fds_after_load": fds_after,
              "forwarder_rss_second_half": second_half_growth(s, 3)}
    print("\nsoak: " + json.dumps(report))
    record_property("soak", report)
    with open(f"/tmp/nsnet-soak-{int(seconds)}s.json", "w") as f:
        json.dump(dict(report, raw=s), f)
    assert len(s) >= 5
    assert not failures, failures  # nothing lost
    assert info(net.api)["forwarder_pid"] == fwd and info(net.api)["restarts"] == 0
    # Bounded at all times (a UDP socket per recent flow, a few MB of buffers).
    for who in ("supervisor", "forwarder"):
        assert report[f"{who}_rss_kb"]["max"] < 256 * 1024, report[f"{who}_rss_kb"]
        assert report[f"{who}_fds"]["max"] < 4000, report[f"{who}_fds"]
    assert report["supervisor_fds"]["max"] <= report["supervisor_fds"]["min"] + 8
    # Memory: libslirp's working set is mostly reached in the first half of
    # the load (measured: 110-180 KB a round over the second
    # half of a 20 s run); a leak of half a MiB per round (5 connections of 64-128 KiB,
    # 50 more every 5 rounds, 10 datagrams, 3 API calls) would show here.
    late = report["forwarder_rss_second_half"]
    assert late["kb_per_round"] < 512, late
    if long_run:
        # No growth trend in the steady state: the last quarter is not above
        # the first by more than allocator noise, for memory and for fds.
        for who in ("supervisor", "forwarder"):
            rss = report[f"{who}_rss_kb"]
            fds = report[f"{who}_fds"]
            assert rss["last"] - rss["first"] < 8192, (who, rss)
            assert fds["last"] - fds["first"] <= 32, (who, fds)
