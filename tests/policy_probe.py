"""Run inside a namespace under an egress policy: try what a program (or a
hostile one) would, and print one JSON line of results.

argv[1] is a JSON list of steps; each step is a list:
  ["tcp", host, port]            connect(); "ok", or the errno name, and the seconds it took
  ["tcp_until_ok", host, port, s] connect until it works (at most s seconds)
  ["tcp_dstopts", host, port]    the same over IPv6 with a destination-options header
  ["udp", host, port, size]      send one datagram (size bytes; fragments above the MTU)
                                 on a connected socket, wait 1 s: "reply", an errno, "timeout"
  ["ping", host]                 one ICMP echo over a raw socket: "reply", "prohibited", ...
  ["syn_flags", host, port, flags]  a raw TCP segment with these flags: "rst", "synack", "none"
  ["rawproto", host, proto]      a raw IP packet of another protocol (nothing can answer)
  ["dns", server, name, qtype, transport]  one query: {"rcode", "addrs"}
  ["spoof_dns", name, addr]      an "answer" from 10.0.2.3:53 sent from inside (to ourselves)
  ["sleep", seconds]
  ["retry_tcp", host, port, n]   n connects in a row: the set of outcomes
  ["pause", file]                print PAUSED, wait until file exists (the test
                                 asks nsnet's API from outside meanwhile)
  ["hold_tcp", host, port, file] an echo before and after file appears
Only the hosts the test gives are ever contacted.
"""
import errno
import json
import os
import random
import socket
import struct
import sys
import time


def err_name(e):
    return errno.errorcode.get(e.errno, str(e)) if getattr(e, "errno", None) else "timeout"


