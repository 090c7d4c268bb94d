"""Hostile-frame writer, run INSIDE a test namespace as its root (stdlib only).

    framefuzz.py IFACE SEED SECONDS [--max N] [--watch PID] [--dump FILE]

Writes a seeded stream of random and malformed Ethernet frames on IFACE
through a raw AF_PACKET socket, for at most SECONDS (and at most N
frames): truncated headers, bad lengths, bad checksums, IPv4 fragments
(overlapping, out of range, the offset-47920 UDP fragment that kills
slirp4netns 1.2.0), odd IP and TCP options, ARP, IPv6 with extension
headers and NDP options, ICMP, ICMPv6, UDP, TCP and DHCP.  The same SEED
gives the same stream.

Destination addresses are always rewritten to the slirp network's own
addresses (10.0.2.2 = host loopback, 10.0.2.100, broadcasts, fd00::2,
link-local multicast) and never 10.0.2.3 (DNS): nothing can be aimed
outside the test's isolated namespace.

--watch PID: after each frame, check that PID is still alive (a zombie
counts as dead); stop at the first frame after which it is not, and
report that frame's index, kind and bytes (hex).  Slow: for finding a
crashing frame.
--dump FILE: write every frame sent as "index kind hex" lines.

Prints one JSON line: {"sent", "errors", "kinds", "seconds", ...}.
"""
import json
import random
import signal
import socket
import struct
import sys
import time

HARD_LIMIT_S = 900
ETH_P_ALL = 0x0003

GW_MAC = bytes.fromhex("52550a000202")  # libslirp: 52:55 + the gateway address
BCAST_MAC = b"\xff" * 6
V4_DST = ["10.0.2.2", "10.0.2.2", "10.0.2.2", "10.0.2.100", "10.0.2.255",
          "255.255.255.255", "10.0.2.15"]
