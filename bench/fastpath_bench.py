#!/usr/bin/env python3
"""Published-port throughput: nsnet's fast path against the others.

  sudo python3 bench/fastpath_bench.py [--rounds N] [--time S] [--mtu M] [--out FILE]

Candidates, each with a namespace of its own and `iperf3 -s` inside it:
  nsnet-splice  nsnet, add_hostfwd "mode":"splice" (the fast path)
  nsnet-slirp   nsnet, libslirp's forward (the slirp4netns-compatible default)
  slirp4netns   slirp4netns 1.2.0, its add_hostfwd
  pasta         pasta -t 127.0.0.1/HOSTPORT:5201 (its spliced loopback path)
  loopback      iperf3 -s on the host's own loopback: the physical limit
An iperf3 client on the host's 127.0.0.1 measures each forward upload
(host -> namespace) and download (-R); candidates alternate within every
round; the table shows medians and ratios to slirp4netns, and the CPU
time of each forwarder's process tree per GB moved (nsnet: supervisor,
forwarder, relay and connector).

Network safety: the script re-executes itself in a new network namespace
(`unshare --net`), prepared by bench.py's prepare_host_netns (lo, and a veth
pair whose default route leads nowhere: pasta wants a default route to
copy); every connection it makes is to 127.0.0.1.  Everything runs as the
unprivileged user nsnet-test, as rootless containers do (pasta refuses to
keep root privileges anyway).  Every process it starts is killed by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The `speed` bench's helpers (processes, namespaces, isolation of the host side).
from bench import (USER, Namespace, Runner, api_call, cpu_seconds,  # noqa: E402
                   ensure_isolated, free_port, kill, prepare_host_netns, tree, wait_listen)

ISOLATED_ENV = "NSNET_FASTPATH_BENCH_ISOLATED"
VENV = os.environ.get("NSNET_VENV", "/opt/nsnet/venv")
NSNET = os.environ.get("NSNET_BIN") or f"{VENV}/bin/nsnet"
SLIRP4NETNS = os.environ.get("SLIRP4NETNS_BIN", "/usr/bin/slirp4netns")
PASTA = os.environ.get("PASTA_BIN", "/usr/bin/pasta")
GUEST_PORT = 5201
CANDIDATES = ("nsnet-splice", "nsnet-slirp", "slirp4netns", "pasta", "loopback")


def isolate() -> None:
    """Re-exec this script in a private netns, then prepare it as bench.py does
    (lo, and a veth pair with a default route to nowhere for pasta)."""
    ensure_isolated(__file__, ISOLATED_ENV)
    prepare_host_netns()


class Candidate:
    """One forward to an `iperf3 -s` (in a namespace; on the host's own
    loopback for the "loopback" row), run as the unprivileged user."""

    def __init__(self, name: str, runner: Runner, workdir: str, mtu: int) -> None:
        self.name = name
        self.port = free_port()
        self.log = open(f"{workdir}/{name}.log", "wb")
        self.procs: list[subprocess.Popen] = []
        self.ns: Namespace | None = None
        try:
            self._start(runner, workdir, mtu)
        except BaseException:
            self.close()
            raise

    def _start(self, runner: Runner, workdir: str, mtu: int) -> None:
        name = self.name
        if name == "loopback":
            self.fwd = self.server = self._spawn(runner, ["iperf3", "-s", "-B", "127.0.0.1",
                                                              "-p", self.port])
            wait_listen(self.port)
            return
        self.ns = Namespace(runner)
        sock = f"{workdir}/{name}.sock"
        if name == "pasta":
            self.fwd = self._spawn(runner, [PASTA, "-f", "--config-net",
                                            "-t", f"127.0.0.1/{self.port}:{GUEST_PORT}",
                                            "-u", "none", "-T", "none", "-U", "none",
                                            "--mtu", mtu, self.ns.pid])
        else:
            binary = SLIRP4NETNS if name == "slirp4netns" else NSNET
            self.fwd = self._spawn(runner, [binary, "-c", "--mtu", mtu, "--api-socket", sock,
                                            self.ns.pid, "tap0"])
            deadline = time.monotonic() + 10
            while not os.path.exists(sock):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: no API socket")
                time.sleep(0.05)
        self.server = self._spawn(runner, self.ns.argv(["iperf3", "-s", "-p", GUEST_PORT]))
        time.sleep(0.3)
        if name != "pasta":
            args = {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": self.port,
                    "guest_port": GUEST_PORT}
            if name == "nsnet-splice":
                args["mode"] = "splice"
            reply = json.loads(api_call(sock, {"execute": "add_hostfwd", "arguments": args}))
            if "return" not in reply:
                raise RuntimeError(f"{name}: add_hostfwd: {reply}")
        wait_listen(self.port)

    def _spawn(self, runner: Runner, argv: list) -> subprocess.Popen:
        p = runner.popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=self.log)
        self.procs.append(p)
        return p

    def iperf(self, seconds: float, reverse: bool) -> tuple[float, float]:
        """(Gbit/s, CPU seconds per GB moved of the forwarder's whole process
        tree: for nsnet the supervisor, forwarder, relay and connector)."""
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(self.port), "-t", str(seconds),
                "-O", "1", "-J"] + (["-R"] if reverse else [])
        pids = tree(self.fwd.pid) if self.name != "loopback" else []
        cpu0 = cpu_seconds(pids)
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        cpu = cpu_seconds(pids) - cpu0
        out = json.loads(cp.stdout)
        if "error" in out:
            raise RuntimeError(f"{self.name}: iperf3: {out['error']}")
        # bytes of the whole run (the -O warm-up second included), as CPU was
        moved = sum(i["sum"]["bytes"] for i in out["intervals"])
        return out["end"]["sum_received"]["bits_per_second"] / 1e9, cpu / (moved / 1e9)

    def close(self) -> None:
        for p in reversed(self.procs):
            kill(p)
        if self.ns is not None:
            self.ns.close()
        self.log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--time", type=float, default=5, help="seconds per iperf3 run")
    ap.add_argument("--mtu", type=int, default=65520)
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    isolate()
    names = [n for n in args.only.split(",") if n]
    runner = Runner(USER)
    workdir = f"/tmp/nsnet-fastpath-bench.{os.getpid()}"  # logs stay there
    os.makedirs(workdir, exist_ok=True)
    os.chown(workdir, runner.uid, runner.gid)
    cands: list[Candidate] = []
    results: dict[str, dict[str, list[float]]] = {
        n: {"upload": [], "download": [], "upload_cpu_s_per_gb": [], "download_cpu_s_per_gb": []}
        for n in names}
    try:
        for n in names:
            cands.append(Candidate(n, runner, workdir, args.mtu))
        for r in range(args.rounds):
            order = cands[r % len(cands):] + cands[:r % len(cands)]  # rotate the order
            for c in order:
                for direction, rev in (("upload", False), ("download", True)):
                    g, cpu = c.iperf(args.time, rev)
                    results[c.name][direction].append(g)
                    results[c.name][f"{direction}_cpu_s_per_gb"].append(cpu)
                    print(f"round {r + 1} {c.name:13s} {direction:8s} {g:6.2f} Gbit/s "
                          f"{cpu:5.2f} CPU s/GB", flush=True)
    finally:
        for c in cands:
            c.close()
    base = results.get("slirp4netns")
    print(f"\nmedians of {args.rounds} runs, {args.time:g} s each, MTU {args.mtu} (Gbit/s)")
    print(f"{'candidate':14s} {'host->ns':>9s} {'ratio':>6s} {'ns->host':>9s} {'ratio':>6s}"
          f" {'CPU s/GB up':>12s} {'down':>6s}")
    summary = {}
    for n in names:
        row = {d: statistics.median(v) for d, v in results[n].items()}
        summary[n] = row
        cells = []
        for d in ("upload", "download"):
            ratio = row[d] / statistics.median(base[d]) if base else float("nan")
            cells.append(f"{row[d]:9.2f} {ratio:5.2f}x")
        cells.append(f"{row['upload_cpu_s_per_gb']:12.2f} {row['download_cpu_s_per_gb']:6.2f}")
        print(f"{n:14s} {' '.join(cells)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": args.rounds, "time_s": args.time, "mtu": args.mtu,
                       "runs_gbit_s": results, "median_gbit_s": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
