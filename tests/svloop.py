"""Traffic for the supervisor tests (stdlib only).

Imported by tests/test_supervisor.py (echo_once, from the host side) and
run INSIDE test namespaces with /usr/bin/python3 (copied next to
nsclient.py):

  client HOST PORT   one echo attempt every 5 ms, each in its own thread (an
                     attempt lost with a forwarder, waiting for its timeout,
                     does not delay the next); one JSON line per attempt:
                     {"t0", "t1" (CLOCK_MONOTONIC: the test process's clock,
                     there is no time namespace), "ok", "err"}
  echo-server        a threaded TCP echo server on 0.0.0.0 that survives
                     connections lost with a forwarder; prints "READY PORT"

Both run until killed (hard limit 600 s).
"""
import json
import signal
import socket
import sys
import threading
import time

MESSAGE = b"x" * 32


def echo_once(host: str, port: int, timeout: float = 1.0, msg: bytes = MESSAGE) -> bool:
    """Connect, send msg, read it back: True if it came back whole."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(64)
                if not chunk:
                    break
                got += chunk
            return got == msg
    except OSError:
        return False


def client(host: str, port: int) -> None:
    out = threading.Lock()
    slots = threading.BoundedSemaphore(64)

    def attempt():
        t0 = time.monotonic()
        ok = echo_once(host, port)
        with out:
            print(json.dumps({"t0": t0, "t1": time.monotonic(), "ok": ok}), flush=True)
        slots.release()

    while True:
        slots.acquire()
        threading.Thread(target=attempt, daemon=True).start()
        time.sleep(0.005)


def echo_server() -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", 0))
    ls.listen(64)
    print("READY", ls.getsockname()[1], flush=True)

    def serve(c):
        try:
            with c:
                c.settimeout(5)
                while True:
                    d = c.recv(65536)
                    if not d:
                        return
                    c.sendall(d)
        except OSError:
            pass

    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


if __name__ == "__main__":
    signal.alarm(600)
    if sys.argv[1] == "client":
        client(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "echo-server":
        echo_server()
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
