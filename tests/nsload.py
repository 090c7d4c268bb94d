"""Many concurrent TCP connections, one process, no threads (stdlib only).
Run inside a test namespace (like nsclient.py) or on the host side.

  client HOST PORT N NBYTES [INFLIGHT [HOLD]]
      open N connections to HOST:PORT, at most INFLIGHT (default 64)
      connecting at a time, and keep every one open until all N are
      established (and HOLD more seconds, default 0); then send NBYTES of distinct random data on each, read
      the echo, check it byte for byte, close.  Prints
      {"established", "peak_open", "verified", "failed", "bytes", "seconds"}.
  udp HOST PORT COUNT SIZE SRCPORT
      COUNT datagrams of SIZE bytes from the fixed local port SRCPORT (so
      repeated runs are one flow, not a new one each time), each echoed
      back (5 tries each); prints {"sent", "echoed"}.
  serve ADDR PORT N [HARD_LIMIT_S]
      echo server for N connections (all may be open at once); prints
      "READY <port>", then {"served", "peak_open", "bytes"} when N are done.

Bounded in time: every wait has a deadline, and a hard alarm.
"""
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time

HARD_LIMIT_S = 600
STALL_S = 120  # no progress for this long: give up


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Conn:
    __slots__ = ("sock", "out", "sent", "got", "state")

    def __init__(self, sock, data):
        self.sock = sock
        self.out = data
        self.sent = 0
        self.got = bytearray()
        self.state = "connecting"


def client(host, port, n, nbytes, inflight=64, hold=0):
    n, nbytes, inflight, hold = int(n), int(nbytes), int(inflight), float(hold)
    raise_nofile()
    sel = selectors.DefaultSelector()
    conns = []
    pending = 0
    started = 0
    established = 0
    failed = 0
    retries = 0
    t0 = time.monotonic()
    last_progress = t0

    def start_one():
        nonlocal started, pending
        s = socket.socket(family_of(host), socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((host, int(port)))
        if err not in (0, 115):  # EINPROGRESS
            s.close()
            raise OSError(err, os.strerror(err))
        c = Conn(s, os.urandom(nbytes))
        conns.append(c)
        sel.register(s, selectors.EVENT_WRITE, c)
        started += 1
        pending += 1

    # Phase 1: establish all N, at most `inflight` connecting at a time.
    while established + failed < n:
        while started - retries < n and pending < inflight:
            start_one()
        for key, _ in sel.select(timeout=1.0):
            c = key.data
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            sel.unregister(c.sock)
            pending -= 1
            if err:
                # refused or reset under load: try again with a new socket
                c.sock.close()
                c.state = "retry"
                retries += 1
                if retries > n:
                    failed += 1
                continue
            c.state = "open"
            established += 1
            last_progress = time.monotonic()
        if time.monotonic() - last_progress > STALL_S:
            break
    conns = [c for c in conns if c.state == "open"]
    peak_open = len(conns)
    time.sleep(hold)  # all open at once: let observers see it
    # Phase 2: every connection is open; exchange data on all of them.
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    done = 0
    verified = 0
    last_progress = time.monotonic()
    while done < len(conns) and time.monotonic() - last_progress < STALL_S:
        for key, ev in sel.select(timeout=1.0):
            c = key.data
            if ev & selectors.EVENT_WRITE and c.sent < len(c.out):
                try:
                    c.sent += c.sock.send(c.out[c.sent:c.sent + 65536])
                except BlockingIOError:
                    pass
                if c.sent == len(c.out):
                    c.sock.shutdown(socket.SHUT_WR)
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                last_progress = time.monotonic()
            if ev & selectors.EVENT_READ:
                try:
                    chunk = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                last_progress = time.monotonic()
                if chunk:
                    c.got += chunk
                    continue
                sel.unregister(c.sock)
                c.sock.close()
                done += 1
                if bytes(c.got) == c.out:
                    verified += 1
    for c in conns:
        try:
            c.sock.close()
        except OSError:
            pass
    print(json.dumps({"established": established, "peak_open": peak_open,
                      "verified": verified, "failed": n - verified, "retries": retries,
                      "bytes": verified * nbytes,
                      "seconds": round(time.monotonic() - t0, 2)}), flush=True)


class Echo:
    __slots__ = ("sock", "buf", "eof")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.eof = False


def serve(addr, port, n, hard_limit=HARD_LIMIT_S):
    n = int(n)
    signal.alarm(int(hard_limit))
    raise_nofile()
    ls = socket.socket(family_of(addr), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, int(port)))
    ls.listen(4096)
    ls.setblocking(False)
    print(f"READY {ls.getsockname()[1]}", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    served = accepted = open_now = peak = total = 0
    last_progress = time.monotonic()
    while served < n and time.monotonic() - last_progress < STALL_S:
        for key, ev in sel.select(timeout=1.0):
            last_progress = time.monotonic()
            if key.data is None:
                while accepted < n:
                    try:
                        s, _ = ls.accept()
                    except BlockingIOError:
                        break
                    s.setblocking(False)
                    accepted += 1
                    open_now += 1
                    peak = max(peak, open_now)
                    sel.register(s, selectors.EVENT_READ, Echo(s))
                continue
            e = key.data
            if ev & selectors.EVENT_READ and not e.eof:
                try:
                    chunk = e.sock.recv(65536)
                except BlockingIOError:
                    chunk = None
                except OSError:
                    chunk = b""
                if chunk:
                    e.buf += chunk
                    total += len(chunk)
                elif chunk == b"":
                    e.eof = True
            if ev & selectors.EVENT_WRITE and e.buf:
                try:
                    del e.buf[:e.sock.send(e.buf[:65536])]
                except BlockingIOError:
                    pass
                except OSError:
                    e.buf.clear()
                    e.eof = True
            if e.eof and not e.buf:
                sel.unregister(e.sock)
                e.sock.close()
                open_now -= 1
                served += 1
                continue
            want = (0 if e.eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if e.buf else 0)
            sel.modify(e.sock, want, e)
    print(json.dumps({"served": served, "peak_open": peak, "bytes": total}), flush=True)


def udp(host, port, count, size, srcport):
    from nsclient import udp_roundtrips  # installed beside this script

    with socket.socket(family_of(host), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", int(srcport)))
        ok = udp_roundtrips(s, host, port, count, size)
    print(json.dumps({"sent": int(count), "echoed": ok}), flush=True)


def main(argv):
    signal.alarm(HARD_LIMIT_S)
    if len(argv) >= 2 and argv[1] == "udp":
        udp(*argv[2:])
    elif len(argv) >= 2 and argv[1] == "client":
        client(*argv[2:])
    elif len(argv) >= 2 and argv[1] == "serve":
        serve(*argv[2:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
