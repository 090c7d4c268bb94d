"""`nsnet run`'s PID namespace: COMMAND's own, behind an init of nsnet's.

The child nsnet run forks unshares a PID namespace with its user, network
and mount namespaces, so that COMMAND can neither see nor signal nsnet's
processes (kill() and pidfd_open() name PIDs of the caller's namespace, and
COMMAND's /proc is a fresh one), and so that nothing COMMAND started
outlives it (when a PID namespace's init exits, the kernel kills the rest).

  nsnet (supervisor)
   `- child: unshare(USER|NET|NS|PID), the set-up's first steps, then
      fork: it stays outside the new namespace as the *waiter* (no longer
      dumpable, nothing open, it mirrors the init's exit status)
       `- init (PID 1 inside; its host PID is the supervisor's target):
          mounts a fresh /proc, finishes the set-up, and forks
           `- COMMAND (PID 2)

PID 1 has kernel semantics of its own: a signal it has no handler for is
dropped, orphans are re-parented to it.  The init therefore blocks the
signals nsnet forwards and SIGCHLD and reads them from a signalfd: it
forwards the first to COMMAND as nsnet itself does (not those the terminal
sent to COMMAND's process group too, not those COMMAND sent), reaps every
child, and exits with COMMAND's status when COMMAND ends (128+N when
killed by signal N: a PID 1 cannot re-raise a signal on itself, and nsnet
run reports 128+N either way).
"""

from __future__ import annotations

import os
import select
import signal
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, NoReturn

SI_KERNEL = 0x80
SIGINFO_SIZE = 128  # struct signalfd_siginfo


def should_forward(code: int, sender: int, cmd: int) -> bool:
    """Whether a signal this process got (si_code, si_pid) goes on to cmd,
    as sudo(8) decides: not one the terminal sent to cmd's process group
    too, not one cmd (or its process group, when that is not ours) sent."""
    try:
        cmd_pgrp = os.getpgid(cmd)
    except ProcessLookupError:
        return False
    if code == SI_KERNEL:
        # From the terminal, to the foreground process group: cmd got it
        # too unless it moved to a group of its own.
        return cmd_pgrp != os.getpgrp()
    if sender == cmd:
        return False  # cmd signalling us: not back to itself
    try:
        if sender and os.getpgid(sender) == cmd_pgrp != os.getpgrp():
            return False  # from cmd's own process group (e.g. its shell jobs)
    except ProcessLookupError:
        pass
    return True


def read_signals(sigfd: int) -> list[tuple[int, int, int]]:
    """(signo, si_code, si_pid) of every signal queued on a signalfd."""
    out = []
    while True:
        try:
            data = os.read(sigfd, SIGINFO_SIZE * 16)
        except (BlockingIOError, InterruptedError):
            break
        if not data:
            break
        for off in range(0, len(data) - SIGINFO_SIZE + 1, SIGINFO_SIZE):
            signo, _errno, code, pid = struct.unpack_from("=IiiI", data, off)
            out.append((signo, code, pid))
    return out


def exit_like(status: int) -> NoReturn:
    """Exit as a child with wait status `status` did: the same code, or
    the same signal raised again (outside a PID namespace's init)."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    sig = -code
    if os.getpid() != 1 and sig not in (signal.SIGSTOP, signal.SIGTSTP):
        try:
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
    os._exit(128 + sig)


def waiter(init_pid: int) -> NoReturn:
    """The child after it forked the init: outside the new PID namespace,
    inside the target's user namespace.  It holds nothing and is made
    non-dumpable (its memory came from nsnet's, so the namespace's root has
    no ptrace right on it), waits for the init and exits as it did."""
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, _max_fd())
    _undumpable()
    while True:
        try:
            _, status = os.waitpid(init_pid, 0)
        except ChildProcessError:
            os._exit(1)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            exit_like(status)


def _undumpable() -> None:
    """PR_SET_DUMPABLE 0.  This process's memory came from nsnet's (no
    exec), so the kernel then asks for CAP_SYS_PTRACE over the host's user
    namespace: the namespace's root (COMMAND) cannot ptrace it, pidfd_getfd
    its fds or read its /proc/PID/{mem,environ,...} (tests/test_ns_attack.py)."""
    try:
        from . import linux

        linux.set_undumpable()
    except OSError:
        pass


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536


def init(forwarded: tuple[int, ...], start_command: Callable[[], int],
         signalfd: Callable[[tuple[int, ...]], int]) -> NoReturn:
    """PID 1 of COMMAND's namespace: start COMMAND (start_command forks it
    and returns its PID), forward `forwarded` signals to it, reap, exit with
    its status."""
    _undumpable()  # COMMAND (root of its namespace) must not take over PID 1
    signals = (*forwarded, signal.SIGCHLD)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    sigfd = signalfd(signals)
    cmd = start_command()
    status = None
    while status is None:
        try:
            select.select([sigfd], [], [])
        except InterruptedError:
            continue
        for signo, code, sender in read_signals(sigfd):
            if signo == signal.SIGCHLD:
                continue
            if should_forward(code, sender, cmd):
                try:
                    os.kill(cmd, signo)
                except ProcessLookupError:
                    pass
        while True:  # reap COMMAND and every orphan re-parented here
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == cmd:
                status = st
    exit_like(status)
