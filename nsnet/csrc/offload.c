/* TAP offloads: the virtio-net header that precedes every frame on a TAP
 * opened with IFF_VNET_HDR.
 *
 * Namespace -> host: with TUNSETOFFLOAD the namespace's kernel hands over
 * TSO super-frames (up to 64 KiB) whose TCP/UDP checksum holds only the
 * pseudo-header sum (VIRTIO_NET_HDR_F_NEEDS_CSUM).  libslirp verifies
 * checksums and would silently drop them, so the sum is completed here.
 *
 * Host -> namespace: a TCP segment longer than the TAP's MTU allows is
 * written as a GSO frame, which the namespace's kernel segments itself
 * wherever it has to (when it forwards the packet on); frames that fit
 * are written with checksums marked valid. */
#include "datapath.h"

#include <string.h>

#define VNET_F_NEEDS_CSUM 1
#define VNET_F_DATA_VALID 2
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4

static unsigned rd16le(const uint8_t *p)
{
    return p[0] | ((unsigned)p[1] << 8);
}

static void wr16le(uint8_t *p, unsigned v)
{
    p[0] = v & 0xff;
    p[1] = (v >> 8) & 0xff;
}

/* The 16-bit ones' complement sum of [p, p+len) in host byte order
 * (RFC 1071: the sum is byte-order independent; store it back with the
 * same order).  Two 32-bit words per step into a 64-bit accumulator: a
 * 64 KiB super-frame costs a few microseconds, not tens. */
