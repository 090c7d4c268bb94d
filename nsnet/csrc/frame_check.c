/* Frames from the namespace are untrusted.  libslirp 4.7 trusts some
 * header fields more than it should, so every frame is checked here
 * before slirp_input() sees it.  The checks are structural: each length
 * and offset that libslirp will use must lie inside the frame.
 *
 * IPv4 fragments never reach libslirp.  Its reassembly (ip_reass) crashes
 * (SIGSEGV/SIGBUS) on a fragment that has no "more fragments" flag and a
 * non-zero offset when no reassembly queue exists for its datagram: a
 * last fragment arriving first, a duplicate last fragment after the
 * datagram completed, the offset-47920 UDP fragment that kills slirp4netns
 * 1.2.0 (found by tests/framefuzz.py, reproduced with single frames).  So
 * nsnet reassembles IPv4 itself, here, with bounded memory (REASS_SLOTS
 * datagrams in flight, each at most 65535 bytes, REASS_TIMEOUT_MS to
 * complete, overlapping fragments drop the whole datagram), and hands
 * libslirp the whole datagram as one unfragmented packet, checked again
 * like any other. */
#include "datapath.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ETH_HLEN 14
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define ETHERTYPE_IPV6 0x86dd
#define ARP_LEN 28
#define IP_MAXPACKET 65535
#define IP_RF 0x8000
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFMASK 0x1fff

#define REASS_SLOTS 16
#define REASS_TIMEOUT_MS 30000
#define REASS_MAX_HDR (ETH_HLEN + 60)

struct reass {
    int used;
    int have_first;
    uint32_t src, dst;
    uint16_t id;
    uint8_t proto;
    int64_t born_ms;
    size_t total;  /* payload bytes, known once the last fragment came; 0 = unknown */
    size_t filled; /* payload bytes received */
    size_t hdrlen; /* Ethernet + IP header of the first fragment */
    uint8_t hdr[REASS_MAX_HDR];
    uint8_t map[(IP_MAXPACKET + 1) / 8 / 8]; /* one bit per 8-byte block */
    uint8_t *data;                           /* IP_MAXPACKET bytes */
};

static struct reass reass_slots[REASS_SLOTS];
static uint8_t *reass_out;
static size_t reass_out_len;

static unsigned rd16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

/* The transport header of an unfragmented packet (or of the first
 * fragment) must be complete, with lengths inside the payload. */
