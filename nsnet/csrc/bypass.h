/* nsnet socket bypass: the seccomp user-notification handler (bypass.c).
 * The Python side (nsnet/host/bypass.py) fills struct nsb_config, maps a
 * struct nsb_shared shared with the supervisor (counters, in-flight ids)
 * and calls nsb_run() in a process of its own. */
#ifndef NSNET_BYPASS_H
#define NSNET_BYPASS_H

#include <stdint.h>

#define NSB_SLOTS 256 /* notifications the handler may hold at once */
#define NSB_CONNS 16384 /* bypassed connections whose bytes are tracked at once */

/* nsb_shared.bytes_mode: how the bytes of bypassed connections are known
 * (csrc/bypassdiag.c); 0: they are not counted */
#define NSB_BYTES_AT_CLOSE 1 /* final counts from the kernel's destroy notifications */
#define NSB_BYTES_SAMPLED 2  /* no notifications: each one's last sample (1 s);
                              * the default (--bypass-bytes=sampled) */

/* nsb_config.flags */
#define NSB_GATEWAY 1 /* gateway alias -> host loopback (bound to lo) */
#define NSB_EGRESS 2  /* other non-namespace destinations -> as they are */
#define NSB_IPV6 4    /* the namespace has IPv6 (fd00::/64) */
#define NSB_OUT4 8    /* egress: bind outbound4 first */
#define NSB_OUT6 16   /* egress: bind outbound6 first */
#define NSB_GUEST6 32 /* guest6 is known (getsockname translation) */

/* nsb_shared.audit: which decisions go to the egress policy's audit log */
#define NSB_AUDIT_DENY 1 /* connects the handler refuses itself */
#define NSB_AUDIT_ALL 2  /* ... and the connects it bypasses (--audit=all) */
/* Audit records a second, burst NSB_AUDIT_BURST: as the forwarder's
 * (csrc/filter.c); the rest are counted in audit_lost. */
#define NSB_AUDIT_RATE 500
#define NSB_AUDIT_BURST 1024

/* One audit record on the handler's audit socket (SOCK_STREAM, a sequence
 * of these; nsnet/proto/bypass.py checks them).  Addresses and ports are
 * the namespace's view: the command's address and the host socket's port,
 * the address the command connected to. */
struct nsb_audit {
    int64_t time_ms;        /* CLOCK_REALTIME */
    uint8_t family;         /* 4 or 6 */
    uint8_t action;         /* 0: allowed (bypassed), 1: denied by the handler */
    uint16_t sport, dport;  /* host byte order */
    uint8_t pad[2];
    uint8_t src[16], dst[16];
};

struct nsb_config {
    uint32_t flags;
    uint8_t net4[4];     /* the namespace's IPv4 network */
    uint8_t mask4[4];
    uint8_t gw4[4];      /* gateway alias, e.g. 10.0.2.2 */
    uint8_t guest4[4];   /* the command's address, e.g. 10.0.2.100 */
    uint8_t outbound4[4];
    uint8_t prefix6[16]; /* the namespace's /64 */
    uint8_t gw6[16];
    uint8_t guest6[16];
    uint8_t outbound6[16];
    uint64_t ns_cookie;  /* SO_NETNS_COOKIE of the command's netns */
    int32_t def_sndbuf;  /* SO_SNDBUF/SO_RCVBUF of a fresh socket there */
    int32_t def_rcvbuf;
    int32_t nr_connect, nr_getsockname, nr_getpeername;
    int32_t audit_fd;    /* where audit records go (struct nsb_audit), or -1 */
    uint32_t audit_arch; /* AUDIT_ARCH_* of those numbers: notifications of
                          * another ABI (an OCI profile may list several)
                          * are let through */
    int32_t diag_fd;     /* --bypass-bytes=at-close: a socket subscribed to the
                          * TCP destroy notifications (nsb_diag_subscribe), the
                          * handler's; -1: sampled, nothing subscribed */
    const void *filter;  /* --enable-seccomp: the handler's allowlist, a BPF
                          * program (struct sock_filter[filter_len], built by
                          * nsnet/seccomp.py, profile "bypass"), loaded by
                          * nsb_run after its set-up; NULL: none */
    uint32_t filter_len;
};

