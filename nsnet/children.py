"""How nsnet starts its child processes: the namespace helpers, the
forwarder, and the fast path's relay and connector.

Each is forked from the single-threaded supervisor (so it may still join a
user namespace), dies with it (PR_SET_PDEATHSIG, and a check that the
parent did not die before the prctl), keeps no fd of the supervisor's but
stdio and the ones it is given, leaves terminal signals to the supervisor
(SIGINT and SIGHUP ignored, SIGTERM default, nothing blocked), and always
leaves through os._exit: it never returns into the supervisor's code.
"""

from __future__ import annotations

import os
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs ~3.5 ms on the path to ready
    from typing import Callable, Iterable

from . import linux


def _close_fds_except(keep: Iterable[int]) -> None:
    lo = 3
    for fd in sorted(set(keep)):
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 1 << 20)  # close_range(2) where available


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def fork_child(name: str, main: Callable[[], int], keep: Iterable[int] = ()) -> int:
    """Fork a child that runs main() and exits with its return value; the
    child keeps only stdio and the fds in `keep`. Returns the child's PID;
    raises OSError if the fork fails."""
    parent = os.getpid()
    keep = tuple(keep)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        linux.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before the prctl
            os._exit(1)
        linux.set_process_name(name)
        _reset_signals()
        _close_fds_except(keep)
        code = main()
    except BrokenPipeError:
        pass  # the supervisor gave up on this child first; it says why
    except BaseException as e:
        try:
            from . import log

            log.get("nsnet").error(f"{name}: {e!r}")
        except BaseException:
            pass
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid  # not reached
