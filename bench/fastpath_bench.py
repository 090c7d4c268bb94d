#!/usr/bin/env python3
"""Published-port throughput: nsnet's fast path against the others.

  sudo python3 bench/fastpath_bench.py [--rounds N] [--time S] [--mtu M] [--out FILE]

Candidates, each with a namespace of its own and `iperf3 -s` inside it:
  nsnet-splice  nsnet, add_hostfwd "mode":"splice" (the fast path)
  nsnet-slirp   nsnet, libslirp's forward (the slirp4netns-compatible default)
  slirp4netns   slirp4netns 1.2.0, its add_hostfwd
  pasta         pasta -t HOSTPORT:5201 (its spliced loopback path)
An iperf3 client on the host's 127.0.0.1 measures each forward upload
(host -> namespace) and download (-R); candidates alternate within every
round; the table shows medians and ratios to slirp4netns, and the CPU
time of each forwarder's process tree per GB moved (nsnet: supervisor,
forwarder, relay and connector).

Network safety: the script re-executes itself in a new network namespace
(`unshare --net`) that has lo and an unread TAP interface whose default route
leads nowhere (pasta wants a default route to copy); every connection it
makes is to 127.0.0.1.  Every process it starts is killed by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import signal
import socket
import statistics
import subprocess
import sys
import time

ISOLATED_ENV = "NSNET_FASTPATH_BENCH_ISOLATED"
VENV = os.environ.get("NSNET_VENV", "/opt/nsnet/venv")
NSNET = os.environ.get("NSNET_BIN") or f"{VENV}/bin/nsnet"
SLIRP4NETNS = os.environ.get("SLIRP4NETNS_BIN", "/usr/bin/slirp4netns")
PASTA = os.environ.get("PASTA_BIN", "/usr/bin/pasta")
GUEST_PORT = 5201
CANDIDATES = ("nsnet-splice", "nsnet-slirp", "slirp4netns", "pasta")
# Namespaces and forwarders run as this unprivileged user, as rootless
# containers do (pasta refuses to keep root privileges anyway).
BENCH_USER = os.environ.get("NSNET_BENCH_USER", "nsnet-test")


def isolate() -> None:
    """Re-exec in a private netns: lo, plus dummy0 (a TAP nobody reads) with a route to nowhere."""
    if os.environ.get(ISOLATED_ENV) == "1":
        names = sorted(n for _, n in socket.if_nameindex())
        if names != ["lo"]:
            sys.exit(f"expected a fresh netns with only lo, found {names}")
        for cmd in (["ip", "link", "set", "lo", "up"],
                    # a TAP nobody reads (no dummy module here): frames sent to it vanish
                    ["ip", "tuntap", "add", "dev", "dummy0", "mode", "tap"],
                    ["ip", "addr", "add", "192.0.2.1/24", "dev", "dummy0"],
                    ["ip", "link", "set", "dummy0", "up"],
                    ["ip", "route", "add", "default", "via", "192.0.2.254", "dev", "dummy0"]):
            subprocess.run(cmd, check=True, timeout=10)
        return
    if os.geteuid() != 0:
        sys.exit("run as root (the benchmark makes a network namespace of its own)")
    env = dict(os.environ, **{ISOLATED_ENV: "1"})
    os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, *sys.argv], env)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def listening(port: int) -> bool:
    want = f":{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(want) and fields[3] == "0A":
                    return True
    return False


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of root and all its descendants (live ones)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += [c for c, p in parent.items() if p == pid]
    return total / os.sysconf("SC_CLK_TCK")


def api(path: str, req: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(json.dumps(req).encode())
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    return json.loads(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Candidate:
    def __init__(self, name: str, workdir: str, mtu: int) -> None:
        self.name = name
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.log = open(f"{workdir}/{name}.log", "wb")
        ns = self._spawn(["unshare", "--user", "--map-root-user", "--net", "--",
                          "sleep", "infinity"])
        me = os.readlink("/proc/self/ns/net")

        def in_ns() -> bool:
            try:
                return os.readlink(f"/proc/{ns.pid}/ns/net") != me
            except OSError:
                return False
        wait_for(in_ns, 10, "namespace")
        self.nsenter = ["nsenter", f"--target={ns.pid}", "--user", "--net",
                        "--preserve-credentials", "--"]
        self._spawn(self.nsenter + ["ip", "link", "set", "lo", "up"]).wait(10)
        sock = f"{workdir}/{name}.sock"
        if name == "pasta":
            self.fwd = self._spawn([PASTA, "-f", "--config-net", "-t", f"{self.port}:{GUEST_PORT}",
                         "-u", "none", "-T", "none", "-U", "none", "--mtu", str(mtu),
                         str(ns.pid)])
        else:
            binary = SLIRP4NETNS if name == "slirp4netns" else NSNET
            self.fwd = self._spawn([binary, "-c", "--mtu", str(mtu), "--api-socket", sock,
                         str(ns.pid), "tap0"])
            wait_for(lambda: os.path.exists(sock), 10, f"{name} API socket")
        self.server = self._spawn(self.nsenter + ["iperf3", "-s", "-p", str(GUEST_PORT)])
        time.sleep(0.3)
        if name != "pasta":
            args = {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": self.port,
                    "guest_port": GUEST_PORT}
            if name == "nsnet-splice":
                args["mode"] = "splice"
            reply = api(sock, {"execute": "add_hostfwd", "arguments": args})
            if "return" not in reply:
                raise RuntimeError(f"{name}: add_hostfwd: {reply}")
        wait_for(lambda: listening(self.port), 10, f"{name} listening on {self.port}")

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        pw = pwd.getpwnam(BENCH_USER)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                "--", *argv]
        p = subprocess.Popen(argv, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=self.log)
        self.procs.append(p)
        return p

    def iperf(self, seconds: float, reverse: bool) -> tuple[float, float]:
        """(Gbit/s, forwarder CPU seconds per GB moved: its whole process tree)."""
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(self.port), "-t", str(seconds),
                "-O", "1", "-J"] + (["-R"] if reverse else [])
        cpu0 = tree_cpu_seconds(self.fwd.pid)
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        cpu = tree_cpu_seconds(self.fwd.pid) - cpu0
        out = json.loads(cp.stdout)
        if "error" in out:
            raise RuntimeError(f"{self.name}: iperf3: {out['error']}")
        total = out["end"]["sum_received"]
        # bytes of the whole run (the -O warm-up second included), as CPU was
        moved = sum(i["sum"]["bytes"] for i in out["intervals"])
        return total["bits_per_second"] / 1e9, cpu / (moved / 1e9)

    def close(self) -> None:
        for p in reversed(self.procs):
            kill(p)
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
    workdir = f"/tmp/nsnet-fastpath-bench.{os.getpid()}"  # logs stay there
    os.makedirs(workdir, exist_ok=True)
    pw = pwd.getpwnam(BENCH_USER)
    os.chown(workdir, pw.pw_uid, pw.pw_gid)
    cands: list[Candidate] = []
    results: dict[str, dict[str, list[float]]] = {
        n: {"upload": [], "download": [], "upload_cpu_s_per_gb": [], "download_cpu_s_per_gb": []}
        for n in names}
    try:
        for n in names:
            cands.append(Candidate(n, workdir, args.mtu))
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
