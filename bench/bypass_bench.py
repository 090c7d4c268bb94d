#!/usr/bin/env python3
"""`nsnet run --bypass` against the host's loopback, `nsnet run` and pasta,
side by side in one run (run mode: each candidate starts the client command).

  sudo python3 bench/bypass_bench.py [--rounds N] [--time S] [--mtu M] [--out FILE]
        [--candidates C,C] [--metrics M,M] [--conn-client python|c]

Candidates (each client command runs in namespaces the candidate makes; any
nsnet one as NAME@VENV runs that venv's nsnet, for A/B runs of two builds,
and as NAME+seccomp with --enable-seccomp, e.g. nsnet-bypass+seccomp: the
bypass handler under its allowlist):
  loopback      the client on the host's own loopback (127.0.0.1): the limit
  nsnet-bypass  nsnet run --bypass -- CLIENT, to 10.0.2.2
  nsnet-run     nsnet run -- CLIENT, to 10.0.2.2 (libslirp's path)
  pasta         pasta --config-net -- CLIENT, to pasta's gateway (which it
                maps to the host's loopback)
Not in the default set: the floor of any connect() bypass built on seccomp
user notification, with none of nsnet's checks (bench/notify_floor.c, built
here with gcc; the client on the host's loopback, as `loopback`):
  floor-continue  every connect() of CLIENT is notified and answered at once
                  with CONTINUE: the notification's wake-ups alone
  floor-addfd     ... answered as a bypass must at least: read the sockaddr,
                  socket+connect of its own, ADDFD over the client's fd, reply
Measures, per round, candidates rotated: iperf3 throughput namespace->host
and host->namespace (-R), 1-byte round-trip latency p50, and connections
per second (connect, 1 byte each way, close; --conn-client c: a C client
built here with gcc, for the connection's own cost without Python's; it
also times each connection, and the row "conn/s of the p50 connection" is
1 / its median connection: a machine's bursts of load move the mean rate
far more than the median).
--metrics picks some of them.  Prints each candidate's median with the
range over the rounds, and the ratios of each bypass candidate to the
loopback and to pasta: the median of the per-round ratios (a candidate's
sample against the other's of the same round, which saw the same load),
with their range; --out writes the samples as JSON.

Network safety: the script re-executes itself in a new network namespace
(`unshare --net`, prepared by bench.py's prepare_host_netns: lo, and a veth
pair whose default route leads nowhere, for pasta); every server listens on
127.0.0.1 there.  Everything runs as the unprivileged user nsnet-test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (CONN_CLIENT, LAT_CLIENT, NS_PYTHON, PASTA_GW, USER,  # noqa: E402
                   EchoServer, Runner, ensure_isolated, free_port, kill, prepare_host_netns,
                   wait_listen)

ISOLATED_ENV = "NSNET_BYPASS_BENCH_ISOLATED"
VENV = os.environ.get("NSNET_VENV", "/opt/nsnet/venv")
NSNET = os.environ.get("NSNET_BIN") or f"{VENV}/bin/nsnet"
PASTA = os.environ.get("PASTA_BIN", "/usr/bin/pasta")
CANDIDATES = ("loopback", "nsnet-bypass", "nsnet-run", "pasta")
FLOORS = ("floor-continue", "floor-addfd")
FLOOR_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notify_floor.c")
floor_exe = ""  # built by main() when a floor candidate is asked for
METRICS = ("tput_ns2host", "tput_host2ns", "latency_p50_us", "conn_per_s", "conn_per_s_p50")


def isolate() -> None:
    ensure_isolated(__file__, ISOLATED_ENV)
    prepare_host_netns()


def wrap(cand: str, mtu: int, argv: list[str]) -> tuple[list[str], str]:
    """(argv that runs `argv` under the candidate, the host's address there).
    `nsnet-bypass@VENV` / `nsnet-run@VENV`: the nsnet of another venv (A/B
    comparisons of two builds in one run)."""
    cand, _, venv = cand.partition("@")
    cand, _, extra = cand.partition("+")
    nsnet = f"{venv}/bin/nsnet" if venv else NSNET
    if cand == "loopback":
        return argv, "127.0.0.1"
    if cand in FLOORS:
        return [floor_exe, cand.split("-", 1)[1], "--", *argv], "127.0.0.1"
    if cand == "pasta":
        return [PASTA, "--config-net", "-f", "-q", "-4", "--mtu", str(mtu), "-t", "none",
                "-u", "none", "-T", "none", "-U", "none", "--", *argv], PASTA_GW
    flags = ["--bypass"] if cand == "nsnet-bypass" else []
    if extra == "seccomp":
        flags.append("--enable-seccomp")
    return [nsnet, "run", f"--mtu={mtu}", *flags, "--", *argv], "10.0.2.2"


# connect, 1 byte each way, close, for `seconds` (as CONN_CLIENT, in C)
CONN_CLIENT_C = r"""
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
#define MAXN (1 << 22)
static float cyc[MAXN], con[MAXN];
static int cmp(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}
static double p50(float *v, long n)
{
    qsort(v, (size_t)n, sizeof *v, cmp);
    return n ? v[n / 2] : 0;
}
int main(int argc, char **argv)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (argc != 4 || inet_pton(AF_INET, argv[1], &a.sin_addr) != 1)
        return 2;
    double start = now(), end = start + atof(argv[3]);
    long n = 0;
    char c = 'x';
    double t0 = start;
    while (t0 < end && n < MAXN) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
            perror("conn client");
            return 1;
        }
        double t1 = now();
        if (write(s, &c, 1) != 1 || read(s, &c, 1) != 1) {
            perror("conn client");
            return 1;
        }
        close(s);
        double t2 = now();
        con[n] = (float)((t1 - t0) * 1e6);
        cyc[n] = (float)((t2 - t0) * 1e6);
        t0 = t2;
        n++;
    }
    double rate = n / (now() - start);
    printf("{\"conn_per_s\": %.1f, \"cycle_p50_us\": %.2f, \"connect_p50_us\": %.2f}\n",
           rate, p50(cyc, n), p50(con, n));
    return 0;
}
"""


def compile_c(src: str, workdir: str, name: str) -> str:
    """gcc -O2 src into workdir/name, which the unprivileged runner can run."""
    exe = f"{workdir}/{name}"
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    os.chmod(workdir, 0o755)
    return exe


def build_floor(workdir: str) -> str:
    return compile_c(FLOOR_SRC, workdir, "notify_floor")


def build_c_client(workdir: str) -> str:
    src = f"{workdir}/conn_client.c"
    with open(src, "w") as f:
        f.write(CONN_CLIENT_C)
    return compile_c(src, workdir, "conn_client")


def run_client(runner: Runner, cand: str, mtu: int, make_argv, timeout: float) -> str:
    _, host = wrap(cand, mtu, [])
    argv, _ = wrap(cand, mtu, make_argv(host))
    p = runner.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        kill(p)
    if p.returncode != 0:
        raise RuntimeError(f"{cand}: {argv[0]} exited {p.returncode}: {err[-600:]!r}")
    return out.decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--time", type=float, default=3.0, help="seconds per iperf3/conn run")
    ap.add_argument("--mtu", type=int, default=65520)
    ap.add_argument("--rr", type=int, default=5000, help="round trips for the latency")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--metrics", default=",".join(METRICS),
                    help="which of " + ",".join(METRICS) + " to measure")
    ap.add_argument("--conn-client", choices=("python", "c"), default="python",
                    help="the connection-rate client (the same for every candidate)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.time < 1 and {"tput_ns2host", "tput_host2ns"} & set(args.metrics.split(",")):
        ap.error("--time: iperf3 takes whole seconds (and 0 is forever); give 1 or more, "
                 "or leave the throughput out with --metrics")
    cands = [c for c in args.candidates.split(",") if c]
    isolate()
    runner = Runner(USER)
    metrics = [m for m in METRICS if m in args.metrics.split(",")]
    if "conn_per_s" in metrics and args.conn_client == "c" and "conn_per_s_p50" not in metrics:
        metrics.append("conn_per_s_p50")
    if args.conn_client != "c" and "conn_per_s_p50" in metrics:
        metrics.remove("conn_per_s_p50")
    def known(c: str) -> bool:
        name, _, extra = c.partition("@")[0].partition("+")
        return name in (*CANDIDATES, *FLOORS) and (
            not extra or (extra == "seccomp" and name.startswith("nsnet")))

    unknown = [c for c in cands if not known(c)]
    if unknown:
        ap.error(f"--candidates: unknown {', '.join(unknown)} (known: "
                 f"{', '.join((*CANDIDATES, *FLOORS))}, nsnet ones also as NAME@VENV "
                 "and NAME+seccomp)")
    workdir = tempfile.mkdtemp(prefix="nsnet-bypass-bench.", dir="/tmp")
    global floor_exe
    if set(cands) & set(FLOORS):
        floor_exe = build_floor(workdir)
    conn_client = [NS_PYTHON, "-c", CONN_CLIENT]
    if args.conn_client == "c":
        conn_client = [build_c_client(workdir)]
    iperf_port = free_port()
    iperf = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL)
    echo, acceptor = EchoServer("echo"), EchoServer("accept")
    samples: dict[str, dict[str, list[float]]] = {c: {m: [] for m in METRICS} for c in cands}
    try:
        wait_listen(iperf_port)
        for rnd in range(args.rounds):
            order = cands[rnd % len(cands):] + cands[:rnd % len(cands)]
            for cand in order:
                s = samples[cand]
                for rev, key in ((False, "tput_ns2host"), (True, "tput_host2ns")):
                    if key not in metrics:
                        continue
                    out = run_client(runner, cand, args.mtu, lambda h, rev=rev: [
                        "iperf3", "-c", h, "-p", str(iperf_port), "-t", str(args.time), "-J",
                        "--connect-timeout", "5000", *(["-R"] if rev else [])],
                        timeout=args.time + 60)
                    end = json.loads(out)["end"]
                    s[key].append(end["sum_received"]["bits_per_second"] / 1e9)
                if "latency_p50_us" in metrics:
                    out = run_client(runner, cand, args.mtu, lambda h: [
                        NS_PYTHON, "-c", LAT_CLIENT, h, str(echo.port), str(args.rr)],
                        timeout=120)
                    s["latency_p50_us"].append(
                        json.loads(out.strip().splitlines()[-1])["p50_us"])
                if "conn_per_s" in metrics:
                    out = run_client(runner, cand, args.mtu, lambda h: [
                        *conn_client, h, str(acceptor.port), str(args.time)],
                        timeout=args.time + 60)
                    res = json.loads(out.strip().splitlines()[-1])
                    s["conn_per_s"].append(res["conn_per_s"])
                    if "cycle_p50_us" in res:  # the C client: 1 / its median connection
                        s["conn_per_s_p50"].append(1e6 / res["cycle_p50_us"])
                print(f"round {rnd + 1} {cand:13s} " + " ".join(
                    f"{m}={s[m][-1]:.2f}" for m in metrics), file=sys.stderr, flush=True)
    finally:
        kill(iperf)
        echo.close()
        acceptor.close()
        shutil.rmtree(workdir, ignore_errors=True)
    med = {c: {m: statistics.median(v) for m, v in samples[c].items() if v} for c in cands}
    ratios = {(b, o): {m: [x / y for x, y in zip(samples[b][m], samples[o][m]) if y]
                       for m in metrics}
              for b in cands if b.partition("@")[0].partition("+")[0] in ("nsnet-bypass", *FLOORS)
              for o in ("loopback", "pasta") if o in cands}
    cols = ["metric", *cands, *(f"{b} / {o}" for b, o in ratios)]
    print(f"\nmedians (range) of {args.rounds} rounds, MTU {args.mtu}, conn client "
          f"{args.conn_client}, {time.strftime('%Y-%m-%d %H:%M')}; ratios: median (range) of "
          "the per-round ratios\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    units = {"tput_ns2host": "ns->host Gbit/s", "tput_host2ns": "host->ns Gbit/s",
             "latency_p50_us": "RR latency p50 us", "conn_per_s": "conn/s",
             "conn_per_s_p50": "conn/s of the p50 connection"}

    def cell(v: list[float], fmt: str) -> str:
        if not v:
            return "-"
        return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})"

    for m in metrics:
        if m == "conn_per_s_p50" and not any(samples[c][m] for c in cands):
            continue
        fmt = ".0f" if m.startswith("conn_per_s") else ".2f"
        row = [units[m], *(cell(samples[c][m], fmt) for c in cands),
               *(cell(r[m], ".2f") for r in ratios.values())]
        print("| " + " | ".join(row) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"samples": samples, "medians": med, "mtu": args.mtu,
                       "rounds": args.rounds, "conn_client": args.conn_client,
                       "ratios": {f"{b} / {o}": r for (b, o), r in ratios.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
