"""pytest configuration for the nsnet end-to-end suite.

NETWORK SAFETY (structural): the whole pytest process runs in a network
namespace of its own that has only a loopback interface.  When started in a
netns that has any other interface, conftest re-executes the identical pytest
command under `unshare --net --` (as root) before any test runs; it refuses to
run unprivileged outside such a namespace.  At session start it asserts that
the namespace has only `lo` and no default route, so nothing a test does can
reach any address but loopback and the namespaces the tests make themselves.

Under pytest-xdist (scripts/test.sh runs the tier in NSNET_TEST_JOBS
workers) every worker moves into a new network namespace of its own before
its session starts: each worker is a sealed namespace as the whole suite is
in one process, so the addresses a test adds to its `lo`, its resolver on
port 53 and its free ports are never another worker's.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

import harness
from harness import Impl, Namespace, User

ISOLATED_ENV = "NSNET_TEST_ISOLATED"


# --------------------------------------------------------------------------
# Isolation
# --------------------------------------------------------------------------

def _interfaces() -> list[str]:
    # Not /sys/class/net: sysfs shows the netns it was mounted in, not ours.
    return sorted(name for _, name in socket.if_nameindex())


def _reexec_isolated(config) -> None:
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.stop_global_capturing()  # give the new process the real stdout/stderr
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, **{ISOLATED_ENV: "1"})
    argv = ["unshare", "--net", "--", sys.executable, *sys.orig_argv[1:]]
    os.execvpe("unshare", argv, env)


def _assert_isolated() -> None:
    ifaces = _interfaces()
    assert ifaces == ["lo"], f"test netns must contain only lo, found {ifaces}"
    for family in ("-4", "-6"):
        out = subprocess.run(["ip", "-j", family, "route", "show", "default"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        routes = json.loads(out or "[]")
        assert routes == [], f"test netns must have no default route, found {routes}"


def _own_netns_for_worker() -> None:
    """In a pytest-xdist worker (already inside the controller's sealed
    namespace): unshare a fresh network namespace for this process.  The
    worker runs its tests in its main thread (xdist's main_thread_only
    execution model); unshare(CLONE_NEWNET) moves the calling thread, and
    every process and thread it starts from now on is in the new one."""
    if threading.current_thread() is not threading.main_thread():
        pytest.exit("pytest-xdist worker not in its main thread: cannot give it a network "
                    "namespace of its own", returncode=3)
    try:
        harness.unshare_net()
    except OSError as e:
        pytest.exit(f"pytest-xdist worker: unshare(CLONE_NEWNET) failed: {e} (a worker "
                    "needs root for a namespace of its own; run with -n 0)", returncode=3)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        _own_netns_for_worker()
    if _interfaces() != ["lo"]:
        if os.environ.get(ISOLATED_ENV) == "1":
            pytest.exit(f"{ISOLATED_ENV}=1 but the netns has interfaces {_interfaces()}; "
                        "refusing to run", returncode=3)
        if os.geteuid() != 0:
            pytest.exit("the nsnet test suite must run as root (it re-executes itself in "
                        "a private network namespace with `unshare --net`), or inside a "
                        "network namespace that has only `lo`", returncode=3)
        _reexec_isolated(config)  # does not return
    problem = harness.build_mismatch()
    if problem:
        pytest.exit(f"refusing to mix two builds: {problem}", returncode=3)
    config.addinivalue_line("markers", "soak: heavy load/soak/fuzz case, run with -m soak")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    _assert_isolated()
    harness.become_subreaper()


def pytest_collection_modifyitems(config, items):
    """Heavy cases carry @pytest.mark.soak and run only when selected with
    `-m soak` (CI runs the short versions)."""
    if "soak" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="heavy case: run with -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    _assert_isolated()


def pytest_sessionfinish(session, exitstatus):
    harness.reap_orphans()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """nsnet's tests and slirp4netns reference runs, counted apart: a
    reference run passing says nothing about nsnet."""
    counts = {"nsnet": {}, "reference": {}}
    seen = {}
    for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for rep in terminalreporter.stats.get(key, []):
            side = dict(getattr(rep, "user_properties", ())).get("side")
            if side is None:
                continue
            # one outcome per test: a failure at any phase wins over a pass
            seen.setdefault((rep.nodeid, side), set()).add(key)
    for (_, side), keys in seen.items():
        for key in ("error", "failed", "xpassed", "xfailed", "skipped", "passed"):
            if key in keys:
                counts[side][key] = counts[side].get(key, 0) + 1
                break
    if not seen:
        return

    def fmt(c):
        return ", ".join(f"{c.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped")
                         if c.get(k) or k in ("passed", "failed"))

    terminalreporter.write_sep("-", "nsnet and its reference")
    terminalreporter.write_line(f"nsnet tests: {fmt(counts['nsnet'])}; "
                                f"slirp4netns reference runs (not nsnet): "
                                f"{fmt(counts['reference'])}")


def pytest_report_header(config):
    return [f"nsnet e2e: netns {harness.own_ns('net')} (isolated, lo only); "
            f"nsnet binary {harness.nsnet_bin()}; slirp4netns {harness.SLIRP4NETNS_BIN}"]


# --------------------------------------------------------------------------
# Failure reports: attach forwarder logs
# --------------------------------------------------------------------------

def _side(item) -> str:
    """'reference' for a run of slirp4netns alone (the `impl` parameter is
    slirp4netns, or only the slirp4netns_impl fixture is used), else 'nsnet'."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("impl") == "slirp4netns":
        return "reference"
    names = getattr(item, "fixturenames", ())
    if "slirp4netns_impl" in names and "nsnet_impl" not in names and "impl" not in names:
        return "reference"
    return "nsnet"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.user_properties.append(("side", _side(item)))
    if report.failed:
        for fwd in getattr(item, "_forwarders", []):
            report.sections.append(
                (f"{fwd.impl.name} log (pid {fwd.pid}, {report.when})", fwd.log()[-8000:]))


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_leftover_processes():
    """After each test (and all its fixtures), fail it if it left anything running.

    The pytest process is a child subreaper, so a forwarder's helper that
    outlives its SIGKILLed parent is re-parented here: it is killed by PID,
    and the test that leaked it errors at teardown, naming it."""
    yield
    # Orphans still dying (e.g. from a parent-death signal) get a moment.
    deadline = time.monotonic() + 2.0
    while harness.child_pids() and time.monotonic() < deadline:
        harness.reap_zombies()
        time.sleep(0.02)
    left = {pid: harness.cmdline(pid) for pid in harness.child_pids()}
    harness.reap_orphans()
    if left:
        pytest.fail(f"processes left running after the test (now killed): {left}",
                    pytrace=False)


