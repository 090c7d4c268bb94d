"""sd_notify(3) for service managers: READY=1, STATUS=, STOPPING=1 and
WATCHDOG=1 pings, sent as datagrams to $NOTIFY_SOCKET when it is set."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls) -> "Notifier":
        addr = os.environ.get("NOTIFY_SOCKET") or None
        if addr and not (addr.startswith("/") or addr.startswith("@")):
            addr = None  # only Unix sockets are supported (no vsock)
        wd: int | None = None
        raw = os.environ.get("WATCHDOG_USEC")
        wpid = os.environ.get("WATCHDOG_PID")
        if raw and raw.isdigit() and int(raw) > 0 and (not wpid or wpid == str(os.getpid())):
            wd = int(raw)
        return cls(addr, wd)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the manager's timeout."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, state: str) -> bool:
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(state.encode(), addr)
            return True
        except OSError:
            return False
