"""End-to-end test harness: namespaces, forwarders, host-side servers, API client.

Everything here drives real processes: user+net namespaces made with
unshare(1), entered with nsenter(1), the forwarder binary (nsnet or
slirp4netns) started with a ready-fd pipe, real sockets on 127.0.0.1/::1 of
the isolated test netns (see conftest.py).  Every process started here is
killed by PID and reaped; every wait has a deadline.

The harness never imports nsnet; the tests that do (the Python API, the
offload constants) import the build under test: conftest.py refuses to run
when the pytest process's nsnet, NSNET_VENV and NSNET_BIN disagree.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _venv() -> str:
    """The venv of the build under test: NSNET_VENV, else the venv NSNET_BIN
    lives in (<venv>/bin/nsnet), else /opt/nsnet/venv."""
    if os.environ.get("NSNET_VENV"):
        return os.environ["NSNET_VENV"]
    binary = os.environ.get("NSNET_BIN")
    if binary and os.path.exists(os.path.join(os.path.dirname(binary), "python")):
        return os.path.dirname(os.path.dirname(os.path.abspath(binary)))
    return "/opt/nsnet/venv"


VENV = _venv()
SLIRP4NETNS_BIN = os.environ.get("SLIRP4NETNS_BIN", "/usr/bin/slirp4netns")
TEST_USER = "nsnet-test"
# Interpreter for helper scripts run inside namespaces: must be executable by
# the unprivileged user (a pyenv python under /root is not).
NS_PYTHON = "/usr/bin/python3"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def nsnet_bin() -> str:
    return os.environ.get("NSNET_BIN") or f"{VENV}/bin/nsnet"


def build_mismatch() -> str | None:
    """Why the suite would test two builds at once, or None.

    Some tests run the `nsnet` binary (NSNET_BIN), others the package in the
    venv (`import nsnet` in this process, `$VENV/bin/python -m nsnet...`):
    both must be the same build.  NSNET_MIXED_BUILDS=1 allows a binary that
    is not $VENV/bin/nsnet (a wrapper script), knowingly."""
    import importlib.util

    venv = os.path.realpath(VENV)
    spec = importlib.util.find_spec("nsnet")
    origin = os.path.realpath(spec.origin) if spec and spec.origin else None
    if origin is None or not origin.startswith(venv + os.sep):
        return (f"this pytest imports nsnet from {origin}, not from the build under test "
                f"{VENV} (NSNET_VENV/NSNET_BIN): run {VENV}/bin/pytest")
    binary = os.path.realpath(nsnet_bin())
    if binary != os.path.realpath(f"{VENV}/bin/nsnet") and \
            os.environ.get("NSNET_MIXED_BUILDS") != "1":
        return (f"NSNET_BIN={nsnet_bin()} is not {VENV}/bin/nsnet: the tests that import "
                "nsnet or run the venv's python would test another build; set NSNET_VENV to "
                "that binary's venv (or NSNET_MIXED_BUILDS=1 for a wrapper script)")
    return None


def impl_bin(name: str) -> str:
    return nsnet_bin() if name == "nsnet" else SLIRP4NETNS_BIN


class HarnessError(AssertionError):
    pass


# Narrow a test to one value of the parametrized `user` / `impl` fixtures.
unpriv_only = pytest.mark.parametrize("user", ["unpriv"], indirect=True)
nsnet_only = pytest.mark.parametrize("impl", ["nsnet"], indirect=True)


def wait_until(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll pred() until it returns a truthy value; raise after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# Process bookkeeping
# --------------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNET = 0x40000000


def become_subreaper() -> None:
    """Orphans of processes we start (e.g. a forwarder's helper child whose
    parent we killed) are re-parented to us, so we can find and reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def unshare_net() -> None:
    """Move the calling thread into a new network namespace (only `lo`, down)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def child_pids(parent: int | None = None) -> list[int]:
    """PIDs whose parent is `parent` (default: this process)."""
    me = os.getpid() if parent is None else parent
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces/parens
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == me:
            out.append(int(entry))
    return out


def reap_zombies() -> None:
    """Reap any exited children (re-parented orphans included), without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (children first)."""
    out, todo = [], [pid]
    while todo:
        kids = child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def kill_and_reap(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGKILL one process we started, by PID, and reap it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"pid {proc.pid} did not die after SIGKILL within {timeout}s")


def reap_orphans() -> list[int]:
    """Kill (by PID) and reap any remaining children of this process; return them."""
    found = []
    for pid in child_pids():
        found.append(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for pid in found:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.01)
    return found


# --------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------

def base_env(home: str) -> dict[str, str]:
    return {"PATH": SAFE_PATH, "HOME": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True)
class User:
    """Who runs the target namespace and the forwarder."""

    name: str  # "root" or "unpriv"
    uid: int
    gid: int
    home: str

    @classmethod
    def root(cls) -> "User":
        return cls("root", 0, 0, "/root")

    @classmethod
    def unpriv(cls) -> "User":
        pw = pwd.getpwnam(TEST_USER)
        return cls("unpriv", pw.pw_uid, pw.pw_gid, pw.pw_dir)

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def wrap(self, argv: list[str]) -> list[str]:
        """argv to run as this user (setpriv execs: PIDs and fds are kept)."""
        argv = [str(a) for a in argv]
        if self.is_root:
            return argv
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                "--clear-groups", "--", *argv]

    def env(self, **extra: str) -> dict[str, str]:
        env = base_env(self.home)
        env.update(extra)
        return env

    def make_dir(self, parent: str, prefix: str = "d.") -> str:
        """A fresh 0700 directory owned by this user."""
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        os.chown(path, self.uid, self.gid)
        return path

    def popen(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("cwd", "/")
        kw.setdefault("env", self.env())
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.wrap(argv), **kw)

    def run(self, argv, timeout: float = 30, check: bool = False, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("cwd", "/")
        kw.setdefault("env", self.env())
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("capture_output", True)
        cp = subprocess.run(self.wrap(argv), timeout=timeout, **kw)
        if check and cp.returncode != 0:
            raise HarnessError(
                f"{argv} exited {cp.returncode}\nstdout: {cp.stdout!r}\nstderr: {cp.stderr!r}")
        return cp


# --------------------------------------------------------------------------
# Target namespaces
# --------------------------------------------------------------------------

def own_ns(kind: str) -> str:
    return os.readlink(f"/proc/self/ns/{kind}")


class Namespace:
    """A `sleep infinity` process in a new user+net namespace, made by `user`."""

    def __init__(self, user: User, helpers_dir: str):
        self.user = user
        self.helpers_dir = helpers_dir
        self.proc = user.popen(
            ["unshare", "--user", "--map-root-user", "--net", "--", "sleep", "infinity"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        my_net = own_ns("net")

        def ready():
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"unshare exited {self.proc.returncode}: {self.proc.stderr.read()!r}")
            try:
                comm = Path(f"/proc/{self.pid}/comm").read_text().strip()
                net = os.readlink(f"/proc/{self.pid}/ns/net")
            except OSError:
                return False
            return comm == "sleep" and net != my_net

        try:
            wait_until(ready, 10, what=f"namespace process {self.pid}")
        except BaseException:
            self.close()
            raise

    @property
    def net_path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def user_path(self) -> str:
        return f"/proc/{self.pid}/ns/user"

    def argv(self, argv) -> list[str]:
        return ["nsenter", f"--target={self.pid}", "--user", "--net",
                "--preserve-credentials", "--", *[str(a) for a in argv]]

    def run(self, argv, timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return self.user.run(self.argv(argv), timeout=timeout, check=check, **kw)

    def popen(self, argv, **kw) -> subprocess.Popen:
        return self.user.popen(self.argv(argv), **kw)

    def sh(self, script: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", script], timeout=timeout, check=check)

    def client_argv(self, *args) -> list[str]:
        return [NS_PYTHON, f"{self.helpers_dir}/nsclient.py", *[str(a) for a in args]]

    def client(self, *args, timeout: float = 120) -> dict:
        """Run nsclient.py inside the namespace; return its JSON result."""
        cp = self.run(self.client_argv(*args), timeout=timeout, check=False, text=True)
        if cp.returncode != 0:
            raise HarnessError(f"nsclient {args} exited {cp.returncode}\n"
                               f"stdout: {cp.stdout}\nstderr: {cp.stderr}")
        return json.loads(cp.stdout.strip().splitlines()[-1])

    def ip_json(self, *args) -> list:
        cp = self.run(["ip", "-j", *args], text=True)
        return json.loads(cp.stdout or "[]")

    def link(self, name: str) -> dict:
        links = self.ip_json("addr", "show", "dev", name)
        assert len(links) == 1, links
        return links[0]

    def addrs(self, name: str, family: str | None = None) -> list[dict]:
        infos = self.link(name).get("addr_info", [])
        return [a for a in infos if family is None or a["family"] == family]

    def wait_slaac(self, dev: str = "tap0", prefix: str = "fd00::", timeout: float = 20) -> str:
        """Wait for a global, non-tentative IPv6 address from SLAAC; return it."""
        def got():
            for a in self.addrs(dev, "inet6"):
                if (a["local"].startswith(prefix) and a.get("scope") == "global"
                        and not a.get("tentative") and not a.get("dadfailed")):
                    return a["local"]
            return None
        return wait_until(got, timeout, interval=0.2, what=f"SLAAC address on {dev}")

    def wait_dad(self, dev: str = "tap0", timeout: float = 10) -> None:
        """Wait until no IPv6 address on dev is tentative."""
        wait_until(lambda: not any(a.get("tentative") for a in self.addrs(dev, "inet6")),
                   timeout, interval=0.1, what=f"DAD on {dev}")

    def start_server(self, *args, timeout: float = 15) -> "NsServer":
        return NsServer(self, args, timeout)

    def close(self) -> None:
        kill_and_reap(self.proc)
        if self.proc.stderr:
            self.proc.stderr.close()


class NsServer:
    """nsclient.py server mode inside a namespace; waits for its READY line."""

    def __init__(self, ns: Namespace, args, timeout: float):
        self.proc = ns.popen(ns.client_argv(*args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            line = read_line(self.proc.stdout, timeout)
        except BaseException:
            self.close()
            raise
        if not line.startswith(b"READY"):
            self.close()
            raise HarnessError(f"server {args} did not start: {line!r} "
                               f"stderr={self.proc.stderr.read()!r}")
        self.port = int(line.split()[1])

    def result(self, timeout: float = 60) -> dict:
        """Wait for the server to finish and return its JSON result line."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise HarnessError("namespace server did not finish in time")
        if self.proc.returncode != 0:
            raise HarnessError(f"namespace server exited {self.proc.returncode}: {err!r}")
        return json.loads(out.decode().strip().splitlines()[-1])

    def close(self) -> None:
        kill_and_reap(self.proc)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def read_line(f, timeout: float) -> bytes:
    """Read one line from a pipe with a deadline (no blocking readline)."""
    fd = f.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HarnessError(f"timed out reading a line (got {buf!r})")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf


