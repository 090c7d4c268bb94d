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

int nsnet_vnet_complete_csum(const uint8_t *hdr, uint8_t *frame, size_t len)
{
    size_t start = rd16le(hdr + 6);
    size_t off = rd16le(hdr + 8);
    size_t i;
    uint32_t sum = 0;
    uint16_t res;
    if (start >= len || off + 2 > len - start)
        return -1;
    for (i = start; i + 1 < len; i += 2)
        sum += ((uint32_t)frame[i] << 8) | frame[i + 1];
    if (i < len)
        sum += (uint32_t)frame[i] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    res = (uint16_t)~sum;
    if (res == 0)
        res = 0xffff; /* a UDP checksum of 0 would mean "none" */
    frame[start + off] = res >> 8;
    frame[start + off + 1] = res & 0xff;
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
