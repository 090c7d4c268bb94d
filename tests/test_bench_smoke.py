"""The benchmark (bench/bench.py --smoke) runs end to end: every candidate
starts, every measurement produces a figure, JSON and PNG are written.
No timing is asserted: figures from a 2-core CI machine mean nothing."""
import json
import os
import subprocess
import sys

import pytest

from harness import VENV

pytestmark = pytest.mark.timeout(420)

# NSNET_BENCH_DIR: scripts/mutants.py's copy of bench/, where it applies
# the mutants of bench/ files (bench/ is not installed in the venv)
BENCH = os.path.join(os.environ.get("NSNET_BENCH_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"), "bench.py")


def test_bench_smoke(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the benchmark makes its own network namespace: needs root")
    python = f"{VENV}/bin/python"
    if not os.access(python, os.X_OK):
        python = sys.executable
    out = tmp_path / "out"
    cp = subprocess.run([python, BENCH, "--smoke", "--out", str(out)],
                        capture_output=True, text=True, timeout=400,
                        env=dict(os.environ, NSNET_VENV=VENV))
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 1000
    assert result["mode"] == "smoke"
    med = result["median"]
    assert set(med) == {"nsnet", "slirp4netns", "pasta", "loopback"}
    for cand in ("nsnet", "slirp4netns", "pasta"):
        for key in ("tput_ns2host_1500", "tput_host2ns_1500", "tput_ns2host_65520",
                    "tput_host2ns_65520", "tput_fwd_up_65520", "tput_fwd_down_65520",
                    "latency_p50_us", "conn_per_s", "start_ms", "rss_idle_mb",
                    "rss_loaded_mb", "cpu_s_per_gb_ns2host_1500",
                    "cpu_s_per_gb_host2ns_65520"):
            assert med[cand][key] > 0, (cand, key)
    assert result["ratio_to_slirp4netns"]["nsnet"]["tput_ns2host_1500"] > 0
    assert {t["metric"] for t in result["targets"]} >= {"start_ms", "rss_idle_mb"}
    assert "| nsnet / slirp4netns |" in cp.stdout


BYPASS_BENCH = os.path.join(os.path.dirname(BENCH), "bypass_bench.py")


def test_bypass_bench_smoke(tmp_path):
    """bench/bypass_bench.py (issue 13's rows): one short round of every
    metric for the loopback, `nsnet run --bypass` and pasta, with the C
    connection client, and the mechanism's floor (floor-addfd); every
    sample and ratio exists."""
    if os.geteuid() != 0:
        pytest.skip("the benchmark makes its own network namespace: needs root")
    python = f"{VENV}/bin/python"
    if not os.access(python, os.X_OK):
        python = sys.executable
    out = tmp_path / "bypass.json"
    cp = subprocess.run([python, BYPASS_BENCH, "--rounds", "1", "--time", "1", "--rr", "300",
                         "--candidates", "loopback,nsnet-bypass,pasta,floor-addfd",
                         "--conn-client", "c",
                         "--out", str(out)],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, NSNET_VENV=VENV))
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    result = json.loads(out.read_text())
    metrics = ("tput_ns2host", "tput_host2ns", "latency_p50_us", "conn_per_s", "conn_per_s_p50")
    for cand in ("loopback", "nsnet-bypass", "pasta", "floor-addfd"):
        for m in metrics:
            assert len(result["samples"][cand][m]) == 1 and result["samples"][cand][m][0] > 0, \
                (cand, m)
    for ratio in ("nsnet-bypass / loopback", "nsnet-bypass / pasta", "floor-addfd / loopback"):
        for m in metrics:
            assert result["ratios"][ratio][m][0] > 0, (ratio, m)
    assert "| conn/s of the p50 connection |" in cp.stdout


FLOOR_SRC = os.path.join(os.path.dirname(BENCH), "notify_floor.c")
FLOOR_PROBE = r"""
import os, socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4)
port = srv.getsockname()[1]
s = socket.socket()
before = os.fstat(s.fileno()).st_ino
s.connect(("127.0.0.1", port))
c, _ = srv.accept()
s.sendall(b"x")
assert c.recv(1) == b"x"
print("replaced" if os.fstat(s.fileno()).st_ino != before else "same")
srv.close()
r = socket.socket()
try:
    r.connect(("127.0.0.1", port))
except ConnectionRefusedError:
    print("refused")
"""


@pytest.mark.parametrize("mode,want", [("continue", "same"), ("addfd", "replaced")])
def test_notify_floor_does_what_it_says(tmp_path, mode, want):
    """bench/notify_floor.c, the floor candidates of bypass_bench.py: with
    `addfd` every connect of the command gets a socket the wrapper made and
    connected (another inode, working, refusals passed on as the errno);
    with `continue` the command's own socket connects.  (In the suite's
    sealed network namespace, to its own loopback.)"""
    exe = tmp_path / "notify_floor"
    subprocess.run(["gcc", "-O2", "-o", str(exe), FLOOR_SRC], check=True, timeout=60)
    cp = subprocess.run([str(exe), mode, "--", sys.executable, "-c", FLOOR_PROBE],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == [want, "refused"], cp.stdout + cp.stderr
