"""The suite's own guarantees, checked by running pytest on small test
files with the suite's conftest: a test that leaves a process running
fails, and the summary counts slirp4netns reference runs apart."""
from __future__ import annotations

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


def inner_pytest(tmp_path, name, source) -> subprocess.CompletedProcess:
    for f in ("conftest.py", "harness.py"):
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    (tmp_path / name).write_text(source)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-q", "-p", "no:randomly", name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=90,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


def test_leftover_process_fails_the_test(tmp_path):
    cp = inner_pytest(tmp_path, "test_leaky.py", LEAKY)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 1, out
    assert "2 passed, 1 error" in out, out  # test_leaks: passed, then errored at teardown
    assert "processes left running after the test (now killed)" in out and "sleep" in out, out
    assert "ERROR test_leaky.py::test_leaks" in out, out


def test_summary_counts_reference_runs_apart(tmp_path):
    cp = inner_pytest(tmp_path, "test_ref.py", REFERENCE)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out
    assert "nsnet tests: 1 passed, 0 failed; slirp4netns reference runs (not nsnet): " \
        "1 passed, 0 failed" in out, out
