/* Frames from the namespace are untrusted.  libslirp 4.7 trusts some
 * header fields more than it should (a malformed IPv4 UDP fragment has
 * been seen to crash it with SIGBUS), so every frame is checked here
 * before slirp_input() sees it.  The checks are structural only: each
 * length and offset that libslirp will use must lie inside the frame. */
#include "datapath.h"

#include <string.h>

#define ETH_HLEN 14
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define ETHERTYPE_IPV6 0x86dd
#define ARP_LEN 28
#define IP_MAXPACKET 65535

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
    frag_off = (size_t)(frag & 0x1fff) * 8;
    if (frag_off + payload > IP_MAXPACKET)
        return 0;
    if (frag & 0x2000 || frag_off) {
        /* A fragment: its data must be a whole number of 8-byte blocks
         * unless it is the last one, and it must not be empty. */
        if (payload == 0)
            return 0;
        if ((frag & 0x2000) && (payload & 7))
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
        return ipv4_ok(frame + ETH_HLEN, len - ETH_HLEN);
    case ETHERTYPE_IPV6:
        return ipv6_ok(frame + ETH_HLEN, len - ETH_HLEN);
    case ETHERTYPE_ARP:
        return len >= ETH_HLEN + ARP_LEN ? 1 : 0;
    default:
        return -1;
    }
}
