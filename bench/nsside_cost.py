"""What the namespace-side hardening (issue 11 item 1) costs: start to
ready, and the namespace-side children started after ready.

Rows, each over RUNS alternating runs of every venv given (so that the
machine's noise falls on all of them alike); median, quartiles and
minimum, ms:

  attach        `nsnet -c --ready-fd PID tap0`: exec to the ready byte
  attach+api    the same with an API socket
  run           `nsnet run -- true`: exec to exit
  run -p        `nsnet run -p 127.0.0.1:0:80 -- true` (the connector starts
                before ready)
  get_info      get_info {"interface": true} after ready (the interface
                helper: a fork before issue 11, a fresh interpreter after)
  splice add    the first add_hostfwd "mode":"splice" after ready (the relay
                and the connector start)

Run as root; nsnet runs as BENCH_USER (default nsnet-test) against a user+
net namespace made here; every connection is to 127.0.0.1 or inside it.

    [NSSIDE_ATTACH_ONLY=1] python3 bench/nsside_cost.py RUNS VENV [VENV...]
"""
from __future__ import annotations

import json
import os
import pwd
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import api_call  # noqa: E402

USER = os.environ.get("BENCH_USER", "nsnet-test")
ATTACH_ONLY = os.environ.get("NSSIDE_ATTACH_ONLY") == "1"  # the first row only


def as_user(argv: list[str]) -> list[str]:
    pw = pwd.getpwnam(USER)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--",
            *argv]


def api(path: str, req: dict, timeout: float = 30) -> dict:
    return json.loads(api_call(path, req, timeout))


class Target:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(as_user(["unshare", "--user", "--map-root-user", "--net",
                                              "--", "sleep", "infinity"]))
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{self.proc.pid}/ns/net") != mine:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("namespace did not start")
            time.sleep(0.002)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def attach(venv: str, workdir: str, with_api: bool) -> dict[str, float]:
    tgt = Target()
    r, w = os.pipe()
    sock = os.path.join(workdir, "api.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    args = [f"{venv}/bin/nsnet", "-c", f"--ready-fd={w}"]
    if with_api:
        args += ["--api-socket", sock]
    t0 = time.perf_counter()
    proc = subprocess.Popen(as_user([*args, str(tgt.proc.pid), "tap0"]), pass_fds=[w],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    out: dict[str, float] = {}
    try:
        ready, _, _ = select.select([r], [], [], 20)
        if not ready or os.read(r, 1) != b"1":
            raise RuntimeError(f"{venv}: not ready")
        out["attach+api" if with_api else "attach"] = (time.perf_counter() - t0) * 1000
        if with_api:
            t = time.perf_counter()
            reply = api(sock, {"execute": "get_info", "arguments": {"interface": True}})
            assert reply["return"]["interface"]["ifname"] == "tap0", reply
            out["get_info"] = (time.perf_counter() - t) * 1000
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            t = time.perf_counter()
            reply = api(sock, {"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "127.0.0.1", "host_port": port,
                "guest_port": 80, "mode": "splice"}})
            assert "return" in reply, reply
            out["splice add"] = (time.perf_counter() - t) * 1000
    finally:
        os.close(r)
        proc.terminate()
        proc.wait(10)
        tgt.close()
    return out


def run(venv: str, publish: bool) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [f"{venv}/bin/nsnet", "run"] + (["-p", f"127.0.0.1:{port}:80"] if publish else [])
    t0 = time.perf_counter()
    cp = subprocess.run(as_user([*args, "--", "true"]), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, timeout=30)
    if cp.returncode != 0:
        raise RuntimeError(f"{venv}: nsnet run: {cp.stderr!r}")
    return {"run -p" if publish else "run": (time.perf_counter() - t0) * 1000}


def main() -> None:
    runs = int(sys.argv[1])
    venvs = sys.argv[2:]
    workdir = tempfile.mkdtemp(prefix="nsside.")
    os.chmod(workdir, 0o777)
    times: dict[str, dict[str, list[float]]] = {v: {} for v in venvs}
    for i in range(runs + 2):  # two warm-up rounds
        for v in (venvs if i % 2 else venvs[::-1]):  # no venv always runs first
            res: dict[str, float] = {}
            res.update(attach(v, workdir, False))
            if not ATTACH_ONLY:
                res.update(attach(v, workdir, True))
                res.update(run(v, False))
                res.update(run(v, True))
            if i >= 2:
                for k, x in res.items():
                    times[v].setdefault(k, []).append(x)
    rows = list(times[venvs[0]])
    print(f"{'row':12} " + " ".join(f"{os.path.basename(v):>28}" for v in venvs)
          + "   (median [q1-q3] min, ms)")
    for k in rows:
        cells = []
        for v in venvs:
            t = sorted(times[v][k])
            q = statistics.quantiles(t, n=4)
            cells.append(f"{statistics.median(t):7.1f} [{q[0]:5.1f}-{q[2]:5.1f}] {t[0]:5.1f}")
        print(f"{k:12} " + " ".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()