V4_SRC = ["10.0.2.100", "10.0.2.100", "0.0.0.0", "10.0.2.2", "10.0.2.200", "127.0.0.1"]
V6_DST = ["fd00::2", "fd00::2", "ff02::1", "ff02::2", "fe80::2", "fd00::100"]
V6_SRC = ["fd00::100", "fe80::1", "::", "fd00::2"]
FORBIDDEN_V4 = {"10.0.2.3"}
FORBIDDEN_V6 = {"fd00::3"}


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Gen:
    def __init__(self, seed: int, src_mac: bytes, gw_mac: bytes):
        self.r = random.Random(seed)
        self.src_mac = src_mac
        self.gw_mac = gw_mac

    # -- helpers -----------------------------------------------------------
    def rbytes(self, n: int) -> bytes:
        return bytes(self.r.getrandbits(8) for _ in range(max(0, n)))

    def maybe(self, p: float) -> bool:
        return self.r.random() < p

    def small_len(self, hi: int = 64) -> int:
        return self.r.choice([0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 19, 20, 21, 39, 40, 41,
                              self.r.randrange(0, hi + 1)])

    def eth(self, ethertype: int, payload: bytes, dst: bytes | None = None) -> bytes:
        dst = dst or (BCAST_MAC if self.maybe(0.2) else self.gw_mac)
        return dst + self.src_mac + struct.pack("!H", ethertype) + payload

    def truncate(self, frame: bytes) -> bytes:
        if self.maybe(0.25) and len(frame) > 1:
            return frame[: self.r.randrange(0, len(frame))]
        return frame

    def addr4(self, pool) -> bytes:
        return socket.inet_aton(self.r.choice(pool))

    # -- IPv4 --------------------------------------------------------------
    def ipv4(self, proto: int, payload: bytes, *, frag: int | None = None,
             opts: bytes | None = None, dst: bytes | None = None) -> bytes:
        if opts is None:
            opts = b""
            if self.maybe(0.15):
                opts = self.ip_options()
        opts = opts[:40]
        opts += b"\0" * (-len(opts) % 4)
        ihl = 5 + len(opts) // 4
        if self.maybe(0.08):
            ihl = self.r.randrange(0, 16)
        tot = 20 + len(opts) + len(payload)
        if self.maybe(0.15):
            tot = self.r.choice([0, 1, 19, 20, tot - 1, tot + 1, tot + 100, 65535,
                                 self.r.randrange(0, 65536)]) & 0xFFFF
        if frag is None:
            frag = 0x4000 if self.maybe(0.5) else 0
            if self.maybe(0.1):
                frag = self.r.getrandbits(16)
        ver = 4 if not self.maybe(0.03) else self.r.randrange(16)
        hdr = struct.pack("!BBHHHBBH4s4s", (ver << 4) | ihl, self.r.getrandbits(8) if
                          self.maybe(0.1) else 0, tot, self.r.getrandbits(16), frag,
                          self.r.choice([64, 1, 0, 255]), proto, 0,
                          self.addr4(V4_SRC), dst or self.addr4(V4_DST))
        hdr += opts
        c = csum(hdr)
        if self.maybe(0.05):
            c ^= 0x1234
        hdr = hdr[:10] + struct.pack("!H", c) + hdr[12:]
        return self.eth(0x0800, hdr + payload)

    def ip_options(self) -> bytes:
        out = b""
        for _ in range(self.r.randrange(1, 4)):
            kind = self.r.choice([0, 1, 7, 68, 130, 131, 137, 148, self.r.getrandbits(8)])
            if kind in (0, 1):
                out += bytes([kind])
                continue
            ln = self.r.choice([0, 1, 2, 3, 4, 11, 39, 40, 255, self.r.getrandbits(8)])
            ptr = self.r.choice([0, 4, 5, 40, 255])
            out += bytes([kind, ln, ptr]) + self.rbytes(self.r.randrange(0, 12))
        return out

    def tcp(self, v6: bool = False) -> bytes:
        opts = b""
        if self.maybe(0.5):
            for _ in range(self.r.randrange(1, 5)):
                kind = self.r.choice([0, 1, 2, 3, 4, 5, 8, 30, 34, self.r.getrandbits(8)])
                if kind in (0, 1):
                    opts += bytes([kind])
                else:
                    ln = self.r.choice([0, 1, 2, 3, 4, 10, 40, 255, self.r.getrandbits(8)])
                    opts += bytes([kind, ln]) + self.rbytes(self.r.randrange(0, 10))
        opts = opts[:40]
        opts += b"\0" * (-len(opts) % 4)
        doff = 5 + len(opts) // 4
        if self.maybe(0.1):
            doff = self.r.randrange(16)
        flags = self.r.choice([0x02, 0x02, 0x10, 0x18, 0x11, 0x04, 0x12, 0x3F, 0x00,
                               self.r.getrandbits(9)])
        data = self.rbytes(self.small_len(200)) if self.maybe(0.5) else b""
        hdr = struct.pack("!HHIIHHHH", self.r.getrandbits(16),
                          self.r.choice([22, 80, 1, 9, 7, self.r.getrandbits(16)]),
                          self.r.getrandbits(32), self.r.getrandbits(32),
                          (doff << 12) | flags, self.r.getrandbits(16),
                          self.r.getrandbits(16), self.r.getrandbits(16))
        return hdr + opts + data

    def udp(self, dport: int | None = None, payload: bytes | None = None) -> bytes:
        payload = payload if payload is not None else self.rbytes(self.small_len(300))
        ln = 8 + len(payload)
        if self.maybe(0.2):
            ln = self.r.choice([0, 1, 7, 8, ln - 1, ln + 1, 65535, self.r.getrandbits(16)])
        dport = dport if dport is not None else self.r.choice(
            [7, 9, 67, 68, 69, 123, 547, self.r.getrandbits(16)])
        return struct.pack("!HHHH", self.r.getrandbits(16), dport, ln & 0xFFFF,
                           self.r.choice([0, self.r.getrandbits(16)])) + payload

    def icmp(self) -> bytes:
        t = self.r.choice([0, 3, 5, 8, 8, 11, 12, 13, 17, self.r.getrandbits(8)])
        body = self.rbytes(self.small_len(100))
        if t in (3, 11, 12) and self.maybe(0.6):
            # an error quoting a (malformed) IP header
            body = self.rbytes(4) + bytes([0x45 if self.maybe(0.7) else self.r.getrandbits(8)]) \
                + self.rbytes(self.small_len(60))
        h = struct.pack("!BBHI", t, self.r.getrandbits(8) if self.maybe(0.3) else 0, 0,
                        self.r.getrandbits(32)) + body
        return h[:2] + struct.pack("!H", csum(h)) + h[4:]

    def dhcp(self) -> bytes:
        op = self.r.choice([1, 1, 2, self.r.getrandbits(8)])
        bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0,
                            self.r.getrandbits(32), 0, 0x8000, b"\0" * 4, b"\0" * 4,
                            b"\0" * 4, b"\0" * 4, self.src_mac + b"\0" * 10,
                            b"\0" * 64, b"\0" * 128)
        opts = b"\x63\x82\x53\x63" if self.maybe(0.9) else self.rbytes(4)
        for _ in range(self.r.randrange(0, 8)):
            code = self.r.choice([53, 50, 51, 54, 55, 61, 12, 255, 0, self.r.getrandbits(8)])
            if code in (0, 255):
                opts += bytes([code])
                continue
            ln = self.r.choice([0, 1, 4, 255, self.r.getrandbits(8)])
            opts += bytes([code, ln]) + self.rbytes(self.r.choice([0, 1, 3, ln, 4]))
        if self.maybe(0.7):
            opts += b"\xff"
        payload = self.truncate(bootp + opts)
        return self.udp(67, payload)

    # -- frame kinds -------------------------------------------------------
    def k_eth_garbage(self) -> bytes:
        n = self.small_len(80)
        f = self.rbytes(n)
        if len(f) >= 14 and self.maybe(0.5):
            et = self.r.choice([0x0800, 0x86DD, 0x0806, 0x8100, 0x88CC, self.r.getrandbits(16)])
            f = f[:12] + struct.pack("!H", et) + f[14:]
        return f

    def k_arp(self) -> bytes:
        op = self.r.choice([1, 2, 1, 3, 0, self.r.getrandbits(16)])
        arp = struct.pack("!HHBBH6s4s6s4s", self.r.choice([1, 1, 6, 0]),
                          self.r.choice([0x0800, 0x0800, 0x86DD, 0]),
                          self.r.choice([6, 6, 0, 255]), self.r.choice([4, 4, 0, 16, 255]),
                          op, self.src_mac, self.addr4(V4_SRC), self.rbytes(6),
                          self.addr4(V4_DST))
        return self.truncate(self.eth(0x0806, arp, BCAST_MAC if op == 1 else None))

    def k_ipv4_tcp(self) -> bytes:
        return self.truncate(self.ipv4(6, self.tcp()))

    def k_ipv4_udp(self) -> bytes:
        return self.truncate(self.ipv4(17, self.udp()))

    def k_ipv4_icmp(self) -> bytes:
        return self.truncate(self.ipv4(1, self.icmp()))

    def k_ipv4_other(self) -> bytes:
        return self.truncate(self.ipv4(self.r.getrandbits(8), self.rbytes(self.small_len(60))))

    def k_dhcp(self) -> bytes:
        return self.truncate(self.ipv4(17, self.dhcp(), frag=0,
                                       dst=socket.inet_aton("255.255.255.255")))

    def k_ipv4_fragment(self) -> bytes:
        proto = self.r.choice([17, 17, 6, 1, self.r.getrandbits(8)])
        payload = self.udp() if proto == 17 else self.rbytes(self.small_len(400))
        off_bytes = self.r.choice([0, 8, 16, 1480, 47920, 65528, 65520, 8 * self.r.getrandbits(13)])
        mf = 0x2000 if self.maybe(0.6) else 0
        frag = mf | ((off_bytes // 8) & 0x1FFF)
        if self.maybe(0.3):
            payload = payload[: self.r.randrange(0, max(1, len(payload)))]
        return self.ipv4(proto, payload, frag=frag)

    def k_slirp4netns_killer(self) -> bytes:
        """The reported trigger: a UDP fragment at offset 47920 with a
        length that does not fit."""
        payload = self.udp(payload=self.rbytes(self.r.randrange(0, 1400)))
        mf = 0x2000 if self.maybe(0.5) else 0
        return self.ipv4(17, payload, frag=mf | (47920 // 8))

    def ipv6(self, nh: int, payload: bytes, dst: str | None = None) -> bytes:
        plen = len(payload)
        if self.maybe(0.15):
            plen = self.r.choice([0, 1, plen - 1, plen + 1, 65535, self.r.getrandbits(16)]) & 0xFFFF
        ver = 6 if not self.maybe(0.03) else self.r.randrange(16)
        hdr = struct.pack("!IHBB16s16s", (ver << 28) | self.r.getrandbits(20), plen, nh,
                          self.r.choice([255, 64, 1, 0]),
                          socket.inet_pton(socket.AF_INET6, self.r.choice(V6_SRC)),
                          socket.inet_pton(socket.AF_INET6, dst or self.r.choice(V6_DST)))
        dmac = b"\x33\x33" + hdr[-4:] if (dst or "").startswith("ff") else None
        return self.eth(0x86DD, hdr + payload, dmac)

    def icmp6(self) -> bytes:
        t = self.r.choice([128, 129, 133, 134, 135, 136, 137, 1, 2, 3, 4,
                           self.r.getrandbits(8)])
        body = self.rbytes(self.r.choice([0, 4, 20]))
        if t in (133, 134, 135, 136, 137):
            if t == 135 or t == 136:
                body = self.rbytes(4) + socket.inet_pton(socket.AF_INET6, self.r.choice(V6_DST))
            for _ in range(self.r.randrange(0, 4)):
                otype = self.r.choice([1, 2, 3, 5, 25, 31, self.r.getrandbits(8)])
                olen = self.r.choice([0, 1, 2, 4, 255, self.r.getrandbits(8)])
                body += bytes([otype, olen]) + self.rbytes(self.r.choice([0, 6, 14, 30]))
        return struct.pack("!BBH", t, self.r.getrandbits(8) if self.maybe(0.2) else 0,
                           self.r.getrandbits(16)) + body

    def k_ipv6(self) -> bytes:
        nh = self.r.choice([6, 17, 58, 58, 0, 43, 44, 60, 59, self.r.getrandbits(8)])
        if nh == 6:
            payload = self.tcp(v6=True)
        elif nh == 17:
            payload = self.udp()
        elif nh == 58:
            payload = self.icmp6()
        elif nh in (0, 43, 44, 60):
            # extension header chains, fragment headers with odd offsets
            payload = bytes([self.r.choice([6, 17, 58, 44, 0]), self.r.getrandbits(8)]) \
                + self.rbytes(6) + self.rbytes(self.small_len(80))
        else:
            payload = self.rbytes(self.small_len(80))
        dst = None
        if nh == 58 and self.maybe(0.5):
            dst = self.r.choice(["ff02::2", "ff02::1", "fd00::2"])
        return self.truncate(self.ipv6(nh, payload, dst))

    KINDS = ["eth_garbage", "arp", "ipv4_tcp", "ipv4_udp", "ipv4_icmp", "ipv4_other",
             "dhcp", "ipv4_fragment", "slirp4netns_killer", "ipv6"]
    WEIGHTS = [8, 8, 14, 12, 8, 4, 8, 18, 4, 16]

    def next(self) -> tuple[str, bytes]:
        kind = self.r.choices(self.KINDS, self.WEIGHTS)[0]
        frame = getattr(self, "k_" + kind)()
        return kind, sanitize(frame)


def sanitize(frame: bytes) -> bytes:
    """Never aim at the DNS forwarder or outside the slirp network."""
    f = bytearray(frame)
    if len(f) >= 14 + 20 and f[12:14] == b"\x08\x00":
        dst = socket.inet_ntoa(bytes(f[30:34]))
        if dst in FORBIDDEN_V4 or not (dst.startswith("10.0.2.") or dst == "255.255.255.255"):
            f[30:34] = socket.inet_aton("10.0.2.2")
    if len(f) >= 14 + 40 and f[12:14] == b"\x86\xdd":
        dst = socket.inet_ntop(socket.AF_INET6, bytes(f[38:54]))
        if dst in FORBIDDEN_V6 or not (dst.startswith(("fd00:", "fe80:", "ff02:"))):
            f[38:54] = socket.inet_pton(socket.AF_INET6, "fd00::2")
    return bytes(f)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def main(argv):
    args = argv[1:]
    opts = {"--max": None, "--watch": None, "--dump": None}
    pos = []
    i = 0
    while i < len(args):
        if args[i] in opts:
            opts[args[i]] = args[i + 1]
            i += 2
        else:
            pos.append(args[i])
            i += 1
    iface, seed, seconds = pos[0], int(pos[1]), float(pos[2])
    max_frames = int(opts["--max"]) if opts["--max"] else None
    watch = int(opts["--watch"]) if opts["--watch"] else None
    signal.alarm(HARD_LIMIT_S)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    src_mac = s.getsockname()[4]
    gen = Gen(seed, src_mac, GW_MAC)
    dump = open(opts["--dump"], "w") if opts["--dump"] else None
    sent = errors = 0
    kinds: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    result: dict = {}
    n = 0
    while time.monotonic() < deadline and (max_frames is None or n < max_frames):
        kind, frame = gen.next()
        n += 1
        if dump:
            dump.write(f"{n - 1} {kind} {frame.hex()}\n")
        try:
            s.send(frame)
            sent += 1
            kinds[kind] = kinds.get(kind, 0) + 1
        except OSError:
            errors += 1  # e.g. shorter than the kernel accepts, or over the MTU
        if n % 64 == 0:
            time.sleep(0.001)  # let the reader drain: measure parsing, not drops
        if watch is not None:
            time.sleep(0.003)
            if not alive(watch):
                result["died_after"] = {"index": n - 1, "kind": kind, "hex": frame.hex()}
                break
    if dump:
        dump.close()
    result.update(sent=sent, errors=errors, generated=n, kinds=kinds,
                  seconds=round(time.monotonic() - t0, 2), seed=seed)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
