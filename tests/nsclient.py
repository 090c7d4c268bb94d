"""Helper run INSIDE a test network namespace (stdlib only, /usr/bin/python3).

Client modes print one JSON line with the result; server modes print
"READY <port>" once listening, then one JSON line when done.  Every mode is
bounded in time (socket timeouts plus a hard alarm) and in count.

  tcp-send HOST PORT NBYTES      send NBYTES random bytes, half-close, read the reply
  tcp-echo HOST PORT NBYTES      send NBYTES, expect them echoed back (and report
                                 the connection's snd_mss and rcv_mss)
  udp-echo HOST PORT COUNT SIZE  COUNT datagrams of SIZE bytes, each echoed back
  connect HOST PORT              try a TCP connect: {"ok": bool, "error": str}
  tcp-serve ADDR PORT MODE N     accept N connections; MODE sink|echo|source:NBYTES
  udp-serve ADDR PORT N          echo N datagrams
"""
import hashlib
import json
import os
import signal
import socket
import sys
import threading

HARD_LIMIT_S = 120
IO_TIMEOUT_S = 30


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def emit(obj):
    print(json.dumps(obj), flush=True)


def recv_all(sock):
    h = hashlib.sha256()
    n = 0
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return n, h.hexdigest()
        n += len(data)
        h.update(data)


def tcp_mss(sock):
    """(tcpi_snd_mss, tcpi_rcv_mss) of a TCP socket: the segment size this
    end sends, and the largest it has seen from its peer."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[16:20], sys.byteorder), int.from_bytes(info[20:24], sys.byteorder)


def tcp_send(host, port, nbytes):
    data = os.urandom(int(nbytes))
    with socket.create_connection((host, int(port)), timeout=IO_TIMEOUT_S) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    emit({"sent": len(data), "sha256": hashlib.sha256(data).hexdigest(),
          "reply": reply.decode(errors="replace")})


def tcp_echo(host, port, nbytes):
    data = os.urandom(int(nbytes))
    with socket.create_connection((host, int(port)), timeout=IO_TIMEOUT_S) as s:
        def writer():
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        n, digest = recv_all(s)
        t.join(IO_TIMEOUT_S)
        snd_mss, rcv_mss = tcp_mss(s)
    emit({"sent": len(data), "sha_sent": hashlib.sha256(data).hexdigest(),
          "received": n, "sha_received": digest, "snd_mss": snd_mss, "rcv_mss": rcv_mss})


def udp_roundtrips(s, host, port, count, size):
    """Send count random datagrams on s, each up to 5 times until echoed;
    return how many came back intact."""
    ok = 0
    s.settimeout(2)
    for _ in range(int(count)):
        data = os.urandom(int(size))
        for _attempt in range(5):
            s.sendto(data, (host, int(port)))
            try:
                reply, _ = s.recvfrom(65535)
            except socket.timeout:
                continue
            if reply == data:
                ok += 1
                break
    return ok


def udp_echo(host, port, count, size):
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as s:
        ok = udp_roundtrips(s, host, port, count, size)
    emit({"sent": int(count), "echoed": ok})


def connect(host, port):
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"x")
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
        emit({"ok": True, "error": ""})
    except OSError as e:
        emit({"ok": False, "error": f"{type(e).__name__}: {e}"})


def tcp_serve(addr, port, mode, count):
    with socket.socket(family_of(addr), socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in addr:
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind((addr, int(port)))
        ls.listen(8)
        print(f"READY {ls.getsockname()[1]}", flush=True)
        ls.settimeout(IO_TIMEOUT_S * 2)
        results = []
        for _ in range(int(count)):
            conn, peer = ls.accept()
            with conn:
                conn.settimeout(IO_TIMEOUT_S)
                if mode == "sink":
                    n, digest = recv_all(conn)
                    conn.sendall(f"{n} {digest}\n".encode())
                    results.append({"received": n, "sha256": digest, "peer": peer[0]})
                elif mode == "echo":
                    n = 0
                    while True:
                        data = conn.recv(1 << 16)
                        if not data:
                            break
                        n += len(data)
                        conn.sendall(data)
                    results.append({"echoed": n, "peer": peer[0]})
                elif mode.startswith("source:"):
                    data = os.urandom(int(mode.split(":", 1)[1]))
                    conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
                    results.append({"sent": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest(),
                                    "peer": peer[0]})
                else:
                    raise SystemExit(f"unknown mode {mode}")
    emit({"connections": results})


def udp_serve(addr, port, count):
    with socket.socket(family_of(addr), socket.SOCK_DGRAM) as s:
        if ":" in addr:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((addr, int(port)))
        print(f"READY {s.getsockname()[1]}", flush=True)
        s.settimeout(IO_TIMEOUT_S * 2)
        peers = []
        for _ in range(int(count)):
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)
            peers.append(peer[0])
    emit({"peers": peers})


MODES = {
    "tcp-send": tcp_send,
    "tcp-echo": tcp_echo,
    "udp-echo": udp_echo,
    "connect": connect,
    "tcp-serve": tcp_serve,
    "udp-serve": udp_serve,
}


def main(argv):
    if len(argv) < 2 or argv[1] not in MODES:
        raise SystemExit(__doc__)
    signal.alarm(HARD_LIMIT_S)
    MODES[argv[1]](*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