static int l4_ok(int proto, const uint8_t *l4, size_t len, int first_frag_only)
{
    switch (proto) {
    case 6: { /* TCP */
        size_t doff;
        if (first_frag_only)
            return len >= 20 || len == 0 ? 1 : 0;
        if (len < 20)
            return 0;
        doff = (size_t)(l4[12] >> 4) * 4;
        return doff >= 20 && doff <= len;
    }
    case 17: { /* UDP */
        size_t ulen;
        if (first_frag_only)
            return len >= 8 ? 1 : 0;
        if (len < 8)
            return 0;
        ulen = rd16(l4 + 4);
        return ulen >= 8 && ulen <= len;
    }
    case 1:  /* ICMP */
    case 58: /* ICMPv6 */
        return len >= 8 || (first_frag_only && len > 0);
    default:
        return 1;
    }
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint16_t ip_csum(const uint8_t *p, size_t len)
{
    uint32_t sum = 0;
    size_t i;
    for (i = 0; i + 1 < len; i += 2)
        sum += rd16(p + i);
    if (len & 1)
        sum += (uint32_t)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void reass_free(struct reass *r)
{
    r->used = 0;
}

/* Queue one fragment (already checked: header complete, lengths inside
 * the frame, offset + length <= 65535).  Returns NSNET_FRAME_QUEUED,
 * NSNET_FRAME_REASSEMBLED (the datagram is in reass_out), or 0 to drop. */
static int reass_add(const uint8_t *frame, const uint8_t *ip, size_t ihl, size_t payload,
                     size_t off, int more)
{
    uint32_t src, dst;
    uint16_t id = (uint16_t)rd16(ip + 4);
    uint8_t proto = ip[9];
    int64_t now = mono_ms();
    struct reass *r = NULL, *oldest = NULL;
    size_t b, first_b, last_b;
    int i;

    memcpy(&src, ip + 12, 4);
    memcpy(&dst, ip + 16, 4);
    for (i = 0; i < REASS_SLOTS; i++) {
        struct reass *s = &reass_slots[i];
        if (s->used && now - s->born_ms > REASS_TIMEOUT_MS)
            reass_free(s);
        if (s->used && s->src == src && s->dst == dst && s->id == id && s->proto == proto)
            r = s;
    }
    if (!r) {
        for (i = 0; i < REASS_SLOTS; i++) {
            struct reass *s = &reass_slots[i];
            if (!s->used) {
                r = s;
                break;
            }
            if (!oldest || s->born_ms < oldest->born_ms)
                oldest = s;
        }
        if (!r)
            r = oldest; /* evict: its datagram is lost, as under any flood */
        if (!r->data) {
            r->data = malloc(IP_MAXPACKET);
            if (!r->data)
                return 0;
        }
        r->used = 1;
        r->have_first = 0;
        r->src = src;
        r->dst = dst;
        r->id = id;
        r->proto = proto;
        r->born_ms = now;
        r->total = 0;
        r->filled = 0;
        memset(r->map, 0, sizeof(r->map));
    }
    /* The last fragment fixes the datagram's length; nothing may lie
     * beyond it, and it may not change. */
    if (!more) {
        if ((r->total && r->total != off + payload) || off + payload < r->filled)
            goto bad;
        r->total = off + payload;
    }
    if (r->total && off + payload > r->total)
        goto bad;
    /* Overlaps (teardrop and friends) drop the whole datagram. */
    first_b = off / 8;
    last_b = (off + payload - 1) / 8;
    for (b = first_b; b <= last_b; b++) {
        if (r->map[b / 8] & (1u << (b % 8)))
            goto bad;
    }
    for (b = first_b; b <= last_b; b++)
        r->map[b / 8] |= (uint8_t)(1u << (b % 8));
    memcpy(r->data + off, ip + ihl, payload);
    r->filled += payload;
    if (off == 0) {
        r->have_first = 1;
        r->hdrlen = ETH_HLEN + ihl;
        memcpy(r->hdr, frame, r->hdrlen);
    }
    if (!r->have_first || !r->total || r->filled != r->total)
        return NSNET_FRAME_QUEUED;
    if (r->hdrlen - ETH_HLEN + r->total > IP_MAXPACKET)
        goto bad;
    /* Complete: one unfragmented datagram, first fragment's headers. */
    if (!reass_out) {
        reass_out = malloc(REASS_MAX_HDR + IP_MAXPACKET);
        if (!reass_out)
            goto bad;
    }
    {
        uint8_t *o = reass_out;
        uint8_t *oip = o + ETH_HLEN;
        size_t oihl = r->hdrlen - ETH_HLEN;
        size_t tot = oihl + r->total;
        unsigned frag;
        uint16_t c;
        memcpy(o, r->hdr, r->hdrlen);
        memcpy(o + r->hdrlen, r->data, r->total);
        oip[2] = (uint8_t)(tot >> 8);
        oip[3] = (uint8_t)tot;
        frag = rd16(oip + 6) & IP_DF;
        oip[6] = (uint8_t)(frag >> 8);
        oip[7] = 0;
        oip[10] = oip[11] = 0;
        c = ip_csum(oip, oihl);
        oip[10] = (uint8_t)(c >> 8);
        oip[11] = (uint8_t)c;
        reass_out_len = ETH_HLEN + tot;
    }
    reass_free(r);
    return NSNET_FRAME_REASSEMBLED;
bad:
    reass_free(r);
    return 0;
}

const uint8_t *nsnet_frame_reassembled(size_t *len)
{
    *len = reass_out_len;
    return reass_out;
}

static int ipv4_ok(const uint8_t *ip, size_t avail);

static int ipv4_check(const uint8_t *frame, const uint8_t *ip, size_t avail)
{
    size_t ihl, tot, frag_off, payload;
    unsigned frag;
    if (!ipv4_ok(ip, avail))
        return 0;
    ihl = (size_t)(ip[0] & 0x0f) * 4;
    tot = rd16(ip + 2);
    payload = tot - ihl;
    frag = rd16(ip + 6);
    frag_off = (size_t)(frag & IP_OFFMASK) * 8;
    if (!(frag & IP_MF) && frag_off == 0)
        return 1;
    {
        int rc = reass_add(frame, ip, ihl, payload, frag_off, (frag & IP_MF) != 0);
        if (rc != NSNET_FRAME_REASSEMBLED)
            return rc;
    }
    /* The whole datagram must pass the checks of an unfragmented one. */
    if (!ipv4_ok(reass_out + ETH_HLEN, reass_out_len - ETH_HLEN))
        return 0;
    return NSNET_FRAME_REASSEMBLED;
}

static int ipv4_ok(const uint8_t *ip, size_t avail)
{
    size_t ihl, tot, frag_off, payload;
    unsigned frag;
    if (avail < 20)
        return 0;
    if ((ip[0] >> 4) != 4)
        return 0;
    ihl = (size_t)(ip[0] & 0x0f) * 4;
    if (ihl < 20 || ihl > avail)
        return 0;
    tot = rd16(ip + 2);
    /* TSO super-frames (offloads) may carry a total length of 0 only
     * above 64 KiB, which nsnet never negotiates: insist on a real one. */
    if (tot < ihl || tot > avail)
        return 0;
    payload = tot - ihl;
    frag = rd16(ip + 6);
    if (frag & IP_RF)
        return 0; /* the reserved flag must be zero */
    frag_off = (size_t)(frag & IP_OFFMASK) * 8;
    if (frag_off + payload > IP_MAXPACKET)
        return 0;
    if (frag & IP_MF || frag_off) {
        /* A fragment: its data must be a whole number of 8-byte blocks
         * unless it is the last one, and it must not be empty. */
        if (payload == 0)
            return 0;
        if ((frag & IP_MF) && (payload & 7))
            return 0;
        if (frag_off == 0)
            return l4_ok(ip[9], ip + ihl, payload, 1);
        return 1;
    }
    return l4_ok(ip[9], ip + ihl, payload, 0);
}

static int ipv6_ok(const uint8_t *ip, size_t avail)
{
    size_t plen;
    if (avail < 40)
        return 0;
    if ((ip[0] >> 4) != 6)
        return 0;
    plen = rd16(ip + 4);
    if (plen + 40 > avail)
        return 0;
    /* libslirp handles TCP, UDP and ICMPv6 directly after the fixed
     * header and drops everything else (extension headers included). */
    return l4_ok(ip[6], ip + 40, plen, 0);
}

int nsnet_frame_check(const uint8_t *frame, size_t len)
{
    unsigned type;
    if (len < ETH_HLEN)
        return 0;
    type = rd16(frame + 12);
    switch (type) {
    case ETHERTYPE_IPV4:
        return ipv4_check(frame, frame + ETH_HLEN, len - ETH_HLEN);
    case ETHERTYPE_IPV6:
        return ipv6_ok(frame + ETH_HLEN, len - ETH_HLEN);
    case ETHERTYPE_ARP:
        return len >= ETH_HLEN + ARP_LEN ? 1 : 0;
    default:
        return -1;
    }
}
