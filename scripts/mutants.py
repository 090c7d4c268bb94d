#!/usr/bin/python3
"""The mutation check: does the suite fail when a feature is broken?

Reads tests/mutants.txt (the format is described at its top), and for each
mutant: applies its one-line change to a build of nsnet installed in a
scratch venv, runs the tests it names against that build, and reports
whether they failed (KILLED) or passed (SURVIVED).

  * The build under test is a scratch venv (default /opt/nsnet/venv-mutant),
    installed once from a copy of the tree (tracked files as they are in the
    work tree, uncommitted changes included) by scripts/setup.sh.
  * A mutation of a Python file under nsnet/ is applied to the installed
    copy in site-packages (and undone after), so it costs no rebuild; any
    other file (C sources, build scripts) is changed in the scratch copy of
    the tree, which is reinstalled (and reinstalled unmutated after).
  * First, every test named by the selected mutants runs once against the
    unmutated build: a test that fails there would "kill" every mutant, so
    the check stops (exit 2).
  * A mutant is KILLED when a test run exits 1 (tests failed) or times out;
    an exit of 2-5 (usage error, nothing collected...) is an ERROR, as is a
    `from` text that is not found exactly once in its file.

Exit status: 0 when every mutant is killed (or SURVIVED with a `survives:`
reason in the list), 1 when one survived without a reason or had an
ERROR, 2 when the baseline failed.  With --ci, a mutant whose `from` text
no longer applies is skipped with a warning instead of failing the run.

    bash scripts/mutants.sh                  # every mutant
    bash scripts/mutants.sh --only ID,ID     # some
    bash scripts/mutants.sh --list           # print the list and check it applies
    bash scripts/mutants.sh --ci             # the ones marked `ci: yes`
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIST = REPO / "tests" / "mutants.txt"
FIELDS = {"mutant", "file", "from", "to", "test", "why", "survives", "ci"}


@dataclass
class Mutant:
    id: str
    file: str = ""
    old: str = ""
    new: str = ""
    tests: list[list[str]] = field(default_factory=list)
    why: str = ""
    survives: str = ""
    ci: bool = False
    line: int = 0


def test_args(value: str) -> list[str]:
    """pytest arguments of a `test:` line.  Quotes group words (shlex); an
    unquoted -k expression takes every word up to the next option or path
    (`-k a and b` is `-k "a and b"`)."""
    words = shlex.split(value)
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        out.append(w)
        i += 1
        if w in ("-k", "-m") and i < len(words):
            expr = [words[i]]
            i += 1
            while i < len(words) and not words[i].startswith("-") and \
                    not (REPO / words[i].split("::")[0]).exists():
                expr.append(words[i])
                i += 1
            out.append(" ".join(expr))
    return out


def parse_list(path: Path) -> list[Mutant]:
    out: list[Mutant] = []
    cur: Mutant | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        key, sep, value = raw.partition(":")
        key = key.strip()
        if not sep or key not in FIELDS:
            sys.exit(f"{path}:{n}: expected 'FIELD: value' with FIELD one of "
                     f"{sorted(FIELDS)}, got {raw!r}")
        value = value.strip()
        if key == "mutant":
            cur = Mutant(value, line=n)
            out.append(cur)
            continue
        if cur is None:
            sys.exit(f"{path}:{n}: {key}: before the first 'mutant:' line")
        if key == "file":
            cur.file = value
        elif key == "from":
            cur.old = value
        elif key == "to":
            cur.new = value
        elif key == "test":
            cur.tests.append(test_args(value))
        elif key == "why":
            cur.why = value
        elif key == "survives":
            cur.survives = value
        elif key == "ci":
            cur.ci = value.lower() in ("yes", "true", "1")
    ids = [m.id for m in out]
    for m in out:
        if ids.count(m.id) > 1:
            sys.exit(f"{path}:{m.line}: mutant id {m.id!r} used twice")
        if not (m.file and m.old and m.tests):
            sys.exit(f"{path}:{m.line}: mutant {m.id!r} needs file:, from: and test:")
        if m.old == m.new:
            sys.exit(f"{path}:{m.line}: mutant {m.id!r}: from and to are the same")
    return out


def say(msg: str) -> None:
    print(f"mutants: {msg}", flush=True)


class Build:
    """The scratch copy of the tree and the venv it is installed in."""

    def __init__(self, venv: str, work: Path):
        self.venv = venv
        self.tree = work / "tree"
        self.log = work / "setup.log"

    def copy_tree(self) -> None:
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached",
                                "--others", "--exclude-standard"],
                               check=True, capture_output=True).stdout.split(b"\0")
        for f in files:
            if not f:
                continue
            src = REPO / os.fsdecode(f)
            if not src.is_file():
                continue  # deleted in the work tree
            dst = self.tree / os.fsdecode(f)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)

    def install(self, full: bool) -> None:
        env = dict(os.environ, NSNET_VENV=self.venv)
        with open(self.log, "a") as log:
            if full:
                cmd = ["bash", str(self.tree / "scripts" / "setup.sh")]
            else:
                cmd = [f"{self.venv}/bin/python", "-m", "pip", "install", "-q",
                       "--force-reinstall", "--no-deps", str(self.tree)]
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=900).returncode
        if rc != 0:
            sys.exit(f"mutants: installing {self.tree} into {self.venv} failed; see {self.log}")
        subprocess.run(["chmod", "-R", "a+rX", self.venv], check=True)

    def site_file(self, rel: str) -> Path | None:
        """The installed copy of a Python file under nsnet/, else None."""
        if not (rel.startswith("nsnet/") and rel.endswith(".py")):
            return None
        purelib = subprocess.run(
            [f"{self.venv}/bin/python", "-c",
             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip()
        path = Path(purelib) / rel
        return path if path.is_file() else None


def drop_pyc(path: Path) -> None:
    cache = path.parent / "__pycache__"
    for pyc in cache.glob(path.stem + ".*.pyc"):
        pyc.unlink(missing_ok=True)


def pytest_cmd(venv: str, args: list[str]) -> list[str]:
    cmd = [f"{venv}/bin/pytest", "-p", "no:cacheprovider", "--rootdir", str(REPO), "-q",
           "-x", "--no-header", "-rN", "--tb=short"]
    paths = [a for a in args if not a.startswith("-") and (REPO / a.split("::")[0]).exists()]
    if paths and all(p.startswith("tests/unit/") or p == "tests/unit" for p in paths):
        cmd += ["--confcutdir", str(REPO / "tests" / "unit")]
    return cmd + args


def run_tests(venv: str, args: list[str], timeout: float,
              log: Path | None = None) -> tuple[str, float, str]:
    """('pass'|'fail'|'timeout'|'error', seconds, last lines); the whole
    output is appended to `log`."""
    env = dict(os.environ, NSNET_VENV=venv)
    env.pop("NSNET_BIN", None)
    start = time.monotonic()
    try:
        p = subprocess.run(pytest_cmd(venv, args), cwd=REPO, env=env, text=True,
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", time.monotonic() - start, out[-600:]
    took = time.monotonic() - start
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(args)}\n{p.stdout}{p.stderr}\n")
    lines = (p.stdout + p.stderr).strip().splitlines()
    tail = "\n".join(lines[-3:])
    if p.returncode == 1:  # the first failed assertion says what killed the mutant
        tail = next((ln.strip() for ln in lines if ln.startswith("E ")), tail)[:160]
    if p.returncode == 0:
        return "pass", took, tail
    if p.returncode == 1:
        return "fail", took, tail
    return "error", took, f"pytest exit {p.returncode}: {tail}"


def apply(text: str, m: Mutant) -> str:
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"'from' text found {count} times in {m.file} (must be exactly once)")
    return text.replace(m.old, m.new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--ci", action="store_true", help="only the mutants marked 'ci: yes'")
    ap.add_argument("--list", action="store_true", help="check that each mutant applies, "
                    "print the list, run nothing")
    ap.add_argument("--venv", default=os.environ.get("NSNET_MUTANT_VENV",
                                                     "/opt/nsnet/venv-mutant"))
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    ap.add_argument("--mutants", default=str(LIST))
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("NSNET_MUTANT_JOBS", "4")),
                    help="baseline test runs at a time (NSNET_MUTANT_JOBS, default 4)")
    opts = ap.parse_args()

    mutants = parse_list(Path(opts.mutants))
    if opts.only:
        want = opts.only.split(",")
        unknown = set(want) - {m.id for m in mutants}
        if unknown:
            sys.exit(f"mutants: unknown ids: {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in want]
    if opts.ci:
        mutants = [m for m in mutants if m.ci]

    bad = 0
    stale = []
    for m in mutants:
        try:
            apply((REPO / m.file).read_text(), m)
        except (OSError, ValueError) as e:
            say(f"ERROR {m.id}: {e}")
            bad += 1
            stale.append(m)
    if opts.ci and stale and not opts.list:
        # In CI a list entry that drifted from the code (a moved file, a
        # reworded line) is reported, not a failure of everyone's submission.
        say(f"WARNING: --ci skips {len(stale)} mutant(s) that no longer apply: "
            f"{', '.join(m.id for m in stale)}; fix their from:/file: lines")
        mutants = [m for m in mutants if m not in stale]
        bad = 0
    if opts.list:
        for m in mutants:
            print(f"{m.id:32} {m.file:34} {' | '.join(' '.join(t) for t in m.tests)}")
        say(f"{len(mutants)} mutants, {bad} that do not apply")
        return 1 if bad else 0
    if bad:
        return 1
    if os.geteuid() != 0:
        sys.exit("mutants: run as root (the end-to-end tier needs it)")

    work = Path(tempfile.mkdtemp(prefix="nsnet-mutants.", dir="/tmp"))
    os.chmod(work, 0o755)
    logs = Path(tempfile.mkdtemp(prefix="nsnet-mutants-logs.", dir="/tmp"))
    build = Build(opts.venv, work)
    t0 = time.monotonic()
    say(f"copying the tree to {build.tree}; installing into {opts.venv} (log {build.log})")
    build.copy_tree()
    # bench/ is not installed: the tests that run it (tests/test_bench_smoke.py)
    # read it from here, where its mutants are applied
    os.environ["NSNET_BENCH_DIR"] = str(build.tree / "bench")
    build.install(full=True)
    say(f"installed in {time.monotonic() - t0:.0f}s")

    runs = []
    for m in mutants:
        for t in m.tests:
            if t not in runs:
                runs.append(t)
    if not opts.skip_baseline:
        # The runs are independent pytest processes (each end-to-end one in a
        # sealed network namespace of its own) against one unchanged build:
        # they can run side by side.
        say(f"baseline: {len(runs)} test runs against the unmutated build, "
            f"{opts.jobs} at a time")
        with concurrent.futures.ThreadPoolExecutor(max(1, opts.jobs)) as pool:
            done = list(pool.map(lambda t: (t, *run_tests(opts.venv, t, opts.timeout)), runs))
        for t, res, took, tail in done:
            if res != "pass":
                say(f"BASELINE {res.upper()} ({took:.0f}s): {' '.join(t)}\n{tail}")
                return 2
        say(f"baseline passed; {time.monotonic() - t0:.0f}s so far")

    results = []
    # Python mutants first (no rebuild), then the ones that need a rebuild.
    order = sorted(mutants, key=lambda m: build.site_file(m.file) is None)
    # After a rebuilt mutant the tree is restored at once, but the install of
    # the restored tree waits: the next rebuilt mutant's install includes it
    # (one build instead of two), and the loop's end does it for the last.
    stale = False
    for m in order:
        site = build.site_file(m.file)
        target = site if site is not None else build.tree / m.file
        if site is not None and stale:
            build.install(full=False)
            stale = False
        original = target.read_text()
        try:
            target.write_text(apply(original, m))
        except ValueError as e:
            results.append((m, "ERROR", 0.0, str(e)))
            continue
        completed = False
        try:
            if site is not None:
                drop_pyc(target)
            else:
                build.install(full=False)
            verdict, detail, took = "SURVIVED", "", 0.0
            for t in m.tests:
                res, secs, tail = run_tests(opts.venv, t, opts.timeout, logs / f"{m.id}.log")
                took += secs
                if res in ("fail", "timeout"):
                    verdict, detail = "KILLED", f"{' '.join(t)}: {res}: {tail}"
                    break
                if res == "error":
                    verdict, detail = "ERROR", f"{' '.join(t)}: {tail}"
                    break
            if verdict == "SURVIVED" and m.survives:
                detail = f"accepted: {m.survives}"
            completed = True
        finally:
            target.write_text(original)
            if site is not None:
                drop_pyc(target)
            elif completed:
                stale = True
            else:  # leaving early: never with a mutated build installed
                build.install(full=False)
        results.append((m, verdict, took, detail))
        say(f"{verdict:8} {m.id} ({took:.0f}s) {detail}")
    if stale:
        build.install(full=False)

    killed = sum(1 for r in results if r[1] == "KILLED")
    failing = [r for r in results if r[1] == "ERROR" or (r[1] == "SURVIVED" and not r[0].survives)]
    print()
    print(f"{'mutant':34} {'verdict':9} {'secs':>5}  file")
    for m, verdict, took, detail in results:
        print(f"{m.id:34} {verdict:9} {took:5.0f}  {m.file}")
    print()
    say(f"{killed}/{len(results)} killed ({100 * killed / max(1, len(results)):.0f}%), "
        f"{len(failing)} survived or errored without an accepted reason; "
        f"{time.monotonic() - t0:.0f}s in all")
    for m, verdict, _, detail in results:
        if verdict != "KILLED":
            say(f"  {verdict} {m.id}: {m.file}: {m.old!r} -> {m.new!r} {detail}")
    say(f"test output per mutant: {logs}/ID.log")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