/* A tracked connection's addresses, for a sock_diag lookup (network
 * order); family 0: not known. */
struct nsb_key {
    uint32_t src[4], dst[4];
    uint16_t sport, dport;
    uint8_t family;
    uint8_t pad[3];
};

/* A tracked bypassed connection (nsb_shared.conns): its socket cookie (0:
 * a free slot), its counts at the last sample, its addresses. */
struct nsb_conn {
    uint64_t cookie;
    uint64_t sent, received;
    struct nsb_key key; /* written before the cookie is published */
};

/* Shared with the supervisor (MAP_SHARED): plain counters, written by the
 * handler only (but `scope`); inflight[] holds the ids of notifications received and
 * not yet answered, so that a replacement handler can answer them. */
struct nsb_shared {
    uint64_t notifications; /* every notification received */
    uint64_t bypassed;      /* connects answered with a host socket */
    uint64_t bypassed6;     /* ... of them IPv6 */
    uint64_t failed;        /* bypassed connects that failed (errno to the caller) */
    uint64_t fallback;      /* connects let through to the namespace (libslirp path) */
    uint64_t translated;    /* getsockname/getpeername answered with the namespace's view */
    uint64_t aborted;       /* in-flight ids a previous handler left, answered ECONNABORTED */
    uint64_t errors;        /* handler-side failures (pidfd_getfd, socket, ...) */
    uint64_t pending;       /* blocking connects waiting now */
    uint64_t scope;         /* NSB_GATEWAY|NSB_EGRESS allowed now: written by the
                             * supervisor (the policy can change at run time) */
    uint64_t audit;         /* NSB_AUDIT_*: written by the supervisor */
    uint64_t audit_lost;    /* audit records over the rate, or the socket was full */
    uint64_t bytes_sent;    /* bytes of the tracked connections that are gone */
    uint64_t bytes_received;
    uint64_t bytes_inexact; /* ... of them counted with their last sample */
    uint64_t bytes_untracked; /* bypassed connections not tracked (table full) */
    uint64_t bytes_mode;    /* NSB_BYTES_*, set by the handler */
    uint64_t bytes_samples; /* the handler's samples of the live connections */
    uint64_t bytes_dumps;   /* of them, dumps of the host's TCP sockets (not lookups) */
    uint64_t sync_wakeup;   /* 1: the listener has SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP */
    uint64_t inflight[NSB_SLOTS];
    struct nsb_conn conns[NSB_CONNS]; /* written by the handler only */
};

/* 0 if this kernel can do what the handler needs on `listener`, else an
 * errno: EINVAL for no SECCOMP_ADDFD_FLAG_SEND (< 5.14), ENOTTY no ADDFD. */
int nsb_probe(int listener);
/* Runs until the listener hangs up (every task of the command is gone):
 * returns 0, or -errno on a fatal error. */
int nsb_run(int listener, const struct nsb_config *cfg, struct nsb_shared *sh);
/* Load a seccomp filter (BPF, n instructions) on every thread of this
 * process (SECCOMP_FILTER_FLAG_TSYNC), with PR_SET_NO_NEW_PRIVS: 0 or
 * -errno (-ESRCH: a thread could not take it). */
int nsb_load_filter(const void *prog, uint32_t n);

/* csrc/bypassdiag.c.  In the handler: start tracking (a thread; nl: its
 * nsb_config.diag_fd); track one installed host socket.  In the
 * supervisor: subscribe a socket to the TCP destroy notifications for a
 * handler (the fd, or -errno); the bytes now (out[0] sent, out[1]
 * received, out[2] live tracked connections, out[3] 1 if it walked all the
 * host's TCP sockets); 0 or -errno. */
int nsb_diag_subscribe(void);
void nsb_diag_start(struct nsb_shared *sh, int nl);
struct sockaddr_storage;
void nsb_diag_track(int sock, const struct sockaddr_storage *peer);
int nsb_sample(struct nsb_shared *sh, uint64_t *out);

#endif