# --------------------------------------------------------------------------
# The forwarder under test
# --------------------------------------------------------------------------

@dataclass
class Impl:
    name: str  # "nsnet" or "slirp4netns"
    bin: str

    def run(self, args, user: User | None = None, timeout: float = 20, **kw) -> subprocess.CompletedProcess:
        user = user or User.root()
        return user.run([self.bin, *args], timeout=timeout, **kw)


@dataclass
class Forwarder:
    impl: Impl
    user: User
    proc: subprocess.Popen
    log_path: str
    ready_r: int | None = None
    exit_w: int | None = None
    ready_bytes: bytes = b""
    _closed: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 15) -> bytes:
        """Read the ready-fd until the first byte, EOF, or process exit."""
        deadline = time.monotonic() + timeout
        while not self.ready_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"{self.impl.name} not ready after {timeout}s\n{self.log()}")
            r, _, _ = select.select([self.ready_r], [], [], min(left, 0.2))
            if r:
                chunk = os.read(self.ready_r, 64)
                if not chunk:
                    # A failed start closes the ready-fd, then says why and
                    # exits: give it the time to finish, so the log is whole.
                    try:
                        self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                    raise HarnessError(
                        f"{self.impl.name}: ready-fd EOF without data "
                        f"(exit={self.proc.poll()})\n{self.log()}")
                self.ready_bytes += chunk
            elif self.proc.poll() is not None:
                raise HarnessError(
                    f"{self.impl.name} exited {self.proc.returncode} before ready\n{self.log()}")
        return self.ready_bytes

    def read_ready_to_eof(self, timeout: float = 5) -> bytes:
        """Everything written to the ready-fd, up to EOF."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"ready-fd not closed after {timeout}s (got {self.ready_bytes!r})")
            r, _, _ = select.select([self.ready_r], [], [], left)
            if r:
                chunk = os.read(self.ready_r, 64)
                if not chunk:
                    return self.ready_bytes
                self.ready_bytes += chunk

    def close_exit_fd(self) -> None:
        if self.exit_w is not None:
            os.close(self.exit_w)
            self.exit_w = None

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{self.impl.name} still running after {timeout}s\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        kill_and_reap(self.proc)
        for fd in (self.ready_r, self.exit_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.ready_r = self.exit_w = None


def start_forwarder(impl: Impl, user: User, args, workdir: str, *, ready: bool = True,
                    exit_fd: bool = False, wait: bool = True, timeout: float = 15,
                    prefix=()) -> Forwarder:
    """Start `[PREFIX...] BIN [-r FD] [-e FD] ARGS...` as `user`; wait for the ready byte.

    PREFIX must exec the binary in place (nsenter without --fork, setpriv), so
    the PID is the forwarder's and the fds reach it.
    NSNET_TEST_OFFLOAD=1/0 runs nsnet with --offload/--no-offload."""
    args = [str(a) for a in args]
    offload = os.environ.get("NSNET_TEST_OFFLOAD", "")
    if impl.name == "nsnet" and offload in ("0", "1"):
        args.insert(0, "--offload" if offload == "1" else "--no-offload")
    pass_fds = []
    opts = []
    ready_r = ready_w = exit_r = exit_w = None
    if ready:
        ready_r, ready_w = os.pipe()
        pass_fds.append(ready_w)
        opts.append(f"--ready-fd={ready_w}")
    if exit_fd:
        exit_r, exit_w = os.pipe()
        pass_fds.append(exit_r)
        opts.append(f"--exit-fd={exit_r}")
    log_path = tempfile.mktemp(prefix=f"{impl.name}.", suffix=".log", dir=workdir)
    with open(log_path, "wb") as log:
        try:
            proc = user.popen([*prefix, impl.bin, *opts, *args], stdout=log, stderr=log,
                              pass_fds=pass_fds)
        except BaseException:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                if fd is not None:
                    os.close(fd)
            raise
    for fd in (ready_w, exit_r):
        if fd is not None:
            os.close(fd)
    fwd = Forwarder(impl, user, proc, log_path, ready_r=ready_r, exit_w=exit_w)
    if ready and wait:
        try:
            fwd.wait_ready(timeout)
        except BaseException:
            fwd.stop()
            raise
    return fwd


# --------------------------------------------------------------------------
# API socket client
# --------------------------------------------------------------------------

def api_call(path: str, request: bytes | str | dict, timeout: float = 5,
             shutdown: bool = True) -> bytes:
    """One request per connection: write, shut down the write side, read to EOF."""
    if isinstance(request, dict):
        request = json.dumps(request)
    if isinstance(request, str):
        request = request.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        return recv_to_eof(s, reset_ends=True)


def idle_clients(path: str, n: int) -> list[socket.socket]:
    """n connections to the Unix socket at path that send nothing (those
    the backlog cannot hold wait there); the caller closes them."""
    out = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            out.append(s)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                pass  # the backlog is full: the connection waits
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


def recv_to_eof(s: socket.socket, reset_ends: bool = False) -> bytes:
    """Everything s receives up to EOF.  reset_ends: an ECONNRESET after
    some data ends the reply (a server that closes with part of an
    over-long request unread makes the kernel report it after the reply:
    slirp4netns on "too large message"); before any data it is raised."""
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            if not (reset_ends and chunks):
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def add_hostfwd(path: str, proto: str, host_port: int, guest_port: int,
                host_addr: str | None = "127.0.0.1", guest_addr: str | None = None) -> bytes:
    args = {"proto": proto}
    if host_addr is not None:
        args["host_addr"] = host_addr
    args["host_port"] = host_port
    if guest_addr is not None:
        args["guest_addr"] = guest_addr
    args["guest_port"] = guest_port
    return api_call(path, {"execute": "add_hostfwd", "arguments": args})


# --------------------------------------------------------------------------
# Host-side helpers (run in the pytest process, in the isolated netns)
# --------------------------------------------------------------------------

def free_ports(n: int, kind: int = socket.SOCK_STREAM, family: int = socket.AF_INET,
               addr: str = "127.0.0.1") -> list[int]:
    """n distinct ports that are free now (all held open until all are chosen)."""
    socks = [socket.socket(family, kind) for _ in range(n)]
    try:
        for s in socks:
            s.bind((addr, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(kind: int = socket.SOCK_STREAM, family: int = socket.AF_INET,
              addr: str = "127.0.0.1") -> int:
    return free_ports(1, kind, family, addr)[0]


def payload(nbytes: int) -> bytes:
    return os.urandom(nbytes)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HostServer:
    """A threaded TCP or UDP server on the host side of the forwarder.

    modes: "echo" (TCP: echo until EOF; UDP: echo each datagram),
           "sink" (TCP: read to EOF, answer "<count> <sha256>\\n").
    """

    def __init__(self, mode: str, proto: str = "tcp", addr: str = "127.0.0.1", port: int = 0):
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        self.mode, self.proto = mode, proto
        self.sock = socket.socket(family, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.connections = 0
        self.peers: list[tuple] = []  # the source (address, port, ...) of each connection/datagram
        self.results: list[dict] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if proto == "tcp":
            self.sock.listen(16)
            target = self._accept_loop
        else:
            target = self._udp_loop
        t = threading.Thread(target=target, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.peers.append(peer)
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket):
        try:
            with conn:
                conn.settimeout(60)
                h = hashlib.sha256()
                n = 0
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    n += len(data)
                    if self.mode == "echo":
                        conn.sendall(data)
                    else:
                        h.update(data)
                if self.mode == "sink":
                    conn.sendall(f"{n} {h.hexdigest()}\n".encode())
                    self.results.append({"received": n, "sha256": h.hexdigest()})
        except BaseException as e:  # recorded, reported by the test
            self.errors.append(e)

    def _udp_loop(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if self._stop.is_set():  # close()'s wake-up datagram
                return
            self.peers.append(peer)
            self.connections += 1
            self.sock.sendto(data, peer)

    def close(self):
        self._stop.set()
        wake_listener(self.sock)
        self.sock.close()
        for t in self._threads:
            t.join(timeout=5)


def destroy_subscribers() -> set[int]:
    """The inodes of the sock_diag sockets (NETLINK_SOCK_DIAG, protocol 4)
    of this network namespace (the sealed test namespace, where nsnet's
    supervisor and bypass handlers run) that are members of a multicast
    group: those that get the kernel's TCP destroy notifications
    (SKNLGRP_INET_TCP_DESTROY 1, SKNLGRP_INET6_TCP_DESTROY 3), which the
    kernel builds for every TCP socket it frees while one exists."""
    out = set()
    with open("/proc/net/netlink") as f:
        next(f)  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        for line in f:
            cols = line.split()
            if int(cols[1]) == 4 and int(cols[3], 16) != 0:
                out.add(int(cols[9]))
    return out


def thread_seccomp(pid: int) -> list[str]:
    """The Seccomp: mode of each thread of process pid (2: a filter)."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            st = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)
        out.append(st["Seccomp"].strip())
    return out


