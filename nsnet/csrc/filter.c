/* Egress policy enforcement in the data path, before libslirp.
 *
 * Every frame from the namespace that nsnet_frame_check accepted (IPv4
 * datagrams already reassembled) is classified: TCP, UDP, ICMP echo, IPv4
 * or IPv6 (extension headers walked to the transport header).  A new flow
 * is judged by the policy (policy.c) and the decision cached per flow, so
 * an established flow costs one hash lookup per frame.  Denied: a TCP SYN
 * gets a reset (the program sees ECONNREFUSED at once), a UDP datagram or
 * an echo request an ICMP "administratively prohibited"; anything that
 * cannot be classified (raw IP protocols, IPv6 headers that cannot be
 * walked, non-first fragments) is dropped when the default is deny.
 *
 * Not egress, never judged: ARP, neighbour discovery and other ICMP that
 * is not an echo request, DHCP to libslirp, and inbound flows (port
 * forwards: libslirp's SYN towards the namespace, datagrams to a
 * published UDP port).
 *
 * DNS: queries to the built-in forwarder (CIDR+3, fd00::3, port 53, UDP
 * and TCP) pass the address policy but are filtered by name
 * (nsnet_policy_name_allowed): a refused UDP query is answered REFUSED
 * here and never reaches libslirp; a TCP connection carrying a refused
 * query is reset.  Answers from libslirp (never frames from the
 * namespace) teach which addresses belong to which names (A/AAAA through
 * CNAME chains), for the TTL plus LEARN_GRACE_MS. */
#define _GNU_SOURCE
#include "policy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ETH_HLEN 14
#define FLOW_SETS 4096
#define FLOW_WAYS 4
#define FLOW_IDLE_MS 60000       /* UDP/ICMP flows are judged again after this */
#define LEARN_BUCKETS 1024
#define LEARN_WAYS 8
#define LEARN_GRACE_MS 5000
#define LEARN_TTL_MAX 86400
#define AUDIT_RING 1024
/* Audit records per second (token bucket, burst AUDIT_RING): a namespace
 * opening denied flows in a loop must not turn the supervisor into a log
 * writer; the rest are counted in audit_lost. */
#define AUDIT_RATE 500
#define MAX_NAMES 8

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

#define FL_VALID 1
#define FL_INBOUND 2
#define FL_DNS 4                 /* a TCP connection to the DNS forwarder */

struct flow_key {
    uint8_t family, proto;
    uint16_t sport, dport;
    uint8_t src[16], dst[16];
};

struct flow {
    struct flow_key k;
    uint8_t flags, action;
    int32_t rule;
    int64_t last_ms;
    uint32_t dns_next_seq;       /* FL_DNS: the namespace's next byte */
};

struct learned {
    uint8_t used, family;
    uint8_t addr[16];
    int64_t expire_ms;
    char name[256];
};

struct nsnet_filter {
    struct nsnet_policy *pol;
    int audit_all;
    int has_dns4, has_dns6;
    uint8_t dns4[4], dns6[16];
    uint32_t seed;
    struct flow *flows;
    struct learned *learned;
    uint8_t udp_fwd[65536 / 8];
    struct nsnet_pol_event *ring;
    unsigned ring_head, ring_len;
    double audit_tokens;
    int64_t audit_refill_ms;
    struct nsnet_filter_stats st;
};

