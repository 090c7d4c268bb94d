/* Egress policy in the data path (see nsnet/policy.py for the model).
 *
 * Python compiles the rules (Policy.compile) into the flat tables below;
 * nsnet_policy_new copies and checks them.  The lookup is the same as
 * Python's: every table entry lists the ascending indices of the rules
 * with that destination; the decision is the smallest index whose proto
 * and ports match, across the address prefixes containing the address and
 * the names learned for it (exact names and their parent suffixes), else
 * the default.  tests/unit/test_policy_vectors.py runs shared vectors
 * through both. */
#ifndef NSNET_POLICY_H
#define NSNET_POLICY_H

#include <stdint.h>
#include <stddef.h>

#define NSNET_POL_ALLOW 0
#define NSNET_POL_DENY 1
#define NSNET_POL_TCP 1
#define NSNET_POL_UDP 2
#define NSNET_POL_ICMP 4
/* The rule of an audit record for a DNS query refused by name. */
#define NSNET_POL_RULE_DNS (-2)

struct nsnet_pol_rule {
    uint8_t action;  /* NSNET_POL_ALLOW / NSNET_POL_DENY */
    uint8_t protos;  /* NSNET_POL_TCP | ... */
    uint16_t port_lo;
    uint16_t port_hi;
};

struct nsnet_pol_prefix {
    uint8_t family;  /* 4 or 6 */
    uint8_t plen;
    uint8_t addr[16]; /* network order; IPv4 in the first 4 bytes */
    uint32_t first;   /* into index[] */
    uint32_t count;
};

struct nsnet_pol_name {
    uint32_t off;     /* into namebuf */
    uint16_t len;
    uint8_t suffix;   /* 1: "*.name" */
    uint32_t first;   /* into index[] */
    uint32_t count;
};

struct nsnet_policy;

/* Copy and check the tables; NULL when they are inconsistent (prefixes
 * not sorted by family, plen, address; names not sorted; an index out of
 * range or not ascending within its list) or memory is short. */
struct nsnet_policy *nsnet_policy_new(int dflt,
                                      const struct nsnet_pol_rule *rules, uint32_t nrules,
                                      const struct nsnet_pol_prefix *prefixes, uint32_t nprefixes,
                                      const struct nsnet_pol_name *names, uint32_t nnames,
                                      const char *namebuf, uint32_t namebuf_len,
                                      const uint32_t *index, uint32_t nindex);
void nsnet_policy_free(struct nsnet_policy *p);
int nsnet_policy_default(const struct nsnet_policy *p);
int nsnet_policy_has_names(const struct nsnet_policy *p);

/* The decision for proto (one NSNET_POL_* bit) to addr (4 or 16 bytes,
 * family 4 or 6), port, with the DNS names learned for addr (names[i],
 * lower case, no trailing dot).  Returns NSNET_POL_ALLOW or _DENY and sets
 * *rule to the deciding rule's index, or -1 for the default. */
int nsnet_policy_decide(const struct nsnet_policy *p, int proto, int family,
                        const uint8_t *addr, unsigned port,
                        const char *const *names, int nnames, int32_t *rule);
/* Test hook: names as one buffer of NUL-terminated names ("" ends it). */
int nsnet_policy_decide_v(const struct nsnet_policy *p, int proto, int family,
                          const uint8_t *addr, unsigned port, const char *names,
                          int32_t *rule);
/* Whether a DNS query for name may be forwarded (see
 * Policy.name_could_be_allowed). */
int nsnet_policy_name_allowed(const struct nsnet_policy *p, const char *name);

/* ---- enforcement in the data path (filter.c) ---- */

/* One audit record: a flow decision (denied ones always; allowed ones
 * with audit_all). */
struct nsnet_pol_event {
    int64_t time_ms;  /* CLOCK_REALTIME */
    uint8_t family, proto, action, pad;
    int32_t rule;     /* -1: the default */
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
    char name[256];   /* the learned DNS name that decided, or "" */
};

struct nsnet_filter_stats {
    uint64_t flows_allowed;
    uint64_t flows_denied;
    uint64_t packets_denied;    /* dropped by the policy (denied flows' packets) */
    uint64_t unclassified_denied; /* raw protocols, unwalkable IPv6 */
    uint64_t flows_cut;         /* established flows cut after set_policy */
    uint64_t dns_refused;       /* queries answered REFUSED by nsnet */
    uint64_t dns_learned;       /* addresses learned from DNS answers */
    uint64_t audit_lost;        /* audit records the ring had no room for */
};

struct nsnet_filter;
typedef void (*nsnet_frame_fn)(const uint8_t *frame, size_t len, void *opaque);

struct nsnet_filter *nsnet_filter_new(void);
void nsnet_filter_free(struct nsnet_filter *f);
/* The DNS forwarder's addresses (IPv4 4 bytes, IPv6 16; NULL: none). */
void nsnet_filter_set_dns(struct nsnet_filter *f, const uint8_t *dns4, const uint8_t *dns6);
/* Replace the policy (the filter takes ownership; NULL: no policy, every
 * frame passes untouched).  keep_established 0: every cached flow is
 * judged again by the new policy now, and those it denies are cut (TCP:
 * a reset to both ends on their next segment). */
void nsnet_filter_set_policy(struct nsnet_filter *f, struct nsnet_policy *p,
                             int keep_established, int audit_all);
/* A UDP port forward to guest port `port` was added (on=1) or removed. */
void nsnet_filter_set_udp_forward(struct nsnet_filter *f, unsigned port, int on);
/* A frame from the namespace, already checked by nsnet_frame_check:
 * returns 1 to give it to libslirp, 0 to drop it.  Replies (resets, ICMP
 * errors, DNS REFUSED) go to to_ns; resets that close libslirp's side of a
 * cut flow go to to_slirp. */
int nsnet_filter_rx(struct nsnet_filter *f, uint8_t *frame, size_t len,
                    nsnet_frame_fn to_ns, nsnet_frame_fn to_slirp, void *opaque);
/* A frame libslirp sends to the namespace (inbound flows; DNS answers). */
void nsnet_filter_tx(struct nsnet_filter *f, const uint8_t *frame, size_t len);
void nsnet_filter_get_stats(struct nsnet_filter *f, struct nsnet_filter_stats *out);
/* Pop up to max audit records into out; returns how many. */
int nsnet_filter_audit_pop(struct nsnet_filter *f, struct nsnet_pol_event *out, int max);
int nsnet_filter_audit_pending(struct nsnet_filter *f);
/* The name learned for addr (family 4/6), "" if none; for tests and audit. */
const char *nsnet_filter_learned(struct nsnet_filter *f, int family, const uint8_t *addr);

#endif