def tcp(host, port, dstopts=False):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    if dstopts:
        # IPV6_DSTOPTS = 59: a destination-options header (PadN) on every packet
        s.setsockopt(socket.IPPROTO_IPV6, 59, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    t = time.monotonic()
    try:
        s.connect((host, port))
        r = "ok"
    except OSError as e:
        r = err_name(e)
    finally:
        s.close()
    return {"result": r, "seconds": round(time.monotonic() - t, 3)}


def udp(host, port, size=16):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.connect((host, port))
    try:
        s.send(b"u" * size)
        s.recv(65535)
        return {"result": "reply"}
    except OSError as e:
        return {"result": err_name(e)}
    finally:
        s.close()


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ping(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(1.5)
    ident = random.randrange(1, 65535)
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"nsnet-probe"
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    s.sendto(body, (host, 0))
    end = time.monotonic() + 1.5
    try:
        while time.monotonic() < end:
            pkt = s.recv(2048)
            ihl = (pkt[0] & 15) * 4
            typ, code = pkt[ihl], pkt[ihl + 1]
            if typ == 0 and struct.unpack("!H", pkt[ihl + 4:ihl + 6])[0] == ident:
                return {"result": "reply"}
            if typ == 3:
                return {"result": "prohibited" if code == 13 else f"unreachable-{code}"}
    except OSError:
        pass
    return {"result": "timeout"}


def src_addr(host):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect((host, 9))
    a = u.getsockname()[0]
    u.close()
    return a


def syn_flags(host, port, flags):
    """A raw TCP segment (flags: SYN=2, PSH=8, URG=32, ECE=64, CWR=128 ...)."""
    src = src_addr(host)
    sport = random.randrange(20000, 60000)
    seq = random.randrange(0, 1 << 32)
    hdr = struct.pack("!HHIIBBHHH", sport, port, seq, 0, 5 << 4, flags, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(host) + struct.pack("!BBH", 0, 6, len(hdr))
    hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.settimeout(1)
    s.sendto(hdr, (host, 0))
    end = time.monotonic() + 1
    try:
        while time.monotonic() < end:
            pkt = s.recv(2048)
            ihl = (pkt[0] & 15) * 4
            sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
            if sp == port and dp == sport:
                fl = pkt[ihl + 13]
                return {"result": "rst" if fl & 4 else "synack" if fl & 0x12 == 0x12 else f"flags-{fl}"}
    except OSError:
        pass
    return {"result": "none"}


def rawproto(host, proto):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    try:
        s.sendto(b"\0" * 32, (host, 0))
        return {"result": "sent"}
    except OSError as e:
        return {"result": err_name(e)}


def dns_query(name, qtype, qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", qtype, 1)


def read_name(msg, off):
    while True:
        n = msg[off]
        if n & 0xC0 == 0xC0:
            return off + 2
        if n == 0:
            return off + 1
        off += 1 + n


def parse_answer(msg):
    rcode = msg[3] & 15
    qd, an = struct.unpack("!HH", msg[4:8])
    off = 12
    for _ in range(qd):
        off = read_name(msg, off) + 4
    addrs = []
    for _ in range(an):
        off = read_name(msg, off)
        typ, _cls, _ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        if typ == 1:
            addrs.append(socket.inet_ntop(socket.AF_INET, msg[off:off + 4]))
        elif typ == 28:
            addrs.append(socket.inet_ntop(socket.AF_INET6, msg[off:off + 16]))
        off += rdlen
    return {"rcode": rcode, "addrs": addrs}


def dns(server, name, qtype="A", transport="udp"):
    qt = {"A": 1, "AAAA": 28}[qtype]
    qid = random.randrange(65536)
    q = dns_query(name, qt, qid)
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    try:
        if transport == "udp":
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(q, (server, 53))
            msg = s.recv(4096)
        else:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(3)
            s.connect((server, 53))
            s.sendall(struct.pack("!H", len(q)) + q)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                chunk = s.recv(4096)
                if not chunk:
                    return {"result": "closed"}
                buf += chunk
            msg = buf[2:]
        s.close()
    except OSError as e:
        return {"result": err_name(e)}
    return dict(parse_answer(msg), result="answer")


def spoof_dns(name, addr):
    """A forged answer "name is addr" from 10.0.2.3:53, sent from inside
    (towards the gateway): nsnet must learn only from libslirp's side."""
    msg = dns_query(name, 1, 4242)
    msg = msg[:2] + b"\x81\x80" + msg[4:6] + b"\0\x01" + msg[8:]
    msg += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 3600, 4) + socket.inet_aton(addr)
    udp_hdr = struct.pack("!HHHH", 53, 40000, 8 + len(msg), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(msg), 1, 0, 64, 17, 0,
                     socket.inet_aton("10.0.2.3"), socket.inet_aton("10.0.2.2"))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(ip + udp_hdr + msg, ("10.0.2.2", 0))
    return {"result": "sent"}


def hold_tcp(host, port, go_file):
    """Connect and echo once; wait until go_file exists (the test changed
    the policy meanwhile); echo again: "ok" or the errno."""
    s = socket.create_connection((host, port), timeout=3)
    s.sendall(b"one")
    first = s.recv(16)
    print("CONNECTED", flush=True)
    end = time.monotonic() + 30
    while not os.path.exists(go_file) and time.monotonic() < end:
        time.sleep(0.02)
    try:
        s.settimeout(3)
        s.sendall(b"two")
        time.sleep(0.2)
        s.sendall(b"three")
        second = s.recv(16)
        r = "ok" if second else "eof"
    except OSError as e:
        r = err_name(e)
    return {"result": r, "first": first.decode()}


def main():
    out = []
    for step in json.loads(sys.argv[1]):
        kind, args = step[0], step[1:]
        if kind == "tcp":
            out.append(tcp(*args))
        elif kind == "tcp_until_ok":
            host, port, secs = args
            end = time.monotonic() + secs
            r = tcp(host, port)
            while r["result"] != "ok" and time.monotonic() < end:
                time.sleep(0.2)
                r = tcp(host, port)
            out.append(r)
        elif kind == "tcp_dstopts":
            out.append(tcp(*args, dstopts=True))
        elif kind == "udp":
            out.append(udp(*args))
        elif kind == "ping":
            out.append(ping(*args))
        elif kind == "syn_flags":
            out.append(syn_flags(*args))
        elif kind == "rawproto":
            out.append(rawproto(*args))
        elif kind == "dns":
            out.append(dns(*args))
        elif kind == "spoof_dns":
            out.append(spoof_dns(*args))
        elif kind == "pause":
            # the test asks nsnet's API from outside (the command may not)
            print("PAUSED", flush=True)
            end = time.monotonic() + 60
            while not os.path.exists(args[0]) and time.monotonic() < end:
                time.sleep(0.02)
            out.append({"result": "resumed"})
        elif kind == "hold_tcp":
            out.append(hold_tcp(*args))
        elif kind == "sleep":
            time.sleep(args[0])
            out.append({"result": "slept"})
        elif kind == "retry_tcp":
            host, port, n = args
            seen = sorted({tcp(host, port)["result"] for _ in range(n)})
            out.append({"result": seen})
        else:
            raise SystemExit(f"unknown step {kind}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