def sock_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process pid holds."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    return out


def wake_listener(sock: socket.socket) -> None:
    """Wake the thread blocked in sock's accept() or recvfrom() (closing the
    socket does not): shut a TCP listener down, send a UDP socket an empty
    datagram.  Its loop then sees its stop flag at once instead of at its
    next poll timeout."""
    try:
        if sock.type == socket.SOCK_STREAM:
            sock.shutdown(socket.SHUT_RDWR)
        else:
            with socket.socket(sock.family, socket.SOCK_DGRAM) as s:
                s.sendto(b"", sock.getsockname())
    except OSError:
        pass  # already closed, or never bound: nothing waits on it


def refused_through(port: int, host: str = "127.0.0.1", timeout: float = 10) -> bool:
    """A forward on host:port does not reach a server: the client's
    connection is closed (or reset) without an answer to what it sent."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"hello")
            return s.recv(10) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def tcp_send(host: str, port: int, data: bytes, timeout: float = 60) -> bytes:
    """Connect, send data, shut down writing, return everything read until EOF."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        out = []
        err = []

        def reader():
            try:
                while True:
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        return
                    out.append(chunk)
            except BaseException as e:
                err.append(e)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        t.join(timeout)
        if t.is_alive():
            raise HarnessError("tcp_send: no EOF from peer in time")
        if err:
            raise err[0]
        return b"".join(out)


def udp_roundtrip(host: str, port: int, data: bytes, timeout: float = 2, tries: int = 5) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(tries):
            s.sendto(data, (host, port))
            try:
                reply, _ = s.recvfrom(65535)
                return reply
            except socket.timeout:
                continue
    raise HarnessError(f"udp_roundtrip: no reply from {host}:{port} after {tries} tries")


def install_helpers(dest: str) -> None:
    """Copy the in-namespace helper scripts where the unprivileged user can read them."""
    os.chmod(dest, 0o755)
    for name in ("nsclient.py", "framefuzz.py", "nsload.py"):
        shutil.copy(HERE / name, f"{dest}/{name}")
        os.chmod(f"{dest}/{name}", 0o644)