@pytest.fixture(scope="session")
def base_dir():
    """World-traversable scratch dir with the in-namespace helper script."""
    path = tempfile.mkdtemp(prefix="nsnet-tests.", dir="/tmp")
    harness.install_helpers(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)



def _impl(name: str) -> Impl:
    binary = harness.impl_bin(name)
    if name == "nsnet" and not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        msg = f"nsnet binary {binary} is not installed (run scripts/setup.sh)"
        if os.environ.get("NSNET_ALLOW_MISSING") == "1":
            pytest.skip(msg + " [NSNET_ALLOW_MISSING=1]")
        pytest.fail(msg, pytrace=False)
    if name == "slirp4netns" and not os.access(binary, os.X_OK):
        pytest.fail(f"slirp4netns not installed at {binary}", pytrace=False)
    return Impl(name, binary)


@pytest.fixture(params=["nsnet", "slirp4netns"])
def impl(request) -> Impl:
    return _impl(request.param)


@pytest.fixture
def nsnet_impl() -> Impl:
    return _impl("nsnet")


@pytest.fixture
def slirp4netns_impl() -> Impl:
    return _impl("slirp4netns")


@pytest.fixture(params=["root", "unpriv"])
def user(request) -> User:
    if request.param == "root":
        return User.root()
    try:
        return User.unpriv()
    except KeyError:
        pytest.fail(f"user {harness.TEST_USER} missing: run scripts/setup.sh", pytrace=False)


@pytest.fixture
def workdir(base_dir, user) -> str:
    """Per-test directory owned by the test's user (API sockets, logs)."""
    path = user.make_dir(base_dir, "t.")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_ns(user, base_dir):
    """Factory: a new user+net namespace owned by `user`."""
    made: list[Namespace] = []

    def make(owner: User | None = None) -> Namespace:
        ns = Namespace(owner or user, base_dir)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.close()


@pytest.fixture
def ns(make_ns) -> Namespace:
    return make_ns()


@pytest.fixture
def start_fwd(request, user, workdir):
    """Factory: start a forwarder (impl given per call) as `user`; killed at teardown."""
    started: list[harness.Forwarder] = []
    request.node._forwarders = started

    def start(impl: Impl, args, **kw) -> harness.Forwarder:
        fwd = harness.start_forwarder(impl, user, args, workdir, **kw)
        started.append(fwd)
        return fwd

    yield start
    for fwd in started:
        fwd.stop()


@dataclass
class Net:
    """A namespace connected by a running forwarder."""

    impl: Impl
    ns: Namespace
    fwd: harness.Forwarder
    api: str | None


@pytest.fixture
def attach(start_fwd, workdir):
    """attach(impl, target, *flags, api=True, configure=True, tap="tap0", **kw) -> Net.

    Starts `impl`'s forwarder on the namespace `target`, with --configure and
    an API socket unless told otherwise; extra keywords go to start_forwarder."""

    def attach_(impl: Impl, target: Namespace, *flags, api: bool = True,
                configure: bool = True, tap: str = "tap0", **kw) -> Net:
        args = [str(f) for f in flags]
        api_path = None
        if configure:
            args.insert(0, "--configure")
        if api:
            api_path = os.path.join(workdir, f"{impl.name}.{target.pid}.sock")
            args += ["--api-socket", api_path]
        fwd = start_fwd(impl, [*args, target.pid, tap], **kw)
        return Net(impl, target, fwd, api_path)

    return attach_


@pytest.fixture
def connect(impl, ns, attach):
    """connect(*flags, target=ns, **kw) -> Net: the test's impl on the test's namespace."""

    def connect_(*flags, target: Namespace | None = None, **kw) -> Net:
        return attach(impl, target or ns, *flags, **kw)

    return connect_


@pytest.fixture
def host_server():
    """Factory: HostServer(mode, proto, addr) closed at teardown."""
    servers: list[harness.HostServer] = []

    def make(mode: str = "echo", proto: str = "tcp", addr: str = "127.0.0.1", port: int = 0):
        srv = harness.HostServer(mode, proto, addr, port)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()
    for srv in servers:
        assert not srv.errors, f"host server errors: {srv.errors}"
