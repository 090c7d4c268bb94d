"""nsnet at its open-file limit (RLIMIT_NOFILE).

- At start (cli.py and run.py, before anything else) nsnet raises its soft
  limit to the hard one, as Go programs and Podman do; `nsnet run` gives
  COMMAND the soft limit it was started with back (a select()-based
  program breaks with fds above 1024).  A hard limit below NOFILE_MIN ends
  nsnet at once, saying what to do (exit 1; nsnet run: 125).
- The supervisor's poll() survives a limit lowered below the fds it holds
  (prlimit --pid): Linux refuses poll(2) with EINVAL when nfds exceeds
  RLIMIT_NOFILE; Poller raises the soft limit back, or polls in turns.
- API clients never take the supervisor's last SUPERVISOR_RESERVE fds:
  those are for its children (a forwarder restart, a helper), so a client
  flood cannot make a restart fail.
- EMFILE/ENFILE on a forward's accept refuses that one connection with a
  rate-limited warning (the forwarder's C loop, the relay).

README.md, "Troubleshooting", has the operator's side.
"""

from __future__ import annotations

import errno
import os
import select
import time

from . import linux
from .log import Throttle

# The hard limit nsnet needs to start: its set-up holds up to 23 fds at
# once across its processes (measured: nsnet run --bypass with a splice
# port and a policy; attach with -a: 19), plus SUPERVISOR_RESERVE and room
# for a few API clients and connections.
NOFILE_MIN = 64
# fds the supervisor keeps free of API clients, for its children's
# sockets and pidfds (a forwarder restart takes 4 at once).
SUPERVISOR_RESERVE = 16
HINT = ("raise the hard limit: `ulimit -Hn 1024` (root, or the shell that starts nsnet), "
        "LimitNOFILE=1024 in a systemd unit, `--ulimit nofile=1024:1024` for a container, "
        "`prlimit --nofile=1024:1024 nsnet ...`")
# Poller over the limit: how long one wait on the first fds lasts.
TURN_MS = 100


class FdLimitError(Exception):
    pass


def errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def raise_at_start() -> int:
    """Raise the soft limit to the hard one; return the soft limit nsnet
    was started with.  FdLimitError if the hard limit is below NOFILE_MIN."""
    soft, hard = linux.nofile_limits()
    if hard < NOFILE_MIN:
        raise FdLimitError(
            f"the open-file limit is too low: RLIMIT_NOFILE is {soft} (hard limit {hard}); "
            f"nsnet needs at least {NOFILE_MIN} (it raises its soft limit to the hard limit "
            f"itself); with fewer, its sockets and pipes fail with EMFILE (Too many open "
            f"files): {HINT}")
    if soft < hard:
        linux.raise_fd_limit()
    return soft


def restore_soft(soft: int) -> None:
    """For a program nsnet execs that is not nsnet's (nsnet run's
    COMMAND): the soft limit nsnet was started with."""
    try:
        linux.set_nofile_soft(soft)
    except OSError:
        pass


def exhausted(e: OSError, limits: bool = True) -> str:
    """What an EMFILE/ENFILE means, and what to do.  limits=False in a
    process under seccomp: getrlimit (prlimit64) is not in its allowlist."""
    if e.errno == errno.ENFILE:
        return (f"out of file descriptors: {e.strerror} (ENFILE): the system's file table "
                f"is full (sysctl fs.file-max, or what holds so many files)")
    if not limits:
        return (f"out of file descriptors: {e.strerror} ({errno_name(e)}; pid {os.getpid()}): "
                f"{HINT}, or, if it was lowered from outside, `prlimit --pid={os.getpid()}`")
    try:
        soft, hard = linux.nofile_limits()
    except OSError:
        return f"out of file descriptors: {e.strerror} ({errno_name(e)}): {HINT}"
    hint = HINT
    if soft < hard:  # lowered from outside: nsnet raised it at start
        hint = (f"its soft limit was lowered below the hard one: raise it "
                f"(`prlimit --pid={os.getpid()} --nofile={hard}:`)")
    return (f"out of file descriptors: {e.strerror} ({errno_name(e)}; RLIMIT_NOFILE {soft}, "
            f"hard limit {hard}): {hint}")


def free_fds() -> int | None:
    """fds this process may still open (its soft limit less the open ones);
    0 when even counting them fails with EMFILE, None if it cannot tell."""
    try:
        soft = linux.nofile_limits()[0]
        # fd numbers below the limit: one above it (the limit lowered
        # later) takes no room; listdir's own fd is among them.
        return soft - sum(1 for n in os.listdir("/proc/self/fd") if int(n) < soft) + 1
    except OSError as e:
        return 0 if e.errno in (errno.EMFILE, errno.ENFILE) else None


class Poller:
    """poll(2) over (fd, events) pairs that survives a soft or hard limit
    below their number (lowered from outside: prlimit --pid)."""

    def __init__(self, logger) -> None:
        self.log = logger
        self.warned = {"raised": Throttle(1, 60.0), "turns": Throttle(1, 60.0)}

    def poll(self, entries: list[tuple[int, int]],
             timeout_ms: float | None) -> list[tuple[int, int]]:
        try:
            return _poll(entries, timeout_ms)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        return self._over_limit(entries, timeout_ms)

    def _warn(self, kind: str, msg: str) -> None:
        throttle = self.warned[kind]
        held, secs = throttle.roll(time.monotonic())
        if held:
            msg += f" ({held} more times in {secs:.0f} s)"
        if throttle.admit():
            self.log.warning(msg)

    def _over_limit(self, entries: list[tuple[int, int]],
                    timeout_ms: float | None) -> list[tuple[int, int]]:
        n = len(entries)
        soft, hard = linux.nofile_limits()
        if soft < hard:
            linux.set_nofile_soft(hard)
            self._warn("raised", f"the open-file limit (RLIMIT_NOFILE) was lowered to {soft}, below "
                       f"the {n} fds nsnet polls: its soft limit is raised back to the hard "
                       f"limit {hard}")
            if n <= hard:
                try:
                    return _poll(entries, timeout_ms)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
            soft = hard
        self._warn("turns", f"the open-file limit (RLIMIT_NOFILE) is {soft} (hard limit {hard}), "
                   f"below the {n} fds nsnet polls: it polls them in turns, every "
                   f"{TURN_MS} ms, until fds are closed or the limit is raised; {HINT}")
        size = max(1, soft)
        wait = TURN_MS if timeout_ms is None else min(timeout_ms, TURN_MS)
        out: list[tuple[int, int]] = []
        try:
            for i in range(0, n, size):
                out += _poll(entries[i:i + size], 0)
            if out or wait <= 0:
                return out
            return _poll(entries[:size], wait)  # the first: signals, exit-fd, children
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            time.sleep(wait / 1000)  # a limit of 0: nothing can be polled
            return out


def _poll(entries: list[tuple[int, int]], timeout_ms: float | None) -> list[tuple[int, int]]:
    p = select.poll()
    for fd, events in entries:
        p.register(fd, events)
    return p.poll(timeout_ms)
