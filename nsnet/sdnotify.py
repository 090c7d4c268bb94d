"""sd_notify(3) for service managers: READY=1, STATUS=, STOPPING=1 and
WATCHDOG=1 pings, sent as datagrams to $NOTIFY_SOCKET when it is set.

As sd_notify(unset_environment=1) does, the variables are removed from the
environment once read, so nothing nsnet starts (the forwarder, `nsnet run`'s
command) talks to the service manager in nsnet's name.
"""

from __future__ import annotations

import os
import socket

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, unset: bool = True) -> "Notifier":
        env = {k: os.environ.get(k) for k in ENV_VARS}
        if unset:
            for k in ENV_VARS:
                os.environ.pop(k, None)
        addr = env["NOTIFY_SOCKET"] or None
        if addr and not (addr.startswith("/") or addr.startswith("@")):
            addr = None  # only Unix sockets are supported (no vsock)
        wd: int | None = None
        raw = env["WATCHDOG_USEC"]
        wpid = env["WATCHDOG_PID"]
        if raw and raw.isdigit() and int(raw) > 0 and (not wpid or wpid == str(os.getpid())):
            wd = int(raw)
        return cls(addr, wd)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the manager's timeout."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, state: str) -> bool:
        """Send one datagram; False if there is no socket or it failed
        (a service manager that went away must not stop the network)."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(state.encode(), addr)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
