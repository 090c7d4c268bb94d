/* Egress policy tables and the decision: see policy.h and nsnet/policy.py. */
#include "policy.h"

#include <stdlib.h>
#include <string.h>

struct pfx_group {
    uint8_t family;
    uint8_t plen;
    uint32_t start, end; /* into prefixes[] */
};

struct nsnet_policy {
    int dflt;
    uint32_t nrules, nprefixes, nnames, nindex, ngroups;
    struct nsnet_pol_rule *rules;
    struct nsnet_pol_prefix *prefixes;
    struct nsnet_pol_name *names;
    char *namebuf;
    uint32_t *index;
    struct pfx_group groups[2 * 129];
    uint32_t first_name_rule[8]; /* per proto bit: smallest index of a name rule */
};

#define NONE 0xffffffffu

static int pfx_cmp(const struct nsnet_pol_prefix *a, const struct nsnet_pol_prefix *b)
{
    if (a->family != b->family)
        return a->family < b->family ? -1 : 1;
    if (a->plen != b->plen)
        return a->plen < b->plen ? -1 : 1;
    return memcmp(a->addr, b->addr, 16);
}

static int name_cmp(const char *a, size_t alen, int asuf, const char *b, size_t blen, int bsuf)
{
    size_t n = alen < blen ? alen : blen;
    int c = memcmp(a, b, n);
    if (c)
        return c;
    if (alen != blen)
        return alen < blen ? -1 : 1;
    return asuf - bsuf;
}

static void mask_addr(uint8_t *out, const uint8_t *addr, int nbytes, int plen)
{
    int i;
    for (i = 0; i < 16; i++) {
        int bits = plen - 8 * i;
        uint8_t m = bits >= 8 ? 0xff : bits <= 0 ? 0 : (uint8_t)(0xff << (8 - bits));
        out[i] = i < nbytes ? (addr[i] & m) : 0;
    }
}

void nsnet_policy_free(struct nsnet_policy *p)
{
    if (!p)
        return;
    free(p->rules);
    free(p->prefixes);
    free(p->names);
    free(p->namebuf);
    free(p->index);
    free(p);
}

static void *dup_mem(const void *src, size_t n)
{
    void *d = malloc(n ? n : 1);
    if (d && n)
        memcpy(d, src, n);
    return d;
}

static int list_ok(const struct nsnet_policy *p, uint32_t first, uint32_t count)
{
    uint32_t i;
    if (count == 0 || first > p->nindex || count > p->nindex - first)
        return 0;
    for (i = 0; i < count; i++) {
        uint32_t v = p->index[first + i];
        if (v >= p->nrules)
            return 0;
        if (i && v <= p->index[first + i - 1])
            return 0;
    }
    return 1;
}

struct nsnet_policy *nsnet_policy_new(int dflt,
                                      const struct nsnet_pol_rule *rules, uint32_t nrules,
                                      const struct nsnet_pol_prefix *prefixes, uint32_t nprefixes,
                                      const struct nsnet_pol_name *names, uint32_t nnames,
                                      const char *namebuf, uint32_t namebuf_len,
                                      const uint32_t *index, uint32_t nindex)
{
    struct nsnet_policy *p = calloc(1, sizeof(*p));
    uint32_t i, b;
    if (!p)
        return NULL;
    if (dflt != NSNET_POL_ALLOW && dflt != NSNET_POL_DENY)
        goto bad;
    p->dflt = dflt;
    p->nrules = nrules;
    p->nprefixes = nprefixes;
    p->nnames = nnames;
    p->nindex = nindex;
    p->rules = dup_mem(rules, (size_t)nrules * sizeof(*rules));
    p->prefixes = dup_mem(prefixes, (size_t)nprefixes * sizeof(*prefixes));
    p->names = dup_mem(names, (size_t)nnames * sizeof(*names));
    p->namebuf = dup_mem(namebuf, namebuf_len);
    p->index = dup_mem(index, (size_t)nindex * sizeof(*index));
    if (!p->rules || !p->prefixes || !p->names || !p->namebuf || !p->index)
        goto bad;
    for (i = 0; i < nrules; i++) {
        if (rules[i].action > NSNET_POL_DENY || rules[i].protos == 0 || rules[i].protos > 7 ||
            rules[i].port_lo > rules[i].port_hi)
            goto bad;
    }
    for (i = 0; i < nprefixes; i++) {
        const struct nsnet_pol_prefix *x = &p->prefixes[i];
        uint8_t m[16];
        int nb = x->family == 4 ? 4 : 16;
        if ((x->family != 4 && x->family != 6) || x->plen > nb * 8)
            goto bad;
        mask_addr(m, x->addr, nb, x->plen);
        if (memcmp(m, x->addr, 16) != 0)
            goto bad; /* host bits set, or bytes past an IPv4 address */
        if (i && pfx_cmp(&p->prefixes[i - 1], x) >= 0)
            goto bad;
        if (!list_ok(p, x->first, x->count))
            goto bad;
        if (!p->ngroups || p->groups[p->ngroups - 1].family != x->family ||
            p->groups[p->ngroups - 1].plen != x->plen) {
            p->groups[p->ngroups].family = x->family;
            p->groups[p->ngroups].plen = x->plen;
            p->groups[p->ngroups].start = i;
            p->ngroups++;
        }
        p->groups[p->ngroups - 1].end = i + 1;
    }
    for (b = 0; b < 8; b++)
        p->first_name_rule[b] = NONE;
    for (i = 0; i < nnames; i++) {
        const struct nsnet_pol_name *x = &p->names[i];
        uint32_t k;
        if (x->len == 0 || x->off > namebuf_len || x->len > namebuf_len - x->off)
            goto bad;
        if (x->suffix > 1)
            goto bad;
        if (i) {
            const struct nsnet_pol_name *y = &p->names[i - 1];
            if (name_cmp(p->namebuf + y->off, y->len, y->suffix,
                         p->namebuf + x->off, x->len, x->suffix) >= 0)
                goto bad;
        }
        if (!list_ok(p, x->first, x->count))
            goto bad;
        for (k = 0; k < x->count; k++) {
            uint32_t r = p->index[x->first + k];
            for (b = 1; b <= 4; b <<= 1)
                if ((p->rules[r].protos & b) && r < p->first_name_rule[b])
                    p->first_name_rule[b] = r;
        }
    }
    return p;
bad:
    nsnet_policy_free(p);
    return NULL;
}

