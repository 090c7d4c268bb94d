"""The suite's own guarantees, checked by running pytest on small test
files with the suite's conftest: a test that leaves a process running
fails, and the summary counts slirp4netns reference runs apart."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.timeout(120)

LEAKY = '''
import subprocess

def test_leaks():
    # double fork: the sleep is re-parented to pytest (a child subreaper)
    subprocess.run(["sh", "-c", "sleep 300 & exit 0"], check=True)

def test_clean():
    pass
'''

REFERENCE = '''
import pytest

@pytest.mark.parametrize("impl", ["nsnet", "slirp4netns"], indirect=True)
def test_both(impl):
    pass
'''


# Where each test ran: its worker, its network namespace and interfaces.
WHERE = '''
import json, os, socket, subprocess
import pytest

@pytest.mark.parametrize("n", range(4))
def test_where(n, tmp_path_factory):
    up = subprocess.run(["ip", "-j", "link", "show", "lo"], capture_output=True, text=True,
                        check=True).stdout
    rec = {"worker": os.environ.get("PYTEST_XDIST_WORKER"),
           "net": os.readlink("/proc/self/ns/net"),
           "ifaces": sorted(name for _, name in socket.if_nameindex()),
           "lo_up": "UP" in json.loads(up)[0]["flags"]}
    with open(os.path.join(os.environ["WHERE_DIR"], f"{n}.json"), "w") as f:
        json.dump(rec, f)
'''

# the suite's way (scripts/test.sh) and one process
WORKERS = [pytest.param(["-n", "2"], id="xdist"), pytest.param([], id="serial")]


def inner_pytest(tmp_path, name, source, args=(), env=None) -> subprocess.CompletedProcess:
    for f in ("conftest.py", "harness.py"):
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    (tmp_path / name).write_text(source)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-q", "-p", "no:randomly", *args, name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=90,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **(env or {})))


@pytest.mark.parametrize("args", WORKERS)
def test_leftover_process_fails_the_test(tmp_path, args):
    """Under pytest-xdist too: a worker is a child subreaper, the orphan
    comes to it, and the test that left it errors."""
    cp = inner_pytest(tmp_path, "test_leaky.py", LEAKY, args)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 1, out
    assert "2 passed, 1 error" in out, out  # test_leaks: passed, then errored at teardown
    assert "processes left running after the test (now killed)" in out and "sleep" in out, out
    assert "ERROR test_leaky.py::test_leaks" in out, out


def test_xdist_workers_each_have_a_sealed_namespace(tmp_path):
    """Each pytest-xdist worker runs its tests in a network namespace of its
    own (only lo, up), not in the one its controller was started in."""
    where = tmp_path / "where"
    where.mkdir()
    cp = inner_pytest(tmp_path, "test_where.py", WHERE, ["-n", "2"], {"WHERE_DIR": str(where)})
    assert cp.returncode == 0, cp.stdout + cp.stderr
    recs = [json.loads((where / f"{n}.json").read_text()) for n in range(4)]
    mine = os.readlink("/proc/self/ns/net")  # the inner controller's namespace
    for rec in recs:
        assert rec["worker"] in ("gw0", "gw1") and rec["net"] != mine, rec
        assert rec["ifaces"] == ["lo"] and rec["lo_up"], rec
    # one namespace per worker: never two workers in one
    by_worker = {}
    for rec in recs:
        by_worker.setdefault(rec["worker"], set()).add(rec["net"])
    assert all(len(nets) == 1 for nets in by_worker.values()), by_worker
    nets = [next(iter(v)) for v in by_worker.values()]
    assert len(set(nets)) == len(nets), by_worker


def test_summary_counts_reference_runs_apart(tmp_path):
    cp = inner_pytest(tmp_path, "test_ref.py", REFERENCE)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out
    assert "nsnet tests: 1 passed, 0 failed; slirp4netns reference runs (not nsnet): " \
        "1 passed, 0 failed" in out, out
