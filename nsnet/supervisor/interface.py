"""get_info "interface": true without blocking the supervisor's loop.

The interface helper (ns/helper.py: start_describe) runs inside the target's
namespaces, where its root can stop it (SIGSTOP) or take it over.  The
supervisor starts it, then waits for its message and its exit in the poll
loop (an I/O source: watch(), deadline(), check(now), finished), with a
deadline; the Future settles with the checked message (proto/helper.py) or
fails with HelperError.  A helper that is late or breaks the protocol is
killed; its pidfd reaps it later, never a blocking wait.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

from ..ns import helper as helper_ns
from ..proto import helper as proto
from ..proto.wire import MAX_MSG, ProtocolError
from .tasks import Future

INTERFACE_TIMEOUT = 10.0


class InterfaceQuery:
    def __init__(self, ns: helper_ns.NsFds, tapname: str,
                 timeout: float = INTERFACE_TIMEOUT) -> None:
        self.future = Future()
        self.deadline_at = time.monotonic() + timeout
        self.pid, self.sock = helper_ns.start_describe(ns, tapname)
        self.sock.setblocking(False)
        self.finished = False
        try:
            self.pidfd: int | None = os.pidfd_open(self.pid)
        except OSError as e:  # out of fds: give up on this one
            self._kill()
            self._reap(0)
            self._close_sock()
            raise helper_ns.HelperError(f"cannot watch the namespace helper: {e.strerror}") from None

    # -- the I/O-source interface of the supervisor's loop ----------------------

    def watch(self) -> list[tuple[int, int, Callable[[int], None]]]:
        out: list[tuple[int, int, Callable[[int], None]]] = []
        if self.sock is not None:
            out.append((self.sock.fileno(), select.POLLIN, self._on_message))
        if self.pidfd is not None:
            out.append((self.pidfd, select.POLLIN, self._on_exit))
        return out

    def deadline(self) -> float | None:
        return None if self.future.done else self.deadline_at

    def check(self, now: float) -> None:
        if not self.future.done and now >= self.deadline_at:
            self._kill()
            self._close_sock()
            self.future.fail(helper_ns.HelperError(
                f"namespace helper did not answer in {INTERFACE_TIMEOUT:g} s (killed)"))

    # -- events -------------------------------------------------------------

    def _on_message(self, _ev: int) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MSG + 1, 1,
                                                       socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        for fd in fds:
            os.close(fd)
        self._close_sock()
        if not data:
            return  # it failed: its exit says how
        # Its one message is all it has to give: the answer does not wait
        # for its exit (the namespace's root could stop it there), and it
        # is killed now; its pidfd reaps it.
        self._kill()
        try:
            msg = proto.parse_interface(data, len(fds))
        except ProtocolError as e:
            self.future.fail(helper_ns.HelperError(f"namespace helper: protocol error: {e}"))
            return
        if "error" in msg:
            self.future.fail(helper_ns.HelperError(msg["error"]))
        else:
            self.future.resolve(msg)

    def _on_exit(self, _ev: int) -> None:
        status = self._reap(0)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self._close_sock()
        self.finished = True
        if not self.future.done:  # it exited without a message
            self.future.fail(helper_ns.HelperError(f"namespace helper failed({status})"))

    # -- helpers --------------------------------------------------------------

    def _kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap(self, flags: int) -> int:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            return -1
        return os.waitstatus_to_exitcode(status) if pid else -1

    def _close_sock(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None  # type: ignore[assignment]

    def close(self) -> None:
        """Teardown: kill and reap (SIGKILL: bounded)."""
        self._close_sock()
        if self.pidfd is not None:
            self._kill()
            select.select([self.pidfd], [], [], 5.0)
            self._reap(os.WNOHANG)
            os.close(self.pidfd)
            self.pidfd = None
        self.finished = True
        if not self.future.done:
            self.future.fail(helper_ns.HelperError("nsnet is stopping"))