int nsnet_policy_default(const struct nsnet_policy *p)
{
    return p->dflt;
}

int nsnet_policy_has_names(const struct nsnet_policy *p)
{
    return p->nnames > 0;
}

/* The smallest index below best in the list whose rule matches. */
static uint32_t first_match(const struct nsnet_policy *p, uint32_t first, uint32_t count,
                            int proto, unsigned port, uint32_t best)
{
    uint32_t i;
    for (i = 0; i < count; i++) {
        uint32_t r = p->index[first + i];
        const struct nsnet_pol_rule *x;
        if (r >= best)
            break;
        x = &p->rules[r];
        if ((x->protos & proto) && port >= x->port_lo && port <= x->port_hi)
            return r;
    }
    return best;
}

static const struct nsnet_pol_name *find_name(const struct nsnet_policy *p, const char *s,
                                              size_t len, int suffix)
{
    uint32_t lo = 0, hi = p->nnames;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const struct nsnet_pol_name *x = &p->names[mid];
        int c = name_cmp(p->namebuf + x->off, x->len, x->suffix, s, len, suffix);
        if (c == 0)
            return x;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static uint32_t name_best(const struct nsnet_policy *p, const char *name, int proto,
                          unsigned port, uint32_t best)
{
    size_t len = strlen(name), i;
    const struct nsnet_pol_name *x;
    if (!p->nnames || len == 0)
        return best;
    x = find_name(p, name, len, 0);
    if (x)
        best = first_match(p, x->first, x->count, proto, port, best);
    for (i = 0; i < len; i++) {
        if (name[i] == '.' && i + 1 < len) {
            x = find_name(p, name + i + 1, len - i - 1, 1);
            if (x)
                best = first_match(p, x->first, x->count, proto, port, best);
        }
    }
    return best;
}

int nsnet_policy_decide(const struct nsnet_policy *p, int proto, int family,
                        const uint8_t *addr, unsigned port,
                        const char *const *names, int nnames, int32_t *rule)
{
    uint32_t best = NONE, g;
    int nb = family == 4 ? 4 : 16, i;
    for (g = 0; g < p->ngroups; g++) {
        const struct pfx_group *gr = &p->groups[g];
        uint8_t m[16];
        uint32_t lo, hi;
        if (gr->family != family)
            continue;
        mask_addr(m, addr, nb, gr->plen);
        lo = gr->start;
        hi = gr->end;
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            int c = memcmp(p->prefixes[mid].addr, m, 16);
            if (c == 0) {
                best = first_match(p, p->prefixes[mid].first, p->prefixes[mid].count,
                                   proto, port, best);
                break;
            }
            if (c < 0)
                lo = mid + 1;
            else
                hi = mid;
        }
    }
    for (i = 0; i < nnames; i++)
        best = name_best(p, names[i], proto, port, best);
    if (best == NONE) {
        *rule = -1;
        return p->dflt;
    }
    *rule = (int32_t)best;
    return p->rules[best].action;
}

int nsnet_policy_decide_v(const struct nsnet_policy *p, int proto, int family,
                          const uint8_t *addr, unsigned port, const char *names,
                          int32_t *rule)
{
    const char *v[16];
    int n = 0;
    while (names && *names && n < 16) {
        v[n++] = names;
        names += strlen(names) + 1;
    }
    return nsnet_policy_decide(p, proto, family, addr, port, v, n, rule);
}

int nsnet_policy_name_allowed(const struct nsnet_policy *p, const char *name)
{
    /* Walk the matching name rules in order: collect the lists, then take
     * the smallest unseen index each round (lists are short). */
    const struct nsnet_pol_name *lists[64];
    uint32_t pos[64];
    size_t len = strlen(name), i;
    int n = 0, k;
    const struct nsnet_pol_name *x;
    if (len == 0)
        return p->dflt == NSNET_POL_ALLOW;
    x = find_name(p, name, len, 0);
    if (x)
        lists[n++] = x;
    for (i = 0; i < len && n < 64; i++) {
        if (name[i] == '.' && i + 1 < len) {
            x = find_name(p, name + i + 1, len - i - 1, 1);
            if (x)
                lists[n++] = x;
        }
    }
    for (k = 0; k < n; k++)
        pos[k] = 0;
    for (;;) {
        uint32_t best = NONE;
        int bk = -1;
        const struct nsnet_pol_rule *r;
        for (k = 0; k < n; k++) {
            if (pos[k] < lists[k]->count) {
                uint32_t v = p->index[lists[k]->first + pos[k]];
                if (v < best) {
                    best = v;
                    bk = k;
                }
            }
        }
        if (bk < 0)
            break;
        pos[bk]++;
        r = &p->rules[best];
        if (r->action == NSNET_POL_ALLOW)
            return 1;
        if (r->protos == 7 && r->port_lo == 0 && r->port_hi == 65535)
            return 0;
    }
    return p->dflt == NSNET_POL_ALLOW;
}
