"""The instance registry: one small JSON file per running nsnet, so that
`nsnet ps` can list them and `nsnet ctl --instance NAME` find one.

Where: $XDG_RUNTIME_DIR/nsnet/ when XDG_RUNTIME_DIR is set, /run/nsnet/ for
root, else /tmp/nsnet-UID/ (made mode 0700, refused if another user owns
it).  An entry is PID.json, written (atomically) once the network is ready
and removed at exit; an entry whose process is gone, or whose PID now
belongs to another process (start time differs), is stale: ignored, and
removed when its directory is ours.  Named instances (--name) without
--api-socket get their API socket here too: NAME.sock.
"""

from __future__ import annotations

import json
import os
import re
import time

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RegistryError(Exception):
    """The registry cannot be used; str() says why and what to do."""


def directory() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "nsnet")
    if os.geteuid() == 0:
        return "/run/nsnet"
    return f"/tmp/nsnet-{os.geteuid()}"


def ensure_directory() -> str:
    d = directory()
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
    except OSError as e:
        raise RegistryError(f"cannot create the instance registry {d}: {e.strerror}") from None
    if st.st_uid != os.geteuid():
        raise RegistryError(f"the instance registry {d} belongs to uid {st.st_uid}, not you "
                            "(set XDG_RUNTIME_DIR to a directory of your own)")
    return d


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise RegistryError(f"invalid instance name {name!r}: 1 to 64 letters, digits, "
                            "'_', '.', '-', starting with a letter or digit")
    return name


def socket_for(name: str) -> str:
    return os.path.join(directory(), f"{name}.sock")


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat
    field 22): with the PID, it names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _alive(entry: dict) -> bool:
    pid = entry.get("pid")
    return isinstance(pid, int) and pid > 0 and _start_time(pid) == entry.get("start_time")


def entries(clean: bool = True) -> list[dict]:
    """The live instances, oldest first.  Stale entries are skipped (and
    removed with clean=True when the directory is ours)."""
    d = directory()
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = []
    for fn in names:
        if not fn.endswith(".json") or not fn[:-5].isdigit():
            continue
        path = os.path.join(d, fn)
        try:
            with open(path) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(entry, dict):
            continue
        if _alive(entry):
            out.append(entry)
        elif clean:
            try:
                os.unlink(path)
                sock = entry.get("registry_socket")
                if sock:
                    os.unlink(sock)
            except OSError:
                pass
    out.sort(key=lambda e: e.get("started", 0))
    return out


def find(name: str) -> dict | None:
    for e in entries():
        if e.get("name") == name or str(e.get("pid")) == name:
            return e
    return None


class Entry:
    """This process's registry entry: add() once ready, remove() at exit."""

    def __init__(self, *, name: str | None, kind: str, target: str, tapname: str,
                 api_socket: str | None, command: list[str] | None = None,
                 registry_socket: bool = False) -> None:
        self.path: str | None = None
        self.data = {
            "pid": os.getpid(), "start_time": _start_time(os.getpid()), "name": name,
            "kind": kind, "target": target, "tap": tapname, "api_socket": api_socket,
            "command": command, "started": round(time.time(), 3), "uid": os.geteuid(),
            "registry_socket": api_socket if registry_socket else None,
        }

    def add(self) -> None:
        d = ensure_directory()
        path = os.path.join(d, f"{os.getpid()}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, path)
        self.path = path

    def remove(self) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None


def claim_name(name: str) -> str:
    """Check a --name: valid and not used by a live instance.  Returns the
    API socket path a named instance gets when it has no --api-socket."""
    check_name(name)
    other = find(name)
    if other is not None:
        raise RegistryError(f"instance name {name!r} is in use by nsnet pid {other['pid']} "
                            "(see nsnet ps)")
    ensure_directory()
    sock = socket_for(name)
    if os.path.exists(sock):  # left by an instance that was killed
        try:
            os.unlink(sock)
        except OSError as e:
            raise RegistryError(f"cannot remove the stale socket {sock}: {e.strerror}") from None
    return sock