static uint16_t csum_fold_native(const uint8_t *p, size_t len)
{
    uint64_t sum = 0;
    uint32_t w32;
    uint16_t w16 = 0;
    while (len >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        sum += (uint64_t)a + b;
        p += 8;
        len -= 8;
    }
    if (len >= 4) {
        memcpy(&w32, p, 4);
        sum += w32;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        memcpy(&w16, p, 2);
        sum += w16;
        p += 2;
        len -= 2;
    }
    if (len) {
        uint8_t last[2] = {p[0], 0}; /* pad the odd byte with zero */
        memcpy(&w16, last, 2);
        sum += w16;
    }
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

int nsnet_vnet_complete_csum(const uint8_t *hdr, uint8_t *frame, size_t len)
{
    size_t start = rd16le(hdr + 6);
    size_t off = rd16le(hdr + 8);
    uint16_t res;
    if (start >= len || off + 2 > len - start)
        return -1;
    /* The checksum field holds the pseudo-header sum: summing over it
     * completes the checksum. */
    res = (uint16_t)~csum_fold_native(frame + start, len - start);
    if (res == 0)
        res = 0xffff; /* a UDP checksum of 0 would mean "none" */
    memcpy(frame + start + off, &res, 2);
    return 0;
}

void nsnet_vnet_fill_tx(uint8_t *hdr, const uint8_t *frame, size_t len,
                        int tap_mtu, int *is_gso)
{
    unsigned type;
    size_t l3, l4hl, l3hl;
    int proto;
    memset(hdr, 0, NSNET_VNET_HDR_LEN);
    *is_gso = 0;
    if (len < 14 + 20)
        return;
    type = ((unsigned)frame[12] << 8) | frame[13];
    l3 = 14;
    if (type == 0x0800) {
        l3hl = (size_t)(frame[l3] & 0x0f) * 4;
        proto = frame[l3 + 9];
        /* fragments carry no transport header to vouch for */
        if (((frame[l3 + 6] & 0x3f) | frame[l3 + 7]) != 0)
            return;
    } else if (type == 0x86dd) {
        if (len < 14 + 40)
            return;
        l3hl = 40;
        proto = frame[l3 + 6];
    } else {
        return;
    }
    if (proto != 6 && proto != 17)
        return;
    /* libslirp computed the checksums itself. */
    hdr[0] = VNET_F_DATA_VALID;
    if (proto != 6 || len <= (size_t)tap_mtu + 14)
        return;
    if (len < l3 + l3hl + 20)
        return;
    l4hl = (size_t)(frame[l3 + l3hl + 12] >> 4) * 4;
    if (l4hl < 20 || (size_t)tap_mtu <= l3hl + l4hl)
        return;
    hdr[1] = type == 0x0800 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
    wr16le(hdr + 2, (unsigned)(l3 + l3hl + l4hl));          /* hdr_len */
    wr16le(hdr + 4, (unsigned)(tap_mtu - l3hl - l4hl));     /* gso_size */
    *is_gso = 1;
}

/* ---- MSS of the namespace's SYNs (libslirp's segment size) ----
 *
 * libslirp sizes the segments it sends from its MSS for the connection,
 * which also paces its window updates (NSNET_SLIRP_MSS in datapath.h).
 * It starts as min(if_mtu - 40, 32768); libslirp lowers it to the MSS
 * option of the SYN-ACK when it opened the connection (a port forward),
 * but ignores the option of a SYN from the namespace (measured: with the
 * SYN saying 21800 it still sent 32768-byte segments).  nsnet sets the MSS
 * option of the namespace's SYNs and SYN-ACKs to the MSS of libslirp's
 * if_mtu, at most NSNET_SLIRP_MSS.  With offloads (and TSO) libslirp runs
 * with a large if_mtu and the MSS is raised: its segments go out as GSO
 * frames that the namespace's kernel cuts to its MTU. */

static unsigned rd16be(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static void wr16be(uint8_t *p, unsigned v)
{
    p[0] = (v >> 8) & 0xff;
    p[1] = v & 0xff;
}

/* RFC 1624 incremental update: HC' = ~(~HC + ~m + m') */
static unsigned csum_update16(unsigned check, unsigned old, unsigned new_)
{
    uint32_t sum = (~check & 0xffff) + (~old & 0xffff) + new_;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return ~sum & 0xffff;
}

/* The MSS option of a TCP SYN (or SYN-ACK) in an Ethernet frame, IPv4
 * or IPv6: the offset of its 2-byte value in the frame, with *th_off the
 * TCP header's and *overhead the IP and TCP header bytes an MSS excludes;
 * 0 if the frame is not such a SYN or has no well-formed MSS option. */
static size_t syn_mss_option(const uint8_t *frame, size_t len, size_t *th_off,
                             unsigned *overhead)
{
    size_t l3 = 14, l3hl, l4, doff, i;
    unsigned type;
    const uint8_t *th;
    if (len < l3 + 20)
        return 0;
    type = rd16be(frame + 12);
    if (type == 0x0800) {
        l3hl = (size_t)(frame[l3] & 0x0f) * 4;
        if (frame[l3 + 9] != 6 || l3hl < 20)
            return 0;
        if (((frame[l3 + 6] & 0x3f) | frame[l3 + 7]) != 0)
            return 0; /* a fragment */
        *overhead = 20 + 20;
    } else if (type == 0x86dd) {
        l3hl = 40;
        if (len < l3 + 40 || frame[l3 + 6] != 6)
            return 0;
        *overhead = 40 + 20;
    } else {
        return 0;
    }
    l4 = l3 + l3hl;
    if (len < l4 + 20)
        return 0;
    th = frame + l4;
    if (!(th[13] & 0x02)) /* SYN */
        return 0;
    doff = (size_t)(th[12] >> 4) * 4;
    if (doff < 20 || l4 + doff > len)
        return 0;
    for (i = 20; i < doff;) {
        unsigned kind = th[i], olen;
        if (kind == 0) /* end of options */
            break;
        if (kind == 1) { /* no-op */
            i++;
            continue;
        }
        if (i + 1 >= doff)
            break;
        olen = th[i + 1];
        if (olen < 2 || i + olen > doff)
            break;
        if (kind == 2 && olen == 4) {
            *th_off = l4;
            return l4 + i + 2;
        }
        i += olen;
    }
    return 0;
}

static void set_mss(uint8_t *frame, size_t th_off, size_t opt_off, unsigned mss)
{
    uint8_t *check = frame + th_off + 16;
    wr16be(check, csum_update16(rd16be(check), rd16be(frame + opt_off), mss));
    wr16be(frame + opt_off, mss);
}

int nsnet_adjust_syn_mss(uint8_t *frame, size_t len, int tap_mtu, int slirp_mtu,
                         unsigned mss_max)
{
    size_t th_off, opt_off;
    unsigned overhead, mss, want;
    opt_off = syn_mss_option(frame, len, &th_off, &overhead);
    if (!opt_off || slirp_mtu <= (int)overhead)
        return 0;
    mss = rd16be(frame + opt_off);
    want = (unsigned)slirp_mtu - overhead;
    if (want > mss_max)
        want = mss_max;
    if (mss == want)
        return 0;
    if (mss < want && (int)mss < tap_mtu - (int)overhead)
        return 0; /* the namespace's own clamp: not raised */
    set_mss(frame, th_off, opt_off, want);
    return 1;
}

int nsnet_raise_tx_syn_mss(const uint8_t *frame, size_t len, int tap_mtu,
                           uint8_t *out, size_t out_size)
{
    size_t th_off, opt_off;
    unsigned overhead;
    if (len < 14 || rd16be(frame + 12) != 0x0800)
        return 0; /* IPv4 only: libslirp refuses IPv6 over its if_mtu */
    opt_off = syn_mss_option(frame, len, &th_off, &overhead);
    if (!opt_off || len > out_size || tap_mtu <= (int)overhead ||
        rd16be(frame + opt_off) >= (unsigned)tap_mtu - overhead)
        return 0;
    memcpy(out, frame, len);
    set_mss(out, th_off, opt_off, (unsigned)tap_mtu - overhead);
    return 1;
}

/* ---- fragments towards the namespace ----
 *
 * With a large libslirp if_mtu, libslirp no longer fragments what it
 * sends (and it never fragments IPv6): a UDP or ICMP packet longer than
 * the TAP's MTU is cut here into IPv4 or IPv6 fragments that fit, so
 * nothing bigger than the MTU the user set reaches the namespace
 * unless it is a GSO frame. */

int nsnet_tx_fragment(const uint8_t *frame, size_t len, int tap_mtu, uint32_t ident,
                      nsnet_emit_fn emit, void *opaque)
{
    uint8_t out[NSNET_FRAG_BUF];
    size_t l3 = 14, hl, payload, off, chunk;
    unsigned type;
    if (len < l3 + 20 || tap_mtu < 68 || (size_t)tap_mtu + l3 > sizeof(out))
        return -1;
    type = rd16be(frame + 12);
    if (type == 0x0800) {
        unsigned fo, base_off, more;
        hl = (size_t)(frame[l3] & 0x0f) * 4;
        if (hl < 20 || len < l3 + hl || (size_t)tap_mtu < hl + 8)
            return -1;
        payload = rd16be(frame + l3 + 2);
        if (payload < hl || l3 + payload > len)
            return -1;
        payload -= hl;
        fo = rd16be(frame + l3 + 6);
        base_off = fo & 0x1fff;
        more = fo & 0x2000;
        chunk = ((size_t)tap_mtu - hl) & ~(size_t)7;
        for (off = 0; off < payload; off += chunk) {
            size_t n = payload - off < chunk ? payload - off : chunk;
            int last = off + n >= payload;
            uint32_t sum = 0;
            size_t i;
            memcpy(out, frame, l3 + hl);
            memcpy(out + l3 + hl, frame + l3 + hl + off, n);
            wr16be(out + l3 + 2, (unsigned)(hl + n));
            wr16be(out + l3 + 6, (unsigned)((base_off + off / 8) & 0x1fff) |
                                     (last ? more : 0x2000));
            out[l3 + 10] = out[l3 + 11] = 0;
            for (i = 0; i < hl; i += 2)
                sum += rd16be(out + l3 + i);
            while (sum >> 16)
                sum = (sum & 0xffff) + (sum >> 16);
            wr16be(out + l3 + 10, ~sum & 0xffff);
            if (emit(out, l3 + hl + n, opaque) < 0)
                return -1;
        }
        return 0;
    }
    if (type == 0x86dd) {
        unsigned nh;
        if (len < l3 + 40)
            return -1;
        nh = frame[l3 + 6];
        if (nh == 44) /* already a fragment */
            return -1;
        payload = rd16be(frame + l3 + 4);
        if (l3 + 40 + payload > len)
            return -1;
        chunk = ((size_t)tap_mtu - 40 - 8) & ~(size_t)7;
        for (off = 0; off < payload; off += chunk) {
            size_t n = payload - off < chunk ? payload - off : chunk;
            int last = off + n >= payload;
            uint8_t *fh = out + l3 + 40;
            memcpy(out, frame, l3 + 40);
            out[l3 + 6] = 44;
            wr16be(out + l3 + 4, (unsigned)(8 + n));
            fh[0] = (uint8_t)nh;
            fh[1] = 0;
            wr16be(fh + 2, (unsigned)(off & 0xfff8) | (last ? 0 : 1));
            fh[4] = ident >> 24;
            fh[5] = ident >> 16;
            fh[6] = ident >> 8;
            fh[7] = ident;
            memcpy(fh + 8, frame + l3 + 40 + off, n);
            if (emit(out, l3 + 48 + n, opaque) < 0)
                return -1;
        }
        return 0;
    }
    return -1;
}
