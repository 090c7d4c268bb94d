#!/usr/bin/env python3
"""Egress policy overhead: `nsnet run` with no policy beside a 1,000-rule
policy (the allowing rule last), throughput and connection rate.

    sudo /opt/nsnet/venv/bin/python bench/policy_bench.py [--reps 5] [--duration 5]
         [--mtu 1500] [--user nsnet-test] [--nsnet PATH]

Re-executes itself in `unshare --net` (only loopback): the servers listen
on 127.0.0.1 there, the command inside nsnet's namespace connects to
10.0.2.2.  Nothing leaves the machine.  The candidates alternate within
each repetition; figures are medians.  No assertion on the figures:
docs/performance.md has the measured ones.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading

ISOLATED_ENV = "NSNET_POLICY_BENCH_ISOLATED"

CLIENT = r"""
import json, socket, sys, time
mode, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + secs
if mode == "tput":
    s = socket.create_connection(("10.0.2.2", port), timeout=10)
    buf = b"\0" * (1 << 20)
    n = 0
    t0 = time.monotonic()
    while time.monotonic() < end:
        n += s.send(buf)
    s.close()
    print(json.dumps({"value": n * 8 / (time.monotonic() - t0) / 1e9, "count": n / 1e9}))
else:
    n = failed = 0
    t0 = time.monotonic()
    while time.monotonic() < end:
        try:
            c = socket.create_connection(("10.0.2.2", port), timeout=10)
        except OSError:
            failed += 1
            continue
        c.close()
        n += 1
    print(json.dumps({"value": n / (time.monotonic() - t0), "count": n, "failed": failed}))
"""


def serve(sock: socket.socket, sink: bool) -> None:
    def one(c: socket.socket) -> None:
        with c:
            while sink and c.recv(1 << 20):
                pass

    while True:
        try:
            c, _ = sock.accept()
        except OSError:
            return
        if sink:
            threading.Thread(target=one, args=(c,), daemon=True).start()
        else:
            c.close()


def listener(sink: bool) -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    threading.Thread(target=serve, args=(s, sink), daemon=True).start()
    return s.getsockname()[1]


def policy_file(ports: list[int], nrules: int) -> str:
    rules = []
    for i in range(nrules - len(ports)):
        if i % 2:
            rules.append({"action": "deny", "proto": "tcp", "dest": f"198.51.{i // 250 % 256}.{i % 250}",
                          "ports": str(1 + i % 60000)})
        else:
            rules.append({"action": "deny", "dest": f"*.n{i}.example.test", "ports": "443"})
    rules += [{"action": "allow", "proto": "tcp", "dest": "10.0.2.2", "ports": str(p)} for p in ports]
    fd, path = tempfile.mkstemp(prefix="nsnet-policy-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"egress": "deny", "rules": rules}, f)
    os.chmod(path, 0o644)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--rules", type=int, default=1000)
    p.add_argument("--user", default="nsnet-test")
    p.add_argument("--nsnet", default=os.path.join(os.path.dirname(sys.executable), "nsnet"))
    a = p.parse_args()
    if os.environ.get(ISOLATED_ENV) != "1":
        if os.geteuid() != 0:
            print("policy_bench: run as root (it re-executes in unshare --net)", file=sys.stderr)
            return 1
        env = dict(os.environ, **{ISOLATED_ENV: "1"})
        return subprocess.run(["unshare", "--net", sys.executable, *sys.argv], env=env).returncode
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    tput_port, conn_port = listener(True), listener(False)
    pol = policy_file([tput_port, conn_port], a.rules)
    pw = pwd.getpwnam(a.user)
    wrap = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
    cands = {"no policy": [], f"{a.rules} rules": [f"--policy={pol}"]}
    results: dict[str, dict[str, list[float]]] = {
        c: {"tput": [], "conn": [], "tput_cpu": [], "conn_cpu": []} for c in cands}
    try:
        for rep in range(a.reps):
            order = list(cands) if rep % 2 == 0 else list(reversed(cands))
            for cand in order:
                for mode, port in (("tput", tput_port), ("conn", conn_port)):
                    argv = [*wrap, a.nsnet, "run", f"--mtu={a.mtu}", *cands[cand], "--",
                            "/usr/bin/python3", "-c", CLIENT, mode, str(port), str(a.duration)]
                    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cp = subprocess.run(argv, capture_output=True, timeout=a.duration + 60,
                                        cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir})
                    if cp.returncode != 0:
                        print(cp.stderr.decode(), file=sys.stderr)
                        return 1
                    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    r = json.loads(cp.stdout.decode().splitlines()[-1])
                    results[cand][mode].append(r["value"])
                    # CPU seconds of nsnet and the client together, per GB
                    # or per connection: steadier than rates on a busy host
                    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
                    results[cand][mode + "_cpu"].append(cpu / max(r["count"], 1e-9))
                    print(f"rep {rep} {cand:>12} {mode}: {r['value']:.3f}"
                          + (f" ({r['failed']} connects failed)" if r.get("failed") else ""),
                          file=sys.stderr)
    finally:
        os.unlink(pol)
    base = list(cands)[0]
    print(f"\nMTU {a.mtu}, {a.reps} reps x {a.duration:g} s, medians\n")
    print("| candidate | ns->host Gbit/s | ratio | CPU s/GB | connections/s | ratio "
          "| CPU us/connection |")
    print("|---|---|---|---|---|---|---|")
    med = {c: {k: statistics.median(v) for k, v in r.items()} for c, r in results.items()}
    for cand in cands:
        m, b = med[cand], med[base]
        print(f"| {cand} | {m['tput']:.2f} | {m['tput'] / b['tput']:.3f} | {m['tput_cpu']:.2f} "
              f"| {m['conn']:.0f} | {m['conn'] / b['conn']:.3f} | {m['conn_cpu'] * 1e6:.0f} |")
    print("\n" + json.dumps({"mtu": a.mtu, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