/* A parsed frame from the namespace. */
struct pkt {
    int family;          /* 4 or 6 */
    int proto;           /* 6, 17, 1, 58, other; -1: unclassifiable */
    uint8_t *l3;
    size_t l3len;        /* up to the end of the IP packet */
    uint8_t *l4;
    size_t l4len;
    struct flow_key k;
    uint8_t tflags;
    uint32_t seq, ack;
    int icmp_echo;       /* an echo request */
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t real_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static unsigned rd16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static uint32_t rd32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void wr16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t sum16(const uint8_t *p, size_t len, uint32_t sum)
{
    size_t i;
    for (i = 0; i + 1 < len; i += 2)
        sum += rd16(p + i);
    if (len & 1)
        sum += (uint32_t)p[len - 1] << 8;
    return sum;
}

static uint16_t fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* ---- lifetime ---- */

struct nsnet_filter *nsnet_filter_new(void)
{
    struct nsnet_filter *f = calloc(1, sizeof(*f));
    struct timespec ts;
    if (!f)
        return NULL;
    f->flows = calloc((size_t)FLOW_SETS * FLOW_WAYS, sizeof(struct flow));
    f->learned = calloc((size_t)LEARN_BUCKETS * LEARN_WAYS, sizeof(struct learned));
    f->ring = calloc(AUDIT_RING, sizeof(struct nsnet_pol_event));
    if (!f->flows || !f->learned || !f->ring) {
        nsnet_filter_free(f);
        return NULL;
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    f->seed = (uint32_t)ts.tv_nsec ^ (uint32_t)(uintptr_t)f ^ 0x9e3779b9u;
    f->audit_tokens = AUDIT_RING;
    f->audit_refill_ms = mono_ms();
    return f;
}

void nsnet_filter_free(struct nsnet_filter *f)
{
    if (!f)
        return;
    nsnet_policy_free(f->pol);
    free(f->flows);
    free(f->learned);
    free(f->ring);
    free(f);
}

void nsnet_filter_set_dns(struct nsnet_filter *f, const uint8_t *dns4, const uint8_t *dns6)
{
    f->has_dns4 = dns4 != NULL;
    f->has_dns6 = dns6 != NULL;
    if (dns4)
        memcpy(f->dns4, dns4, 4);
    if (dns6)
        memcpy(f->dns6, dns6, 16);
}

void nsnet_filter_set_udp_forward(struct nsnet_filter *f, unsigned port, int on)
{
    if (port > 65535)
        return;
    if (on)
        f->udp_fwd[port / 8] |= (uint8_t)(1u << (port % 8));
    else
        f->udp_fwd[port / 8] &= (uint8_t)~(1u << (port % 8));
}

void nsnet_filter_get_stats(struct nsnet_filter *f, struct nsnet_filter_stats *out)
{
    *out = f->st;
}

/* ---- learned names ---- */

static uint32_t hash_bytes(uint32_t h, const uint8_t *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

static struct learned *learned_bucket(struct nsnet_filter *f, int family, const uint8_t *addr)
{
    uint32_t h = hash_bytes(f->seed ^ 2166136261u, addr, family == 4 ? 4 : 16);
    return &f->learned[(size_t)(h % LEARN_BUCKETS) * LEARN_WAYS];
}

static int learned_names(struct nsnet_filter *f, int family, const uint8_t *addr,
                         const char **out, int max)
{
    struct learned *b = learned_bucket(f, family, addr);
    int64_t now = mono_ms();
    int i, n = 0;
    for (i = 0; i < LEARN_WAYS && n < max; i++) {
        struct learned *e = &b[i];
        if (e->used && e->family == family && memcmp(e->addr, addr, 16) == 0 &&
            e->expire_ms > now)
            out[n++] = e->name;
    }
    return n;
}

const char *nsnet_filter_learned(struct nsnet_filter *f, int family, const uint8_t *addr)
{
    const char *v[1];
    uint8_t a[16] = {0};
    memcpy(a, addr, family == 4 ? 4 : 16);
    return learned_names(f, family, a, v, 1) ? v[0] : "";
}

static void learn(struct nsnet_filter *f, int family, const uint8_t *addr16, const char *name,
                  uint32_t ttl)
{
    struct learned *b = learned_bucket(f, family, addr16), *slot = NULL;
    int64_t now = mono_ms();
    int64_t expire;
    int i;
    if (ttl > LEARN_TTL_MAX)
        ttl = LEARN_TTL_MAX;
    expire = now + (int64_t)ttl * 1000 + LEARN_GRACE_MS;
    for (i = 0; i < LEARN_WAYS; i++) {
        struct learned *e = &b[i];
        if (e->used && e->family == family && memcmp(e->addr, addr16, 16) == 0 &&
            strcmp(e->name, name) == 0) {
            slot = e;
            break;
        }
    }
    if (!slot) {
        for (i = 0; i < LEARN_WAYS; i++) {
            struct learned *e = &b[i];
            if (!e->used || e->expire_ms <= now) {
                slot = e;
                break;
            }
            if (!slot || e->expire_ms < slot->expire_ms)
                slot = e;
        }
        slot->used = 1;
        slot->family = (uint8_t)family;
        memcpy(slot->addr, addr16, 16);
        snprintf(slot->name, sizeof(slot->name), "%s", name);
    } else if (slot->expire_ms > expire) {
        return; /* keep the longer lifetime */
    }
    slot->expire_ms = expire;
    f->st.dns_learned++;
}

/* ---- flows ---- */

static struct flow *flow_set(struct nsnet_filter *f, const struct flow_key *k)
{
    uint32_t h = hash_bytes(f->seed, (const uint8_t *)k, sizeof(*k));
    return &f->flows[(size_t)(h % FLOW_SETS) * FLOW_WAYS];
}

static struct flow *flow_find(struct nsnet_filter *f, const struct flow_key *k)
{
    struct flow *s = flow_set(f, k);
    int i;
    for (i = 0; i < FLOW_WAYS; i++)
        if ((s[i].flags & FL_VALID) && memcmp(&s[i].k, k, sizeof(*k)) == 0)
            return &s[i];
    return NULL;
}

static struct flow *flow_insert(struct nsnet_filter *f, const struct flow_key *k)
{
    struct flow *s = flow_set(f, k), *victim = NULL;
    int i;
    for (i = 0; i < FLOW_WAYS; i++) {
        if ((s[i].flags & FL_VALID) && memcmp(&s[i].k, k, sizeof(*k)) == 0)
            return &s[i];
    }
    for (i = 0; i < FLOW_WAYS; i++) {
        if (!(s[i].flags & FL_VALID)) {
            victim = &s[i];
            break;
        }
        if (!victim || s[i].last_ms < victim->last_ms)
            victim = &s[i];
    }
    memset(victim, 0, sizeof(*victim));
    victim->k = *k;
    victim->flags = FL_VALID;
    return victim;
}

static int pbit_of(int proto)
{
    return proto == 6 ? NSNET_POL_TCP : proto == 17 ? NSNET_POL_UDP : NSNET_POL_ICMP;
}

static int judge(struct nsnet_filter *f, const struct flow_key *k, int32_t *rule,
                 const char **why_name)
{
    const char *names[MAX_NAMES];
    int n = learned_names(f, k->family, k->dst, names, MAX_NAMES);
    int pbit = pbit_of(k->proto);
    unsigned port = pbit == NSNET_POL_ICMP ? 0 : k->dport;
    int action = nsnet_policy_decide(f->pol, pbit, k->family, k->dst, port, names, n, rule);
    *why_name = n ? names[0] : "";
    return action;
}

/* An audit record (rule -1: the default; NSNET_POL_RULE_DNS: a DNS query
 * refused by name, which is not counted as a flow). */
static void audit(struct nsnet_filter *f, const struct flow_key *k, int action, int32_t rule,
                  const char *name)
{
    struct nsnet_pol_event *e;
    if (rule == NSNET_POL_RULE_DNS)
        ;
    else if (action == NSNET_POL_DENY)
        f->st.flows_denied++;
    else
        f->st.flows_allowed++;
    if (action != NSNET_POL_DENY && !f->audit_all)
        return;
    {
        int64_t now = mono_ms();
        f->audit_tokens += (double)(now - f->audit_refill_ms) * AUDIT_RATE / 1000.0;
        if (f->audit_tokens > AUDIT_RING)
            f->audit_tokens = AUDIT_RING;
        f->audit_refill_ms = now;
    }
    if (f->ring_len == AUDIT_RING || f->audit_tokens < 1.0) {
        f->st.audit_lost++;
        return;
    }
    f->audit_tokens -= 1.0;
    e = &f->ring[(f->ring_head + f->ring_len) % AUDIT_RING];
    f->ring_len++;
    memset(e, 0, sizeof(*e));
    e->time_ms = real_ms();
    e->family = k->family;
    e->proto = k->proto;
    e->action = (uint8_t)action;
    e->rule = rule;
    memcpy(e->src, k->src, 16);
    memcpy(e->dst, k->dst, 16);
    e->sport = k->sport;
    e->dport = k->dport;
    snprintf(e->name, sizeof(e->name), "%s", name);
}

int nsnet_filter_audit_pending(struct nsnet_filter *f)
{
    return (int)f->ring_len;
}

int nsnet_filter_audit_pop(struct nsnet_filter *f, struct nsnet_pol_event *out, int max)
{
    int n = 0;
    while (n < max && f->ring_len) {
        out[n++] = f->ring[f->ring_head];
        f->ring_head = (f->ring_head + 1) % AUDIT_RING;
        f->ring_len--;
    }
    return n;
}

void nsnet_filter_set_policy(struct nsnet_filter *f, struct nsnet_policy *p,
                             int keep_established, int audit_all)
{
    size_t i;
    nsnet_policy_free(f->pol);
    f->pol = p;
    f->audit_all = audit_all;
    for (i = 0; i < (size_t)FLOW_SETS * FLOW_WAYS; i++) {
        struct flow *fl = &f->flows[i];
        int32_t rule;
        const char *name;
        if (!(fl->flags & FL_VALID) || (fl->flags & FL_INBOUND))
            continue;
        if (!p) {
            fl->action = NSNET_POL_ALLOW;
            continue;
        }
        if (fl->flags & FL_DNS)
            continue; /* DNS connections stay filtered by name */
        if (keep_established && fl->action == NSNET_POL_ALLOW)
            continue;
        if (fl->action == NSNET_POL_DENY) {
            fl->flags = 0; /* judged afresh on its next packet */
            continue;
        }
        fl->action = (uint8_t)judge(f, &fl->k, &rule, &name);
        fl->rule = rule;
        if (fl->action == NSNET_POL_DENY)
            f->st.flows_cut++;
    }
}

/* ---- parsing ---- */

/* Classify a frame from the namespace.  Returns 0 for non-IP frames
 * (pass), 1 with p filled (p->proto -1 when unclassifiable). */
static int parse(uint8_t *frame, size_t len, struct pkt *p)
{
    unsigned type;
    uint8_t *l4 = NULL;
    size_t l4len = 0;
    memset(p, 0, sizeof(*p));
    if (len < ETH_HLEN)
        return 0;
    type = rd16(frame + 12);
    if (type == 0x0800) {
        uint8_t *ip = frame + ETH_HLEN;
        size_t ihl, tot;
        if (len < ETH_HLEN + 20)
            return 0;
        ihl = (size_t)(ip[0] & 0x0f) * 4;
        tot = rd16(ip + 2);
        p->family = 4;
        p->l3 = ip;
        p->l3len = tot;
        if (ihl < 20 || tot < ihl || tot > len - ETH_HLEN) {
            p->proto = -1;
            return 1;
        }
        memcpy(p->k.src, ip + 12, 4);
        memcpy(p->k.dst, ip + 16, 4);
        if (rd16(ip + 6) & 0x3fff) { /* a fragment: frame_check reassembles, never here */
            p->proto = -1;
            return 1;
        }
        p->proto = ip[9];
        l4 = ip + ihl;
        l4len = tot - ihl;
    } else if (type == 0x86dd) {
        uint8_t *ip = frame + ETH_HLEN;
        size_t plen, off;
        int nh, hops;
        if (len < ETH_HLEN + 40)
            return 0;
        plen = rd16(ip + 4);
        p->family = 6;
        p->l3 = ip;
        p->l3len = 40 + plen;
        memcpy(p->k.src, ip + 8, 16);
        memcpy(p->k.dst, ip + 24, 16);
        if (plen + 40 > len - ETH_HLEN) {
            p->proto = -1;
            return 1;
        }
        nh = ip[6];
        off = 40;
        p->proto = -1;
        for (hops = 0; hops < 16; hops++) {
            if (nh == 6 || nh == 17 || nh == 58) {
                p->proto = nh;
                l4 = ip + off;
                l4len = 40 + plen - off;
                break;
            }
            if (nh == 0 || nh == 43 || nh == 60) { /* hop-by-hop, routing, dest opts */
                size_t hl;
                if (off + 8 > 40 + plen)
                    break;
                hl = ((size_t)ip[off + 1] + 1) * 8;
                if (off + hl > 40 + plen)
                    break;
                nh = ip[off];
                off += hl;
                continue;
            }
            if (nh == 44) { /* fragment: only a first fragment can be classified */
                if (off + 8 > 40 + plen)
                    break;
                if (rd16(ip + off + 2) & 0xfff8)
                    break;
                nh = ip[off];
                off += 8;
                continue;
            }
            if (nh == 51) { /* AH */
                size_t hl;
                if (off + 8 > 40 + plen)
                    break;
                hl = ((size_t)ip[off + 1] + 2) * 4;
                if (off + hl > 40 + plen)
                    break;
                nh = ip[off];
                off += hl;
                continue;
            }
            /* ESP and "no next header" hide the transport; anything else
             * is another IP protocol (judged as such below). */
            p->proto = (nh == 50 || nh == 59) ? -1 : nh;
            break;
        }
    } else {
        return 0;
    }
    p->k.family = (uint8_t)p->family;
    if (p->proto < 0)
        return 1;
    p->k.proto = (uint8_t)p->proto;
    p->l4 = l4;
    p->l4len = l4len;
    switch (p->proto) {
    case 6:
        if (l4len < 20) {
            p->proto = -1;
            return 1;
        }
        p->k.sport = (uint16_t)rd16(l4);
        p->k.dport = (uint16_t)rd16(l4 + 2);
        p->seq = rd32(l4 + 4);
        p->ack = rd32(l4 + 8);
        p->tflags = l4[13];
        break;
    case 17:
        if (l4len < 8) {
            p->proto = -1;
            return 1;
        }
        p->k.sport = (uint16_t)rd16(l4);
        p->k.dport = (uint16_t)rd16(l4 + 2);
        break;
    case 1:
    case 58:
        if (l4len < 8) {
            p->proto = -1;
            return 1;
        }
        p->icmp_echo = (p->proto == 1 && l4[0] == 8) || (p->proto == 58 && l4[0] == 128);
        if (p->icmp_echo) {
            p->k.sport = p->k.dport = (uint16_t)rd16(l4 + 4); /* the echo id */
            p->k.proto = 1; /* one proto for both families' echo flows */
        }
        break;
    default:
        break;
    }
    return 1;
}

/* ---- replies ---- */

/* Ethernet + IP header for a reply to p (addresses swapped), for a
 * payload of plen bytes of protocol proto; returns the IP header length. */
static size_t reply_hdr(uint8_t *out, const uint8_t *frame, const struct pkt *p, int proto,
                        size_t plen, const uint8_t *src_override)
{
    memcpy(out, frame + 6, 6);
    memcpy(out + 6, frame, 6);
    memcpy(out + 12, frame + 12, 2);
    if (p->family == 4) {
        uint8_t *ip = out + ETH_HLEN;
        memset(ip, 0, 20);
        ip[0] = 0x45;
        wr16(ip + 2, (unsigned)(20 + plen));
        ip[6] = 0x40; /* DF */
        ip[8] = 64;
        ip[9] = (uint8_t)proto;
        memcpy(ip + 12, src_override ? src_override : p->k.dst, 4);
        memcpy(ip + 16, p->k.src, 4);
        wr16(ip + 10, fold(sum16(ip, 20, 0)));
        return 20;
    } else {
        uint8_t *ip = out + ETH_HLEN;
        memset(ip, 0, 40);
        ip[0] = 0x60;
        wr16(ip + 4, (unsigned)plen);
        ip[6] = (uint8_t)proto;
        ip[7] = 64;
        memcpy(ip + 8, src_override ? src_override : p->k.dst, 16);
        memcpy(ip + 24, p->k.src, 16);
        return 40;
    }
}

/* The transport checksum over the pseudo-header of the IP header at ip. */
static uint16_t l4_csum(const uint8_t *ip, int family, int proto, const uint8_t *l4, size_t len)
{
    uint32_t sum = 0;
    if (family == 4)
        sum = sum16(ip + 12, 8, 0);
    else
        sum = sum16(ip + 8, 32, 0);
    sum += (uint32_t)proto + (uint32_t)len;
    sum = sum16(l4, len, sum);
    return fold(sum);
}

static void send_rst_to_ns(const uint8_t *frame, const struct pkt *p, nsnet_frame_fn to_ns,
                           void *opaque)
{
    uint8_t out[ETH_HLEN + 40 + 20];
    size_t ihl = reply_hdr(out, frame, p, 6, 20, NULL);
    uint8_t *ip = out + ETH_HLEN, *th = ip + ihl;
    size_t doff = (size_t)(p->l4[12] >> 4) * 4;
    size_t seglen = p->l4len > doff ? p->l4len - doff : 0;
    memset(th, 0, 20);
    wr16(th, p->k.dport);
    wr16(th + 2, p->k.sport);
    if (p->tflags & TH_ACK) {
        wr32(th + 4, p->ack);
        th[13] = TH_RST;
    } else {
        seglen += (p->tflags & TH_SYN ? 1 : 0) + (p->tflags & TH_FIN ? 1 : 0);
        wr32(th + 8, p->seq + (uint32_t)seglen);
        th[13] = TH_RST | TH_ACK;
    }
    th[12] = 5 << 4;
    wr16(th + 16, l4_csum(ip, p->family, 6, th, 20));
    to_ns(out, ETH_HLEN + ihl + 20, opaque);
}

/* A reset as if from the namespace, closing libslirp's side of a flow. */
static void send_rst_to_slirp(const uint8_t *frame, const struct pkt *p,
                              nsnet_frame_fn to_slirp, void *opaque)
{
    uint8_t out[ETH_HLEN + 40 + 20];
    size_t ihl = p->family == 4 ? 20 : 40;
    uint8_t *ip = out + ETH_HLEN, *th = ip + ihl;
    memcpy(out, frame, ETH_HLEN);
    memset(ip, 0, ihl);
    if (p->family == 4) {
        ip[0] = 0x45;
        wr16(ip + 2, 40);
        ip[8] = 64;
        ip[9] = 6;
        memcpy(ip + 12, p->k.src, 4);
        memcpy(ip + 16, p->k.dst, 4);
        wr16(ip + 10, fold(sum16(ip, 20, 0)));
    } else {
        ip[0] = 0x60;
        wr16(ip + 4, 20);
        ip[6] = 6;
        ip[7] = 64;
        memcpy(ip + 8, p->k.src, 16);
        memcpy(ip + 24, p->k.dst, 16);
    }
    memset(th, 0, 20);
    wr16(th, p->k.sport);
    wr16(th + 2, p->k.dport);
    wr32(th + 4, p->seq);
    th[12] = 5 << 4;
    th[13] = TH_RST;
    wr16(th + 16, l4_csum(ip, p->family, 6, th, 20));
    to_slirp(out, ETH_HLEN + ihl + 20, opaque);
}

/* ICMP destination unreachable, administratively prohibited. */
static void send_prohibited(const uint8_t *frame, const struct pkt *p, nsnet_frame_fn to_ns,
                            void *opaque)
{
    uint8_t out[ETH_HLEN + 40 + 8 + 512];
    size_t quote, ihl;
    uint8_t *ip, *ic;
    if (p->family == 4) {
        size_t oihl = (size_t)(p->l3[0] & 0x0f) * 4;
        quote = oihl + 8 < p->l3len ? oihl + 8 : p->l3len;
    } else {
        quote = p->l3len < 512 ? p->l3len : 512;
    }
    ihl = reply_hdr(out, frame, p, p->family == 4 ? 1 : 58, 8 + quote, NULL);
    ip = out + ETH_HLEN;
    ic = ip + ihl;
    memset(ic, 0, 8);
    if (p->family == 4) {
        ic[0] = 3;
        ic[1] = 13;
    } else {
        ic[0] = 1;
        ic[1] = 1;
    }
    memcpy(ic + 8, p->l3, quote);
    if (p->family == 4)
        wr16(ic + 2, fold(sum16(ic, 8 + quote, 0)));
    else
        wr16(ic + 2, l4_csum(ip, 6, 58, ic, 8 + quote));
    to_ns(out, ETH_HLEN + ihl + 8 + quote, opaque);
}

/* ---- DNS ---- */

/* Read a (possibly compressed) name at off in msg[0..len) into out
 * (lower case, dotted, no trailing dot).  Returns the offset after the
 * name in the original position, or 0 on error. */
static size_t dns_name(const uint8_t *msg, size_t len, size_t off, char *out, size_t outsz)
{
    size_t pos = off, after = 0, o = 0;
    int jumps = 0;
    for (;;) {
        unsigned l;
        if (pos >= len)
            return 0;
        l = msg[pos];
        if ((l & 0xc0) == 0xc0) {
            if (pos + 1 >= len || ++jumps > 16)
                return 0;
            if (!after)
                after = pos + 2;
            pos = ((l & 0x3f) << 8) | msg[pos + 1];
            continue;
        }
        if (l & 0xc0)
            return 0;
        if (l == 0) {
            if (!after)
                after = pos + 1;
            break;
        }
        if (pos + 1 + l > len || o + l + 2 > outsz)
            return 0;
        if (o)
            out[o++] = '.';
        {
            unsigned i;
            for (i = 0; i < l; i++) {
                uint8_t c = msg[pos + 1 + i];
                if (c == 0 || c == '.')
                    return 0; /* not a name a rule can match: refuse */
                out[o++] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
            }
        }
        pos += 1 + l;
    }
    out[o] = 0;
    return after;
}

/* The question name of a query; 0 when it is not one query with one
 * question. */
static int dns_qname(const uint8_t *msg, size_t len, char *out, size_t outsz, size_t *qend)
{
    size_t off;
    if (len < 12 || (msg[2] & 0x80) || rd16(msg + 4) != 1)
        return 0;
    off = dns_name(msg, len, 12, out, outsz);
    if (!off || off + 4 > len)
        return 0;
    *qend = off + 4;
    return 1;
}

/* Learn from an answer: every A/AAAA record whose owner is the question
 * name or reachable from it through the answer's CNAMEs, under the
 * question name and under the owner. */
static void dns_learn(struct nsnet_filter *f, const uint8_t *msg, size_t len)
{
    char qname[256], owner[256], target[256];
    char chain[8][256];
    int nchain = 0, pass;
    size_t qend, off, an, i;
    if (len < 12 || !(msg[2] & 0x80) || (msg[3] & 0x0f) != 0)
        return;
    if (rd16(msg + 4) != 1)
        return;
    off = dns_name(msg, len, 12, qname, sizeof(qname));
    if (!off || off + 4 > len || !qname[0])
        return;
    qend = off + 4;
    an = rd16(msg + 6);
    strcpy(chain[nchain++], qname);
    /* Two passes: CNAMEs may come in any order (up to 8 links). */
    for (pass = 0; pass < 2; pass++) {
        off = qend;
        for (i = 0; i < an; i++) {
            unsigned type, rdlen;
            uint32_t ttl;
            int k, known = 0;
            off = dns_name(msg, len, off, owner, sizeof(owner));
            if (!off || off + 10 > len)
                return;
            type = rd16(msg + off);
            ttl = rd32(msg + off + 4);
            rdlen = rd16(msg + off + 8);
            off += 10;
            if (off + rdlen > len)
                return;
            for (k = 0; k < nchain; k++)
                if (strcmp(chain[k], owner) == 0)
                    known = 1;
            if (type == 5 && known && pass == 0 && nchain < 8) {
                int dup = 0;
                if (!dns_name(msg, len, off, target, sizeof(target)))
                    return;
                for (k = 0; k < nchain; k++)
                    if (strcmp(chain[k], target) == 0)
                        dup = 1;
                if (!dup)
                    strcpy(chain[nchain++], target);
            } else if (pass == 1 && known && ((type == 1 && rdlen == 4) || (type == 28 && rdlen == 16))) {
                uint8_t a[16] = {0};
                int fam = type == 1 ? 4 : 6;
                memcpy(a, msg + off, rdlen);
                learn(f, fam, a, qname, ttl);
                if (strcmp(owner, qname) != 0)
                    learn(f, fam, a, owner, ttl);
            }
            off += rdlen;
        }
    }
}

static int is_dns_addr(const struct nsnet_filter *f, int family, const uint8_t *a)
{
    if (family == 4)
        return f->has_dns4 && memcmp(a, f->dns4, 4) == 0;
    return f->has_dns6 && memcmp(a, f->dns6, 16) == 0;
}

/* Answer a UDP query REFUSED (header and question copied). */
static void send_refused(const uint8_t *frame, const struct pkt *p, size_t qend,
                         nsnet_frame_fn to_ns, void *opaque)
{
    uint8_t out[ETH_HLEN + 40 + 8 + 12 + 260];
    const uint8_t *q = p->l4 + 8;
    size_t ihl, n = qend;
    uint8_t *ip, *uh, *m;
    if (n > 12 + 260)
        return;
    ihl = reply_hdr(out, frame, p, 17, 8 + n, NULL);
    ip = out + ETH_HLEN;
    uh = ip + ihl;
    m = uh + 8;
    memcpy(m, q, n);
    m[2] = (uint8_t)(0x80 | (q[2] & 0x79)); /* QR, opcode, RD */
    m[3] = 0x80 | 5;                        /* RA, REFUSED */
    wr16(m + 6, 0);
    wr16(m + 8, 0);
    wr16(m + 10, 0);
    wr16(uh, p->k.dport);
    wr16(uh + 2, p->k.sport);
    wr16(uh + 4, (unsigned)(8 + n));
    wr16(uh + 6, 0);
    {
        uint16_t c = l4_csum(ip, p->family, 17, uh, 8 + n);
        wr16(uh + 6, c ? c : 0xffff);
    }
    to_ns(out, ETH_HLEN + ihl + 8 + n, opaque);
}

/* Every DNS message in a TCP segment's payload (2-byte length prefixes)
 * asks a name the policy may let through.  Returns 1 yes, 0 no (or the
 * payload is not whole messages). */
static int tcp_dns_ok(struct nsnet_filter *f, const uint8_t *d, size_t len)
{
    size_t off = 0;
    while (off < len) {
        size_t mlen, qend;
        char name[256];
        if (off + 2 > len)
            return 0;
        mlen = rd16(d + off);
        off += 2;
        if (off + mlen > len)
            return 0;
        if (!dns_qname(d + off, mlen, name, sizeof(name), &qend) ||
            !nsnet_policy_name_allowed(f->pol, name))
            return 0;
        off += mlen;
    }
    return 1;
}

/* ---- the hooks ---- */

/* Without a policy only connection openings are tracked (so that a policy
 * set later knows which connections are inbound and which were
 * established before it): a cheap look at the TCP flags, or at the UDP
 * port of a published forward, before any parsing. */
static int worth_parsing_without_policy(const struct nsnet_filter *f, const uint8_t *frame,
                                        size_t len)
{
    const uint8_t *l4;
    int proto;
    if (len < ETH_HLEN + 40)
        return 0;
    if (frame[12] == 0x08 && frame[13] == 0x00) {
        size_t ihl = (size_t)(frame[ETH_HLEN] & 0x0f) * 4;
        if (ihl < 20 || len < ETH_HLEN + ihl + 20)
            return 0;
        proto = frame[ETH_HLEN + 9];
        l4 = frame + ETH_HLEN + ihl;
    } else if (frame[12] == 0x86 && frame[13] == 0xdd) {
        if (len < ETH_HLEN + 40 + 20)
            return 0;
        proto = frame[ETH_HLEN + 6];
        l4 = frame + ETH_HLEN + 40;
    } else {
        return 0;
    }
    if (proto == 6)
        return (l4[13] & (TH_SYN | TH_ACK)) == TH_SYN;
    if (proto == 17) {
        unsigned dport = rd16(l4 + 2);
        return (f->udp_fwd[dport / 8] >> (dport % 8)) & 1;
    }
    return 0;
}

static int deny_packet(struct nsnet_filter *f)
{
    f->st.packets_denied++;
    return 0;
}

static int rx_dns(struct nsnet_filter *f, uint8_t *frame, struct pkt *p, nsnet_frame_fn to_ns,
                  nsnet_frame_fn to_slirp, void *opaque)
{
    if (p->proto == 17) {
        char name[256];
        size_t qend = 0;
        const uint8_t *m = p->l4 + 8;
        size_t ulen = rd16(p->l4 + 4), mlen;
        if (ulen < 8 || ulen > p->l4len)
            return deny_packet(f);
        mlen = ulen - 8;
        if (dns_qname(m, mlen, name, sizeof(name), &qend) &&
            nsnet_policy_name_allowed(f->pol, name))
            return 1;
        f->st.dns_refused++;
        audit(f, &p->k, NSNET_POL_DENY, NSNET_POL_RULE_DNS, qend ? name : "");
        if (mlen >= 12 && !(m[2] & 0x80) && rd16(m + 4) == 1 && qend > 12)
            send_refused(frame, p, qend, to_ns, opaque);
        return deny_packet(f);
    } else {
        struct flow *fl = flow_find(f, &p->k);
        size_t doff = (size_t)(p->l4[12] >> 4) * 4;
        size_t dlen = p->l4len > doff ? p->l4len - doff : 0;
        if ((p->tflags & (TH_SYN | TH_ACK)) == TH_SYN) {
            fl = flow_insert(f, &p->k);
            fl->flags |= FL_DNS;
            fl->action = NSNET_POL_ALLOW;
            fl->rule = -1;
            fl->last_ms = mono_ms();
            fl->dns_next_seq = p->seq + 1;
            return 1;
        }
        if (!fl || !(fl->flags & FL_DNS)) {
            /* Not a connection nsnet saw open: libslirp resets it unless
             * it is one from before the policy; data is not let through. */
            return dlen ? deny_packet(f) : 1;
        }
        if (fl->action == NSNET_POL_DENY)
            goto cut;
        if (dlen == 0)
            return 1;
        /* In order only: a segment overlapping accepted data could
         * reframe the stream libslirp reassembles. */
        if ((int32_t)(p->seq + (uint32_t)dlen - fl->dns_next_seq) <= 0)
            return 1; /* old data again: libslirp drops it */
        if (p->seq != fl->dns_next_seq)
            return deny_packet(f);
        if (!tcp_dns_ok(f, p->l4 + doff, dlen)) {
            f->st.dns_refused++;
            audit(f, &p->k, NSNET_POL_DENY, NSNET_POL_RULE_DNS, "");
            fl->action = NSNET_POL_DENY;
            goto cut;
        }
        fl->dns_next_seq += (uint32_t)dlen;
        return 1;
    cut:
        if (!(p->tflags & TH_RST)) {
            send_rst_to_ns(frame, p, to_ns, opaque);
            send_rst_to_slirp(frame, p, to_slirp, opaque);
        }
        return deny_packet(f);
    }
}

int nsnet_filter_rx(struct nsnet_filter *f, uint8_t *frame, size_t len,
                    nsnet_frame_fn to_ns, nsnet_frame_fn to_slirp, void *opaque)
{
    struct pkt p;
    struct flow *fl;
    int32_t rule;
    const char *name;
    int action, deny_default;
    if (!f->pol) {
        /* Remember connections opened before any policy (TCP SYNs only). */
        if (worth_parsing_without_policy(f, frame, len) && parse(frame, len, &p) &&
            p.proto == 6) {
            fl = flow_insert(f, &p.k);
            fl->flags = FL_VALID;
            fl->action = NSNET_POL_ALLOW;
            fl->rule = -1;
            fl->last_ms = mono_ms();
        }
        return 1;
    }
    if (!parse(frame, len, &p))
        return 1;
    deny_default = nsnet_policy_default(f->pol) == NSNET_POL_DENY;
    if (p.proto < 0) {
        if (deny_default) {
            f->st.unclassified_denied++;
            return deny_packet(f);
        }
        return 1;
    }
    if (p.proto == 1 || p.proto == 58) {
        if (!p.icmp_echo)
            return 1; /* neighbour discovery, errors: not flows */
    } else if (p.proto != 6 && p.proto != 17) {
        if (deny_default) {
            f->st.unclassified_denied++;
            return deny_packet(f);
        }
        return 1; /* libslirp drops other protocols anyway */
    }
    if (p.proto == 17 && p.family == 4 && p.k.dport == 67 && p.k.sport == 68)
        return 1; /* DHCP: libslirp's own server */
    if ((p.proto == 17 || p.proto == 6) && p.k.dport == 53 && is_dns_addr(f, p.family, p.k.dst))
        return rx_dns(f, frame, &p, to_ns, to_slirp, opaque);

    fl = flow_find(f, &p.k);
    if (p.proto == 6) {
        if ((p.tflags & (TH_SYN | TH_ACK)) == TH_SYN) {
            /* Every SYN is judged afresh (learned names expire), even on
             * the 5-tuple of an earlier inbound connection: a SYN from
             * the namespace always opens an outbound one. */
            action = judge(f, &p.k, &rule, &name);
            fl = flow_insert(f, &p.k);
            fl->flags = FL_VALID;
            fl->action = (uint8_t)action;
            fl->rule = rule;
            fl->last_ms = mono_ms();
            audit(f, &p.k, action, rule, name);
            if (action == NSNET_POL_ALLOW)
                return 1;
            if (!(p.tflags & TH_RST))
                send_rst_to_ns(frame, &p, to_ns, opaque);
            return deny_packet(f);
        }
        if (fl && (fl->flags & FL_INBOUND))
            return 1;
        if (!fl) {
            /* A segment of a connection nsnet has not seen open (its entry
             * was evicted, or it is a stray libslirp will reset): judge it
             * now, like a SYN. */
            action = judge(f, &p.k, &rule, &name);
            fl = flow_insert(f, &p.k);
            fl->action = (uint8_t)action;
            fl->rule = rule;
            fl->last_ms = mono_ms();
            if (action == NSNET_POL_DENY)
                f->st.flows_cut++;
        }
        if (fl->action == NSNET_POL_ALLOW)
            return 1;
        if (!(p.tflags & TH_RST)) {
            send_rst_to_ns(frame, &p, to_ns, opaque);
            send_rst_to_slirp(frame, &p, to_slirp, opaque);
        }
        return deny_packet(f);
    }
    /* UDP and ICMP echo; replies of a published UDP port are inbound */
    if (fl && (fl->flags & FL_INBOUND))
        return 1;
    {
        int64_t now = mono_ms();
        if (!fl || now - fl->last_ms > FLOW_IDLE_MS) {
            action = judge(f, &p.k, &rule, &name);
            fl = flow_insert(f, &p.k);
            fl->action = (uint8_t)action;
            fl->rule = rule;
            audit(f, &p.k, action, rule, name);
        }
        fl->last_ms = now;
    }
    if (fl->action == NSNET_POL_ALLOW)
        return 1;
    send_prohibited(frame, &p, to_ns, opaque);
    return deny_packet(f);
}

void nsnet_filter_tx(struct nsnet_filter *f, const uint8_t *frame, size_t len)
{
    struct pkt p;
    struct flow_key rk;
    if (!f->pol && !worth_parsing_without_policy(f, frame, len))
        return;
    if (!parse((uint8_t *)frame, len, &p) || p.proto < 0)
        return;
    if (f->pol && p.proto == 17 && p.k.sport == 53 && is_dns_addr(f, p.family, p.k.src)) {
        size_t mlen = rd16(p.l4 + 4);
        if (mlen >= 8 && mlen <= p.l4len)
            dns_learn(f, p.l4 + 8, mlen - 8);
        return;
    }
    if (f->pol && p.proto == 6 && p.k.sport == 53 && is_dns_addr(f, p.family, p.k.src)) {
        size_t doff = (size_t)(p.l4[12] >> 4) * 4;
        size_t dlen = p.l4len > doff ? p.l4len - doff : 0;
        const uint8_t *d = p.l4 + doff;
        /* Best effort: messages that start at the segment's start. */
        while (dlen >= 2 && (size_t)rd16(d) + 2 <= dlen) {
            size_t m = rd16(d);
            dns_learn(f, d + 2, m);
            d += 2 + m;
            dlen -= 2 + m;
        }
        return;
    }
    /* The namespace's side of the flow this frame belongs to. */
    memset(&rk, 0, sizeof(rk));
    rk.family = p.k.family;
    rk.proto = p.k.proto;
    rk.sport = p.k.dport;
    rk.dport = p.k.sport;
    memcpy(rk.src, p.k.dst, 16);
    memcpy(rk.dst, p.k.src, 16);
    if (p.proto == 6 && (p.tflags & (TH_SYN | TH_ACK)) == TH_SYN) {
        /* libslirp opens a connection into the namespace: a port forward. */
        struct flow *fl = flow_insert(f, &rk);
        fl->flags |= FL_INBOUND;
        fl->action = NSNET_POL_ALLOW;
        fl->rule = -1;
        fl->last_ms = mono_ms();
    } else if (p.proto == 17 && (f->udp_fwd[p.k.dport / 8] & (1u << (p.k.dport % 8)))) {
        struct flow *fl = flow_find(f, &rk);
        if (!fl) {
            fl = flow_insert(f, &rk);
            fl->flags |= FL_INBOUND;
            fl->action = NSNET_POL_ALLOW;
            fl->rule = -1;
        }
        fl->last_ms = mono_ms();
    }
}
