"""nsnet's Python API (imported lazily by ``import nsnet``).

Two ways in:

* ``nsnet.attach(pid_or_path, **options) -> Network``: give networking to
  an existing network namespace (a process's, or a namespace file).  The
  handle runs ``nsnet`` as a subprocess with a private API socket and
  talks to it; it is a context manager.
* ``nsnet.run(argv, publish=..., **options)`` and ``nsnet.Popen(...)``:
  run a command under ``nsnet run`` (new user, network and mount
  namespaces, network configured before the command starts), like
  ``subprocess.run`` and ``subprocess.Popen``.

Both share the port-forward and introspection methods: add_forward(),
remove_forward(), forwards(), info(), stats().  Errors are the classes of
``nsnet.errors`` (``nsnet.NsnetError`` and subclasses).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .errors import (
    ApiError,
    ForwardError,
    NotRunning,
    NsnetError,
    PortInUse,
    StartError,
    TargetNotFound,
)
from . import options as O
from .portspec import PortSpec, PortSpecError, check_addr, check_port, port_in_use
from .portspec import parse as parse_portspec

START_TIMEOUT = 30.0
API_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class PortForward:
    """One port forward, as list_hostfwd reports it."""

    id: int
    proto: str
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int
    mode: str = "slirp"  # or "splice": nsnet's fast path (docs/fastpath.md)


FORWARD_MODES = ("slirp", "splice")


def nsnet_command() -> list[str]:
    """How the API starts nsnet: this interpreter, ``-m nsnet``.  -P keeps
    the current directory off sys.path (a source tree there would shadow
    the installed, compiled package)."""
    return [sys.executable, "-P", "-m", "nsnet"]


# --------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------

def to_portspec(spec: "str | int | PortSpec", guest_port: int | None = None, *,
                proto: str = "tcp", host_addr: str = "", guest_addr: str = "") -> PortSpec:
    """A PortSpec from a spec string, a PortSpec, or host_port/guest_port and
    keywords.  Raises ForwardError."""
    try:
        if isinstance(spec, PortSpec):
            if guest_port is not None:
                raise PortSpecError("give a PortSpec or ports, not both")
            return spec
        if isinstance(spec, str):
            if guest_port is not None or proto != "tcp" or host_addr or guest_addr:
                raise PortSpecError(
                    f"{spec!r}: give either a spec string or host_port, guest_port and "
                    "keywords, not both")
            return parse_portspec(spec)
        if proto not in ("tcp", "udp"):
            raise PortSpecError(f"proto must be 'tcp' or 'udp', not {proto!r}")
        if guest_port is None:
            raise PortSpecError("guest_port is missing")
        return PortSpec(proto, check_addr(host_addr, "host_addr"), check_port(spec, "host_port"),
                        check_port(guest_port, "guest_port"),
                        check_addr(guest_addr, "guest_addr"))
    except PortSpecError as e:
        raise ForwardError(f"bad port forward: {e}") from None


# --------------------------------------------------------------------------
# The API socket
# --------------------------------------------------------------------------

def api_call(path: str, execute: str, arguments: dict[str, Any] | None = None,
             timeout: float = API_TIMEOUT) -> Any:
    """One request on nsnet's API socket; returns the reply object.  Raises
    ApiError for an error reply, OSError if the socket cannot be reached."""
    req: dict[str, Any] = {"execute": execute}
    if arguments is not None:
        req["arguments"] = arguments
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode())
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise ApiError(f"{execute}: unreadable reply {b''.join(chunks)[:200]!r}") from None
    if not isinstance(reply, dict):
        raise ApiError(f"{execute}: unexpected reply {reply!r}")
    if "error" in reply:
        desc = reply["error"].get("desc", "") if isinstance(reply["error"], dict) else ""
        raise ApiError(str(desc or reply["error"]))
    return reply


class _Controls:
    """add_forward() and friends, over an API socket (mixed into Network
    and Popen)."""

    def _api_path(self) -> str:
        raise NotImplementedError

    def _check_running(self) -> None:
        raise NotImplementedError

    def _call(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        self._check_running()
        try:
            return api_call(self._api_path(), execute, arguments)
        except OSError as e:
            self._check_running()  # raises NotRunning if nsnet died meanwhile
            raise ApiError(f"{execute}: API socket {self._api_path()}: "
                           f"{e.strerror or e}") from None

    def add_forward(self, spec: "str | int | PortSpec", guest_port: int | None = None, *,
                    proto: str = "tcp", host_addr: str = "", guest_addr: str = "",
                    mode: str = "slirp") -> int:
        """Publish a port; return the forward's id.

        ``add_forward("127.0.0.1:8080:80/tcp")`` or ``add_forward(8080, 80,
        host_addr="127.0.0.1")``.  host_addr "" means every address
        (0.0.0.0); guest_addr "" the namespace's own address (in both
        modes; "127.0.0.1" or "::1" for a service on its loopback).  Raises
        ForwardError for a malformed spec, PortInUse if the host port is
        taken."""
        ps = to_portspec(spec, guest_port, proto=proto, host_addr=host_addr,
                         guest_addr=guest_addr)
        if mode not in FORWARD_MODES:
            raise ForwardError(f"bad port forward: mode must be one of {', '.join(FORWARD_MODES)}"
                               f", not {mode!r}")
        args: dict[str, Any] = {"proto": ps.proto, "host_addr": ps.host_addr,
                                "host_port": ps.host_port, "guest_addr": ps.guest_addr,
                                "guest_port": ps.guest_port}
        if mode != "slirp":
            args["mode"] = mode
        try:
            reply = self._call("add_hostfwd", args)
        except ApiError as e:
            desc = str(e)
            if "slirp_add_hostfwd failed" in desc:
                if port_in_use(ps.proto, ps.host_addr, ps.host_port):
                    raise PortInUse(f"cannot forward {ps}: {ps.host_addr or '0.0.0.0'}:"
                                    f"{ps.host_port}/{ps.proto} is already in use") from None
                raise ForwardError(f"cannot forward {ps}: nsnet refused it ({desc})") from None
            if "bad arguments." in desc:
                what = desc.rsplit("bad arguments.", 1)[1]
                hint = ""
                if ":" in ps.host_addr and not ps.guest_addr and (
                        what == "guest_addr" or "needs IPv6" in what):
                    what = what.split(":")[0]
                    hint = " (an IPv6 host address needs IPv6 enabled: ipv6=True)"
                raise ForwardError(f"cannot forward {ps}: bad {what}{hint}") from None
            raise
        return int(reply["return"]["id"])

    def remove_forward(self, forward_id: "int | PortForward") -> None:
        """Remove a forward by id (or PortForward).  Raises ForwardError if
        there is no such forward."""
        fid = forward_id.id if isinstance(forward_id, PortForward) else forward_id
        if isinstance(fid, bool) or not isinstance(fid, int):
            raise ForwardError(f"a forward id is an int, not {fid!r}")
        try:
            self._call("remove_hostfwd", {"id": fid})
        except ApiError as e:
            if "bad arguments.id" in str(e):
                raise ForwardError(f"no port forward with id {fid}") from None
            raise ForwardError(f"cannot remove forward {fid}: {e}") from None

    def forwards(self) -> list[PortForward]:
        """The current port forwards, in id order."""
        reply = self._call("list_hostfwd")
        return [PortForward(int(e["id"]), e["proto"], e["host_addr"], int(e["host_port"]),
                            e["guest_addr"], int(e["guest_port"]), e.get("mode", "slirp"))
                for e in reply.get("entries", [])]

    def info(self) -> dict[str, Any]:
        """get_info: versions, PIDs, target, TAP, addresses, MTU, restarts..."""
        return dict(self._call("get_info")["return"])

    def stats(self) -> dict[str, Any]:
        """get_stats: frames and bytes each way, drops, active connections;
        with a splice forward, the fast path's counters under "fastpath";
        with an egress policy, its counters under "policy"."""
        return dict(self._call("get_stats")["return"])

    def start_capture(self, path: "str | os.PathLike[str]", max_bytes: int | None = None) -> None:
        """start_capture: capture every frame to path (pcap; created mode
        0600 or truncated, by nsnet; docs/capture.md) until stop_capture();
        at most max_bytes (default 1 GiB, 0: no limit).  ApiError if nsnet
        cannot (the errno is in the message) or a capture is running."""
        args: dict[str, Any] = {"path": os.path.abspath(os.fspath(path))}
        if max_bytes is not None:
            args["max_bytes"] = max_bytes
        self._call("start_capture", args)

    def stop_capture(self) -> None:
        """stop_capture: close the capture file (ApiError if none is open)."""
        self._call("stop_capture")

    def policy(self) -> dict[str, Any]:
        """The egress policy in force, in its JSON form
        ({"egress": "allow"|"deny", "rules": [...]}, docs/policy.md)."""
        return dict(self._call("get_policy")["return"])

    def set_policy(self, policy: "dict[str, Any] | None" = None, *, egress: str | None = None,
                   allow: Iterable[str] = (), deny: Iterable[str] = (),
                   keep_established: bool = False) -> None:
        """Replace the egress policy atomically: a JSON-form dict, or
        egress= with allow=/deny= rule lists (as nsnet.run takes them).
        Flows the new policy denies are cut unless keep_established.
        Raises PolicyError for a bad policy (checked here first)."""
        from .policy import Policy, PolicyError

        if policy is not None and (egress is not None or allow or deny):
            raise TypeError("give a policy dict or egress/allow/deny, not both")
        if policy is None:
            pol = Policy.from_args(egress or "allow", allow=list(allow), deny=list(deny))
        elif isinstance(policy, Policy):
            pol = policy
        else:
            pol = Policy.parse_json(policy)
        args = dict(pol.to_json(), keep_established=bool(keep_established))
        try:
            self._call("set_policy", args)
        except ApiError as e:
            raise PolicyError(str(e)) from None


# --------------------------------------------------------------------------
# Private directory, pipes, process: what a handle owns
# --------------------------------------------------------------------------

def _private_dir() -> str:
    import tempfile

    d = tempfile.mkdtemp(prefix="nsnet-")
    if len(os.path.join(d, "api.sock").encode()) >= O.SUN_PATH_MAX:  # long $TMPDIR
        os.rmdir(d)
        d = tempfile.mkdtemp(prefix="nsnet-", dir="/tmp")
    return d


def _remove_dir(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _give_dir(path: str, user: "int | str") -> None:
    """chown a private directory to the user nsnet will run as (Popen's
    user= argument; only root can ask for another user anyway)."""
    if isinstance(user, str):
        import pwd

        uid = pwd.getpwnam(user).pw_uid
    else:
        uid = user
    if uid != os.geteuid():
        os.chown(path, uid, -1)


def _close_fd(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _wait_ready(fd: int, proc: "subprocess.Popen[Any]", timeout: float) -> bool:
    """True once a byte arrives on the ready pipe; False on EOF (nsnet
    failed).  Raises StartError on timeout."""
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        raise StartError(f"nsnet (pid {proc.pid}) was not ready after {timeout:g} s")
    return bool(os.read(fd, 16))


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").strip()


class _Resources:
    """Everything a Network must release; also run by its finalizer, so a
    handle that is never closed leaves nothing behind either."""

    def __init__(self, proc: "subprocess.Popen[Any]", exit_w: int, workdir: str) -> None:
        self.proc = proc
        self.exit_w: int | None = exit_w
        self.workdir = workdir

    def release(self, timeout: float = CLOSE_TIMEOUT) -> int:
        _close_fd(self.exit_w)  # nsnet tears down and exits 0
        self.exit_w = None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        _remove_dir(self.workdir)
        return code


# --------------------------------------------------------------------------
# attach()
# --------------------------------------------------------------------------

class Network(_Controls):
    """nsnet attached to a network namespace: a handle on the running
    ``nsnet`` process.  Use it as a context manager, or call close()."""

    def __init__(self, target: "int | str", proc: "subprocess.Popen[Any]", workdir: str,
                 exit_w: int) -> None:
        self.target = target
        self._proc = proc
        self._workdir = workdir
        self.api_socket = os.path.join(workdir, "api.sock")
        self._log_path = os.path.join(workdir, "nsnet.log")
        self._res = _Resources(proc, exit_w, workdir)
        self._finalizer = weakref.finalize(self, self._res.release)
        self._closed = False
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        """The PID of the nsnet (supervisor) process."""
        return self._proc.pid

    @property
    def running(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def log(self) -> str:
        """What nsnet has printed on stderr so far (its log)."""
        return _tail(self._log_path, 1 << 20)

    def _api_path(self) -> str:
        return self.api_socket

    def _check_running(self) -> None:
        if self._closed:
            raise NotRunning("this nsnet handle is closed")
        code = self._proc.poll()
        if code is not None:
            last = self.log().splitlines()[-1:] or [""]
            raise NotRunning(f"nsnet (pid {self._proc.pid}) has exited with status {code}"
                             + (f": {last[0]}" if last[0] else ""))

    def wait(self, timeout: float | None = None) -> int:
        """Wait for nsnet to exit (it does when the target process exits)."""
        return self._proc.wait(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> int:
        """Tear nsnet down (the namespace loses its network); return nsnet's
        exit status.  Idempotent."""
        if not self._closed:
            self._closed = True
            self._finalizer.detach()
            self.returncode = self._res.release(timeout)
        assert self.returncode is not None
        return self.returncode

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "closed" if self._closed else "exited"
        return f"<nsnet.Network target={self.target!r} pid={self._proc.pid} {state}>"


# The defaults of the API's keywords: those of the command line (options.py).
_A = O.api_keywords(O.ATTACH)
_R = O.api_keywords(O.RUN)


def _policy_order(options: dict[str, Any]) -> dict[str, Any]:
    """allow= and deny= lists become --allow/--deny flags; rules are
    checked in flag order, and with two separate lists the rules of the
    default's own action come first (they can only be exceptions to the
    others: policy.Policy.from_args)."""
    if "allow" in options and "deny" in options:
        first = "deny" if options.get("egress") == "deny" else "allow"
        second = "allow" if first == "deny" else "deny"
        rest = {k: v for k, v in options.items() if k not in ("allow", "deny")}
        options = {**rest, first: options[first], second: options[second]}
    for key in ("allow", "deny"):
        if isinstance(options.get(key), str):
            raise TypeError(f"{key}= is a list of rules, not a string")
    return options


def _target_args(target: "int | str | os.PathLike[str]",
                 userns: "str | os.PathLike[str] | None") -> tuple["int | str", list[str]]:
    if isinstance(target, bool):
        raise TypeError("target must be a PID or a path, not a bool")
    if isinstance(target, int):
        if target <= 0:
            raise TargetNotFound(f"invalid PID {target}")
        if not os.path.exists(f"/proc/{target}"):
            raise TargetNotFound(f"no process with PID {target}")
        if userns is not None:
            raise TypeError("userns= is for a namespace path target, not a PID")
        return target, [str(target)]
    path = os.fspath(target)
    if not os.path.exists(path):
        raise TargetNotFound(f"network namespace {path} does not exist")
    args = ["--netns-type=path"]
    if userns is not None:
        upath = os.fspath(userns)
        if not os.path.exists(upath):
            raise TargetNotFound(f"user namespace {upath} does not exist")
        args.append(f"--userns-path={upath}")
    return path, [*args, path]


def attach(target: "int | str | os.PathLike[str]", *,
           publish: Iterable["str | PortSpec"] = (),
           mtu: int = _A["mtu"],
           cidr: str = _A["cidr"],
           ipv6: bool = _A["ipv6"],
           disable_host_loopback: bool = _A["disable_host_loopback"],
           no_egress: bool = _A["no_egress"],
           disable_dns: bool = _A["disable_dns"],
           tapname: str = "tap0",
           configure: bool = True,
           userns: "str | os.PathLike[str] | None" = None,
           macaddress: str | None = _A["macaddress"],
           outbound_addr: str | None = _A["outbound_addr"],
           outbound_addr6: str | None = _A["outbound_addr6"],
           offload: bool = _A["offload"],
           enable_sandbox: bool = _A["enable_sandbox"],
           enable_seccomp: bool = _A["enable_seccomp"],
           exit_with_target: bool = _A["exit_with_target"],
           log_level: str = _A["log_level"],
           timeout: float = START_TIMEOUT,
           command: Sequence[str] | None = None,
           **options: Any) -> Network:
    """Give the network namespace of a process (int PID) or a namespace
    file (path) user-mode networking, and return a handle on it.

    Options are those of the ``nsnet`` command line (see ``nsnet --help``;
    the keywords and defaults of nsnet/options.py: every option the table
    gives an API keyword is accepted, those not named here too);
    ``publish`` forwards ports once it is up (specs as add_forward takes
    them).  Raises TargetNotFound, StartError, ForwardError/PortInUse (for
    publish), or TypeError for an unknown option."""
    specs = [to_portspec(p) for p in publish]
    flags = ["--configure"] if configure else []
    flags += O.api_flags(O.ATTACH, dict(
        mtu=mtu, cidr=cidr, ipv6=ipv6, disable_host_loopback=disable_host_loopback,
        no_egress=no_egress, disable_dns=disable_dns, macaddress=macaddress,
        outbound_addr=outbound_addr, outbound_addr6=outbound_addr6, offload=offload,
        enable_sandbox=enable_sandbox, enable_seccomp=enable_seccomp,
        exit_with_target=exit_with_target, log_level=log_level, **_policy_order(options)))
    tgt, target_args = _target_args(target, userns)

    workdir = _private_dir()
    api = os.path.join(workdir, "api.sock")
    log_path = os.path.join(workdir, "nsnet.log")
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    argv = [*(command or nsnet_command()), *flags, f"--ready-fd={ready_w}",
            f"--exit-fd={exit_r}", f"--api-socket={api}", *target_args, tapname]
    try:
        with open(log_path, "wb") as logf:
            # A process group of its own: the caller's Ctrl-C is the caller's.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=logf, pass_fds=(ready_w, exit_r), cwd=workdir,
                                    process_group=0)
    except BaseException:
        for fd in (ready_r, ready_w, exit_r, exit_w):
            _close_fd(fd)
        _remove_dir(workdir)
        raise
    _close_fd(ready_w)
    _close_fd(exit_r)
    net = Network(tgt, proc, workdir, exit_w)
    try:
        try:
            ok = _wait_ready(ready_r, proc, timeout)
        finally:
            _close_fd(ready_r)
        if not ok:
            try:
                code: int | None = proc.wait(CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            log = net.log()
            if isinstance(tgt, int) and not os.path.exists(f"/proc/{tgt}"):
                raise TargetNotFound(f"process {tgt} exited before nsnet could attach")
            raise StartError(f"nsnet failed to attach to {tgt} (exit status {code})"
                             + (f":\n{log}" if log else ""))
        for spec in specs:
            net.add_forward(spec)
    except BaseException:
        net.close()
        raise
    return net


# --------------------------------------------------------------------------
# nsnet run: run() and Popen
# --------------------------------------------------------------------------

MAP_USER_FLAGS = {"root": "--map-root-user", "current": "--map-current-user",
                  "subids": "--map-subids"}


def run_flags(*, publish: Iterable["str | PortSpec"] = (), mtu: int = _R["mtu"],
              cidr: str = _R["cidr"], ipv6: bool = _R["ipv6"],
              disable_host_loopback: bool = _R["disable_host_loopback"],
              no_egress: bool = _R["no_egress"], dns: bool | None = _R["dns"],
              map_user: str = _R["map_user"], offload: bool = _R["offload"],
              log_level: str | None = None, publish_mode: str | None = None,
              **options: Any) -> list[str]:
    """The `nsnet run` options for these settings (ForwardError for a bad
    publish spec, ValueError for a bad map_user, TypeError for an option
    `nsnet run` does not have)."""
    if map_user not in MAP_USER_FLAGS:
        raise ValueError(f"map_user must be one of {', '.join(MAP_USER_FLAGS)}, not {map_user!r}")
    return O.api_flags(O.RUN, dict(
        publish=[str(to_portspec(p)) for p in publish], mtu=mtu, cidr=cidr, ipv6=ipv6,
        disable_host_loopback=disable_host_loopback, no_egress=no_egress, dns=dns,
        map_user=map_user, offload=offload, log_level=log_level, publish_mode=publish_mode,
        **_policy_order(options)))


class Popen(subprocess.Popen[Any], _Controls):
    """``subprocess.Popen`` for ``nsnet run``: the command runs in its own
    user, network and mount namespaces.

    Takes the network options of run_flags() (publish, mtu, cidr, ipv6,
    disable_host_loopback, no_egress, dns, map_user, offload, log_level,
    publish_mode, bypass: the command's TCP connects to the host get host
    sockets, see docs/bypass.md),
    then any subprocess.Popen argument.  With api=True (the default) nsnet
    gets a private API socket, so add_forward(), forwards(), info() and
    stats() work while the command runs; wait_ready() waits until the
    network (and every published port) is up.  send_signal() and
    terminate() reach the command (nsnet forwards them); returncode is the
    command's (128+N when killed by signal N; 125 when nsnet failed)."""

    def __init__(self, args: Sequence[str], *, publish: Iterable["str | PortSpec"] = (),
                 mtu: int = _R["mtu"], cidr: str = _R["cidr"], ipv6: bool = _R["ipv6"],
                 disable_host_loopback: bool = _R["disable_host_loopback"],
                 no_egress: bool = _R["no_egress"], dns: bool | None = _R["dns"],
                 map_user: str = _R["map_user"], offload: bool = _R["offload"],
                 log_level: str | None = None, publish_mode: str | None = None,
                 api: bool = True,
                 command: Sequence[str] | None = None, **kwargs: Any) -> None:
        if isinstance(args, (str, bytes)):
            raise TypeError("args must be a sequence of strings (no shell parsing)")
        self.command = [os.fspath(a) for a in args]
        # Keywords of the option table (nsnet run's) are nsnet's; the rest
        # are subprocess.Popen's.
        more = {k: kwargs.pop(k) for k in list(kwargs) if k in _R and k != "api_socket"}
        flags = run_flags(publish=publish, mtu=mtu, cidr=cidr, ipv6=ipv6,
                          disable_host_loopback=disable_host_loopback, no_egress=no_egress,
                          dns=dns, map_user=map_user, offload=offload, log_level=log_level,
                          publish_mode=publish_mode, **more)
        self._workdir: str | None = None
        self.api_socket: str | None = None
        self._ready_r: int | None = None
        self._error_r: int | None = None
        self._ready = False
        ready_w = error_w = None
        if api:
            self._workdir = _private_dir()
            if kwargs.get("user") is not None:  # nsnet runs as that user: its directory
                _give_dir(self._workdir, kwargs["user"])
            self.api_socket = os.path.join(self._workdir, "api.sock")
            self._ready_r, ready_w = os.pipe()
            # nsnet run's error, for wait_ready() (stderr is the caller's).
            self._error_r, error_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            flags += [f"--api-socket={self.api_socket}", f"--ready-fd={ready_w}",
                      f"--error-fd={error_w}"]
            kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), ready_w, error_w)
        argv = [*(command or nsnet_command()), "run", *flags, "--", *self.command]
        try:
            super().__init__(argv, **kwargs)
        except BaseException:
            _close_fd(self._ready_r)
            _close_fd(self._error_r)
            if self._workdir:
                _remove_dir(self._workdir)
            raise
        finally:
            _close_fd(ready_w)
            _close_fd(error_w)
        if self._workdir is not None:
            self._cleanup = weakref.finalize(self, _remove_dir, self._workdir)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the network is up and the command is being started.
        Raises StartError if nsnet exits first (the exit status is in
        returncode), NsnetError without api=True."""
        if self._ready:
            return
        if self._ready_r is None:
            raise NsnetError("wait_ready() needs api=True")
        ok = _wait_ready(self._ready_r, self, timeout)
        _close_fd(self._ready_r)
        self._ready_r = None
        if not ok:
            try:
                code = self.wait(CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            why = self._error_text()
            raise StartError(f"nsnet run exited (status {code}) before the network was ready"
                             + (f": {why}" if why else ""))
        self._ready = True
        _close_fd(self._error_r)
        self._error_r = None

    def _error_text(self) -> str:
        """What nsnet run wrote on --error-fd (non-blocking: its helpers may
        still hold the pipe open)."""
        if self._error_r is None:
            return ""
        try:
            data = os.read(self._error_r, 65536)
        except OSError:
            data = b""
        _close_fd(self._error_r)
        self._error_r = None
        return data.decode(errors="replace").strip()

    def _api_path(self) -> str:
        if self.api_socket is None:
            raise NsnetError("this nsnet.Popen has no API socket (api=False)")
        return self.api_socket

    def _check_running(self) -> None:
        if self.api_socket is None:
            raise NsnetError("this nsnet.Popen has no API socket (api=False)")
        if self.poll() is not None:
            raise NotRunning(f"nsnet run has exited with status {self.returncode}")
        self.wait_ready()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            _close_fd(self._ready_r)
            _close_fd(self._error_r)
            self._ready_r = self._error_r = None
            if self._workdir is not None:
                self._cleanup()


def run(args: Sequence[str], *, publish: Iterable["str | PortSpec"] = (),
        input: "bytes | str | None" = None, capture_output: bool = False,
        timeout: float | None = None, check: bool = False,
        **kwargs: Any) -> "subprocess.CompletedProcess[Any]":
    """``subprocess.run`` for ``nsnet run``: run a command in its own user,
    network and mount namespaces and return a CompletedProcess (args is
    your command; returncode is its status, 128+N when killed by signal
    N, 125 when nsnet failed).  Takes the network options of Popen, then
    any subprocess.run argument.  On timeout nsnet is killed, and the
    command with it."""
    if capture_output:
        if kwargs.get("stdout") is not None or kwargs.get("stderr") is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output")
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        if kwargs.get("stdin") is not None:
            raise ValueError("stdin and input arguments may not both be used")
        kwargs["stdin"] = subprocess.PIPE
    kwargs.setdefault("api", False)
    with Popen(args, publish=publish, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            e.stdout, e.stderr = proc.communicate()
            e.cmd = proc.command
            raise
        except BaseException:
            proc.kill()
            raise
        code = proc.poll()
        assert code is not None
    if check and code:
        raise subprocess.CalledProcessError(code, proc.command, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(proc.command, code, stdout, stderr)
