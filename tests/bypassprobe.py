"""Runs inside `nsnet run --bypass` (tests/test_bypass.py): one scenario per
call, one JSON line on stdout.  Only the addresses it is given."""
import asyncio
import errno
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time


def out(**kw):
    print(json.dumps(kw), flush=True)


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def echo_once(s, msg=b"ping"):
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        d = s.recv(65536)
        if not d:
            break
        got += d
    return got == msg


def blocking(host, port):
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rc = s.connect_ex((host, port))
    r = dict(rc=rc, peer=list(s.getpeername()[:2]), local=list(s.getsockname()[:2]),
             nodelay=s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
             cloexec=not os.get_inheritable(s.fileno()), echo=echo_once(s))
    s.close()
    return r


def nonblocking(host, port):
    s = socket.socket(fam(host), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    rc = s.connect_ex((host, port))
    _, w, _ = select.select([], [s], [], 10)
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    again = s.connect_ex((host, port))
    s.setblocking(True)
    r = dict(rc=rc, writable=bool(w), so_error=err, again=again,
             peer=list(s.getpeername()[:2]), echo=echo_once(s))
    s.close()
    return r


def refused(host, port):
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    rc = s.connect_ex((host, port))
    s.close()
    s = socket.socket(fam(host), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    rc2 = s.connect_ex((host, port))
    if rc2 == errno.EINPROGRESS:
        select.select([], [s], [], 10)
        rc2 = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    s.close()
    return dict(blocking=rc, nonblocking=rc2)


def timeout(host, port):
    """The host listener's accept queue is full: connects hang."""
    t0 = time.monotonic()
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    s.settimeout(1.0)  # Python: non-blocking fd + poll
    try:
        s.connect((host, port))
        r1 = "connected"
    except socket.timeout:
        r1 = "timeout"
    except OSError as e:
        r1 = errno.errorcode.get(e.errno, str(e))
    s.close()
    # a blocking fd with SO_SNDTIMEO: connect says EINPROGRESS at the deadline
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, (1).to_bytes(8, "little") + bytes(8))
    rc = s.connect_ex((host, port))
    s.close()
    return dict(py_timeout=r1, sndtimeo=errno.errorcode.get(rc, rc),
                seconds=round(time.monotonic() - t0, 2))


def interrupted(host, port):
    """A blocking connect that hangs (the host listener's queue is full),
    interrupted by SIGALRM whose handler raises: connect gives up at once,
    the process goes on (never a hang), a later connect works normally."""
    import signal

    class Alarm(Exception):
        pass

    def on_alarm(signo, frame):
        raise Alarm()
    signal.signal(signal.SIGALRM, on_alarm)
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        s.connect((host, port))
        what = "connected"
    except Alarm:
        what = "interrupted"
    signal.setitimer(signal.ITIMER_REAL, 0)
    secs = time.monotonic() - t0
    s.close()
    time.sleep(1.5)  # the handler notices the abandoned call within 1 s
    return dict(what=what, seconds=round(secs, 2))


async def _aio(host, port, n):
    async def one(i):
        r, w = await asyncio.open_connection(host, port)
        msg = f"hello {i}".encode()
        w.write(msg)
        await w.drain()
        got = await r.readexactly(len(msg))
        w.close()
        await w.wait_closed()
        return got == msg
    return await asyncio.gather(*(one(i) for i in range(n)))


def aio(host, port, n=20):
    res = asyncio.run(_aio(host, port, n))
    return dict(good=sum(res), n=n)


def threads(host, port, n=8, each=25):
    ok = []
    errs = []

    def work():
        for _ in range(each):
            try:
                with socket.create_connection((host, port), timeout=10) as s:
                    ok.append(echo_once(s))
            except OSError as e:
                errs.append(str(e))
    ts = [threading.Thread(target=work) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return dict(good=sum(ok), n=n * each, errors=errs[:3])


def forkexec(host, port):
    s = socket.create_connection((host, port), timeout=10)
    code = ("import socket,sys; s=socket.socket(fileno=int(sys.argv[1])); "
            "s.sendall(b'from-child'); print(s.getpeername()[0])")
    cp = subprocess.run([sys.executable, "-c", code, str(s.fileno())], pass_fds=[s.fileno()],
                        capture_output=True, text=True, timeout=30)
    got = b""
    s.settimeout(10)
    while len(got) < 10:
        d = s.recv(100)
        if not d:
            break
        got += d
    pid = os.fork()
    if pid == 0:
        os._exit(0 if echo_once(s, b"from-fork") else 1)
    _, st = os.waitpid(pid, 0)
    s.close()
    return dict(child_peer=cp.stdout.strip(), child_rc=cp.returncode, echoed=got.decode(),
                fork_ok=os.waitstatus_to_exitcode(st) == 0)


def flags(host, port):
    """The command's fd flags survive the swap, also when the same fd number
    comes back with other flags, and for fd numbers the handler's fdinfo
    cache keeps in one place (fd % 4): close-on-exec and O_NONBLOCK."""
    def one(s, cloexec, nonblock):
        os.set_inheritable(s.fileno(), not cloexec)
        s.setblocking(not nonblock)
        rc = s.connect_ex((host, port))
        if nonblock:
            select.select([], [s], [], 10)
            rc = rc if rc != errno.EINPROGRESS else s.getsockopt(socket.SOL_SOCKET,
                                                                  socket.SO_ERROR)
        got = dict(fd=s.fileno(), rc=rc, cloexec=not os.get_inheritable(s.fileno()),
                   nonblock=not os.get_blocking(s.fileno()))
        s.setblocking(True)
        got["echo"] = echo_once(s)
        return got, dict(cloexec=cloexec, nonblock=nonblock)

    seen, bad = [], []
    # one fd number, again and again, with the flags changing
    for cl, nb in [(True, False), (False, False), (True, True), (False, True), (True, False),
                   (False, True)]:
        s = socket.socket(fam(host), socket.SOCK_STREAM)
        got, want = one(s, cl, nb)
        s.close()
        seen.append(got)
        if got["rc"] or not got["echo"] or any(got[k] != v for k, v in want.items()):
            bad.append((got, want))
    # two live fds that share a cache place (fd % 4), opposite flags
    a = socket.socket(fam(host), socket.SOCK_STREAM)
    got, want = one(a, True, False)
    seen.append(got)
    if got["rc"] or any(got[k] != v for k, v in want.items()):
        bad.append((got, want))
    pad = []
    b = socket.socket(fam(host), socket.SOCK_STREAM)
    while b.fileno() % 4 != a.fileno() % 4:
        pad.append(b)
        b = socket.socket(fam(host), socket.SOCK_STREAM)
    got, want = one(b, False, True)
    seen.append(got)
    if got["rc"] or any(got[k] != v for k, v in want.items()):
        bad.append((got, want))
    for x in [a, b, *pad]:
        x.close()
    return dict(same_fd=len({g["fd"] for g in seen[:6]}) == 1, bad=bad, n=len(seen))


def many(host, port, n):
    def nfds():
        return len(os.listdir("/proc/self/fd"))
    before = nfds()
    ok = 0
    for _ in range(n):
        with socket.create_connection((host, port), timeout=10) as s:
            ok += echo_once(s, b"x")
    return dict(good=ok, n=n, fds_before=before, fds_after=nfds())


def transfer(host, port, nbytes):
    """Send nbytes to an echo server while reading the echo: sha256 both ways."""
    s = socket.create_connection((host, port), timeout=60)
    hs, hr = hashlib.sha256(), hashlib.sha256()
    got = [0]

    def reader():
        while True:
            d = s.recv(1 << 20)
            if not d:
                return
            hr.update(d)
            got[0] += len(d)
    t = threading.Thread(target=reader)
    t.start()
    block = os.urandom(1 << 20)
    sent = 0
    t0 = time.monotonic()
    while sent < nbytes:
        chunk = block[: min(len(block), nbytes - sent)]
        # vary the content so that a misordered block changes the digest
        chunk = sent.to_bytes(8, "little") + chunk[8:]
        hs.update(chunk)
        s.sendall(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    t.join(600)
    s.close()
    secs = time.monotonic() - t0
    return dict(sent=sent, received=got[0], sha_sent=hs.hexdigest(), sha_received=hr.hexdigest(),
                gbit=round(sent * 8 / secs / 1e9, 2))


def fallback(host, port, inner_port):
    """Connections the bypass must leave alone."""
    r = {}
    # TCP inside the namespace (its own loopback)
    srv = socket.socket()
    srv.bind(("127.0.0.1", inner_port))
    srv.listen(4)
    c = socket.create_connection(("127.0.0.1", inner_port), timeout=10)
    a, _ = srv.accept()
    r["inner_peer"] = list(c.getpeername())
    r["inner_local"] = list(c.getsockname())
    c.close(), a.close(), srv.close()
    # bound to the namespace's own address first: libslirp's path
    s = socket.socket()
    s.bind(("10.0.2.100", 0))
    s.settimeout(10)
    s.connect((host, port))
    r["bound_echo"] = echo_once(s)
    r["bound_local"] = s.getsockname()[0]
    s.close()
    # UDP connect to the gateway
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect((host, port))
    r["udp_peer"] = list(u.getpeername())
    u.close()
    # AF_UNIX
    x, y = socket.socketpair()
    x.sendall(b"u")
    r["unix"] = y.recv(1) == b"u"
    x.close(), y.close()
    return r


def reconnect(host, port, other_port, other_host="198.51.100.1"):
    """The hostile command's move: disconnect a bypassed (host) socket with
    AF_UNSPEC, then connect it somewhere the network refuses."""
    import ctypes
    import struct
    libc = ctypes.CDLL(None, use_errno=True)
    s = socket.create_connection((host, port), timeout=10)
    bound = s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0").decode()
    unspec = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)
    rc = libc.connect(s.fileno(), unspec, len(unspec))
    e1 = ctypes.get_errno() if rc < 0 else 0
    s.settimeout(5)
    e2 = s.connect_ex((other_host, other_port))
    s.close()
    return dict(bound=bound, unspec=e1, reconnect=errno.errorcode.get(e2, e2))


def main():
    argv = sys.argv[1:]
    wait = False
    if argv and argv[0] == "--wait":
        wait = True  # for the test to read nsnet's counters from outside
        argv.pop(0)
    what, host, port, *rest = argv
    port = int(port)
    fn = globals()[what]
    try:
        r = fn(host, port, *(int(x) if x.isdigit() else x for x in rest))
        r["ok"] = True
    except Exception as e:  # reported, the test decides
        r = dict(ok=False, error=f"{type(e).__name__}: {e}")
    out(**r)
    if wait:  # the API refuses this namespace: the test asks, then closes stdin
        sys.stdin.read()


if __name__ == "__main__":
    main()
