/* nsnet socket bypass: the bytes of bypassed connections (get_stats).
 *
 * A bypassed connection is the command's own socket of the host's network
 * namespace; its bytes never pass nsnet, and the handler keeps no copy of
 * it (a copy would keep the connection open after the command closes it).
 * What the kernel counts for it is read through sock_diag, by socket
 * cookie (SO_COOKIE, taken when the handler installs the socket):
 *   - with --bypass-bytes=at-close, the handler's tracking thread reads
 *     the kernel's TCP destroy notifications (SKNLGRP_INET{,6}_TCP_DESTROY,
 *     a socket the supervisor subscribed: nsb_diag_subscribe), which carry
 *     the socket's tcp_info when it is freed: a tracked connection's final
 *     counts go to nsb_shared.bytes_sent/bytes_received then.  Not by
 *     default (sampled): while anyone subscribes, the kernel builds a
 *     notification for every TCP socket of the namespace it frees;
 *   - get_stats (the supervisor, nsb_sample) reads the live tracked
 *     connections' tcp_info (inet_diag, INET_DIAG_INFO) and adds them;
 *   - the thread also samples every SAMPLE_MS while connections are
 *     tracked (every FALLBACK_MS without a subscription), keeping each
 *     one's last counts in the shared table: a connection whose
 *     destruction was not seen (no subscription, notifications lost to a
 *     full socket buffer, a restarted handler) is counted with those, and
 *     counted in bytes_inexact.
 * Both read up to LOOKUP_MAX live connections by looking each one up by
 * its addresses and cookie (kept in the shared table beside the cookie);
 * more, by a dump of all the host's TCP sockets.
 * Sent: tcpi_bytes_acked less 1 for the SYN (data the peer acknowledged,
 * plus 1 once it acknowledged our FIN); received: tcpi_bytes_received
 * (data received in order, plus 1 for the peer's FIN).  Nothing here is
 * on the connect path but nsb_diag_track(): one getsockopt, one
 * getsockname, one mutex.
 */
#define _GNU_SOURCE
#include "bypass.h"

#include <errno.h>
#include <arpa/inet.h>
#include <linux/filter.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif
#ifndef SOL_NETLINK
#define SOL_NETLINK 270
#endif
/* offsetof(struct tcp_info, tcpi_bytes_acked / tcpi_bytes_received) in
 * linux/tcp.h (Linux 4.1+); glibc's netinet/tcp.h stops before them. */
#define TCPI_BYTES_ACKED 120
#define TCPI_BYTES_RECEIVED 128
#define SAMPLE_MS 5000
#define FALLBACK_MS 1000
#define BATCH_MS 5
#define BATCH 32     /* notifications per recvmmsg */
#define MSGMAX 2048  /* room for one (a destroy notification is ~400 bytes) */
#define HSIZE (2 * NSB_CONNS) /* open addressing, at most half full */
/* Up to this many tracked connections, a sample looks each one up (one
 * request each, LOOKUP_BATCH to a send): a dump walks the machine's whole TCP
 * hash table whatever the namespace holds (3-13 ms per dump with no other
 * socket in the namespace, 64 ms with 18,000, on the 2-core test VM: 0.7%
 * of a CPU for one idle bypassed connection, sampled every second), a
 * lookup is one hash probe (4 us).  More connections, or one whose
 * addresses are not known (installed still connecting after SO_SNDTIMEO
 * ran out), and a sample dumps. */
#define LOOKUP_MAX 512
#define LOOKUP_BATCH 64
/* LOOPBACK_IFINDEX: a lookup for this interface finds a socket bound to lo
 * (the gateway's) as well as an unbound one (an outside address's) */
#define LO_IFINDEX 1
/* TCP states worth dumping: not LISTEN (10), TIME_WAIT (6, no tcp_info),
 * NEW_SYN_RECV (12) */
#define DUMP_STATES (0xfff & ~((1u << 10) | (1u << 6) | (1u << 12)))

/* ------------------------------------------------------------------------ */
/* Walking the host's TCP sockets */

typedef void (*diag_fn)(void *ctx, uint64_t cookie, uint64_t sent, uint64_t received);

/* One message of a dump or a destroy notification: fn(cookie, counts). */
static void diag_msg(const struct nlmsghdr *nh, diag_fn fn, void *ctx)
{
    if (nh->nlmsg_type != SOCK_DIAG_BY_FAMILY ||
        nh->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg)))
        return;
    const struct inet_diag_msg *m = NLMSG_DATA(nh);
    uint64_t cookie = m->id.idiag_cookie[0] | (uint64_t)m->id.idiag_cookie[1] << 32;
    int len = (int)(nh->nlmsg_len - NLMSG_LENGTH(sizeof *m));
    for (const struct rtattr *a = (const struct rtattr *)(m + 1); RTA_OK(a, len);
         a = RTA_NEXT(a, len)) {
        if (a->rta_type != INET_DIAG_INFO || RTA_PAYLOAD(a) < TCPI_BYTES_RECEIVED + 8)
            continue;
        uint64_t acked, received;
        memcpy(&acked, (const char *)RTA_DATA(a) + TCPI_BYTES_ACKED, 8);
        memcpy(&received, (const char *)RTA_DATA(a) + TCPI_BYTES_RECEIVED, 8);
        fn(ctx, cookie, acked ? acked - 1 : 0, received);
        return;
    }
}

/* Every TCP socket of this network namespace (IPv4, IPv6) with its counts:
 * 0, or -errno. */
static int diag_dump(diag_fn fn, void *ctx)
{
    int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (s < 0)
        return -errno;
    struct timeval tv = {2, 0}; /* the kernel answers at once; never hang */
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    static const int fams[] = {AF_INET, AF_INET6};
    int rc = 0;
    char *buf = malloc(32768);
    if (!buf) {
        close(s);
        return -ENOMEM;
    }
    for (unsigned f = 0; f < 2 && rc == 0; f++) {
        struct {
            struct nlmsghdr nh;
            struct inet_diag_req_v2 r;
        } req;
        memset(&req, 0, sizeof req);
        req.nh.nlmsg_len = sizeof req;
        req.nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
        req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
        req.r.sdiag_family = (uint8_t)fams[f];
        req.r.sdiag_protocol = IPPROTO_TCP;
        req.r.idiag_ext = 1 << (INET_DIAG_INFO - 1);
        req.r.idiag_states = DUMP_STATES;
        if (send(s, &req, sizeof req, 0) < 0) {
            rc = -errno;
            break;
        }
        for (int done = 0; !done;) {
            ssize_t n = recv(s, buf, 32768, 0);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                rc = -errno;
                break;
            }
            int left = (int)n;
            for (struct nlmsghdr *nh = (struct nlmsghdr *)buf; NLMSG_OK(nh, left);
                 nh = NLMSG_NEXT(nh, left)) {
                if (nh->nlmsg_type == NLMSG_DONE) {
                    done = 1;
                    break;
                }
                if (nh->nlmsg_type == NLMSG_ERROR) {
                    const struct nlmsgerr *e = NLMSG_DATA(nh);
                    rc = e->error ? e->error : -EPROTO;
                    done = 1;
                    break;
                }
                diag_msg(nh, fn, ctx);
            }
            if (n == 0)
                done = 1;
        }
        if (rc == -ENOENT && fams[f] == AF_INET6)
            rc = 0; /* no IPv6 */
    }
    free(buf);
    close(s);
    return rc;
}

/* One request per live connection in one message batch, the answers read
 * back (a diag message, or an error: ENOENT, ESTALE when the cookie is
 * another socket's now): fn(cookie, counts) for each found with counts
 * (not TIME_WAIT, which has none: gone).  0, or -errno. */
static int read_answers(int s, char *buf, uint32_t n, diag_fn fn, void *ctx);

static int diag_lookup(const struct nsb_key *keys, const uint64_t *cookies, uint32_t n,
                       diag_fn fn, void *ctx)
{
    struct req {
        struct nlmsghdr nh;
        struct inet_diag_req_v2 r;
    };
    int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (s < 0)
        return -errno;
    struct timeval tv = {2, 0}; /* the kernel answers at once; never hang */
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct req *reqs = calloc(n, sizeof *reqs);
    char *buf = malloc(32768);
    int rc = 0;
    if (!reqs || !buf) {
        rc = -ENOMEM;
        goto out;
    }
    for (uint32_t k = 0; k < n; k++) {
        struct req *q = &reqs[k];
        q->nh.nlmsg_len = sizeof *q;
        q->nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
        q->nh.nlmsg_flags = NLM_F_REQUEST;
        q->nh.nlmsg_seq = k + 1;
        q->r.sdiag_family = keys[k].family;
        q->r.sdiag_protocol = IPPROTO_TCP;
        q->r.idiag_ext = 1 << (INET_DIAG_INFO - 1);
        q->r.idiag_states = 0xfff;
        q->r.id.idiag_sport = keys[k].sport;
        q->r.id.idiag_dport = keys[k].dport;
        memcpy(q->r.id.idiag_src, keys[k].src, 16);
        memcpy(q->r.id.idiag_dst, keys[k].dst, 16);
        q->r.id.idiag_if = LO_IFINDEX;
        q->r.id.idiag_cookie[0] = (uint32_t)cookies[k];
        q->r.id.idiag_cookie[1] = (uint32_t)(cookies[k] >> 32);
    }
    /* LOOKUP_BATCH requests a send: their answers (~250 bytes each) fit
     * the socket's receive buffer, none is dropped */
    for (uint32_t first = 0; first < n && rc == 0; first += LOOKUP_BATCH) {
        uint32_t m = n - first < LOOKUP_BATCH ? n - first : LOOKUP_BATCH;
        if (send(s, reqs + first, m * sizeof *reqs, 0) < 0) {
            rc = -errno;
            break;
        }
        rc = read_answers(s, buf, m, fn, ctx);
    }
out:
    free(reqs);
    free(buf);
    close(s);
    return rc;
}

/* The answers to n lookups: fn() for each found; 0, or -errno. */
static int read_answers(int s, char *buf, uint32_t n, diag_fn fn, void *ctx)
{
    int rc = 0;
    for (uint32_t answers = 0; answers < n && rc == 0;) {
        ssize_t got = recv(s, buf, 32768, 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        if (got == 0) {
            rc = -EPROTO;
            break;
        }
        int left = (int)got;
        for (struct nlmsghdr *nh = (struct nlmsghdr *)buf; NLMSG_OK(nh, left);
             nh = NLMSG_NEXT(nh, left)) {
            answers++;
            if (nh->nlmsg_type == NLMSG_ERROR) {
                const struct nlmsgerr *e = NLMSG_DATA(nh);
                if (e->error && e->error != -ENOENT && e->error != -ESTALE) {
                    rc = e->error;
                    break;
                }
                continue; /* gone */
            }
            diag_msg(nh, fn, ctx);
        }
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* The handler's table of tracked connections: slots in the shared page
 * (nsb_shared.conns, read by the supervisor), a private cookie -> slot
 * hash and free list, guarded by mu (the connect path and the thread). */

static struct {
    pthread_mutex_t mu;
    struct nsb_shared *sh;
    uint32_t hash[HSIZE];        /* slot + 1, 0: empty */
    uint32_t freelist[NSB_CONNS];
    uint32_t nfree;
    int nl;                      /* subscribed to destroy notifications, or -1 */
    int resync;                  /* notifications lost: the next dump settles */
    int on;
    sem_t started;               /* posted once the thread is past its start-up */
} T = {.mu = PTHREAD_MUTEX_INITIALIZER, .nl = -1};

static uint32_t hpos(uint64_t cookie)
{
    cookie ^= cookie >> 33;
    cookie *= 0xff51afd7ed558ccdULL;
    cookie ^= cookie >> 33;
    return (uint32_t)cookie & (HSIZE - 1);
}

/* Position of cookie in the hash, or HSIZE. */
static uint32_t hfind(uint64_t cookie)
{
    for (uint32_t i = hpos(cookie);; i = (i + 1) & (HSIZE - 1)) {
        uint32_t v = T.hash[i];
        if (!v)
            return HSIZE;
        if (T.sh->conns[v - 1].cookie == cookie)
            return i;
    }
}

static void hdel(uint32_t i)
{
    /* backward shift: no tombstones */
    for (uint32_t j = i;;) {
        T.hash[i] = 0;
        for (;;) {
            j = (j + 1) & (HSIZE - 1);
            uint32_t v = T.hash[j];
            if (!v)
                return;
            uint32_t k = hpos(T.sh->conns[v - 1].cookie);
            /* move v to i unless its home k lies cyclically in (i, j] */
            if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
                continue;
            T.hash[i] = v;
            i = j;
            break;
        }
    }
}

static void add_slot(uint64_t cookie, const struct nsb_key *key)
{
    if (!T.nfree) {
        __atomic_fetch_add(&T.sh->bytes_untracked, 1, __ATOMIC_RELAXED);
        return;
    }
    uint32_t slot = T.freelist[--T.nfree];
    struct nsb_conn *c = &T.sh->conns[slot];
    c->key = *key; /* before the cookie is published: samples read it */
    __atomic_store_n(&c->sent, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->received, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->cookie, cookie, __ATOMIC_RELEASE);
    uint32_t i = hpos(cookie);
    while (T.hash[i])
        i = (i + 1) & (HSIZE - 1);
    T.hash[i] = slot + 1;
}

/* A tracked connection is gone: its counts go to the totals (the slot is
 * cleared first: a supervisor reading meanwhile counts it short, never
 * twice).  Called with mu held. */
static void retire(uint32_t pos, uint64_t sent, uint64_t received, int exact)
{
    uint32_t slot = T.hash[pos] - 1;
    struct nsb_conn *c = &T.sh->conns[slot];
    hdel(pos);
    __atomic_store_n(&c->cookie, 0, __ATOMIC_RELEASE);
    __atomic_fetch_add(&T.sh->bytes_sent, sent, __ATOMIC_RELEASE);
    __atomic_fetch_add(&T.sh->bytes_received, received, __ATOMIC_RELEASE);
    if (!exact)
        __atomic_fetch_add(&T.sh->bytes_inexact, 1, __ATOMIC_RELAXED);
    T.freelist[T.nfree++] = slot;
}

/* The address (into addr[4]) and port of an AF_INET/AF_INET6 sockaddr,
 * in network order: 1, or 0 for another family. */
static int addr_of(const struct sockaddr_storage *a, uint32_t *addr, uint16_t *port)
{
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)a;
        memcpy(addr, &v4->sin_addr, 4);
        *port = v4->sin_port;
        return 1;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)a;
        memcpy(addr, &v6->sin6_addr, 16);
        *port = v6->sin6_port;
        return 1;
    }
    return 0;
}

/* Called by install(): the host socket now is the command's; peer: where
 * it connects (NULL: ask the socket, connected by now). */
void nsb_diag_track(int sock, const struct sockaddr_storage *peer)
{
    if (!T.on)
        return;
    uint64_t cookie = 0;
    socklen_t len = sizeof cookie;
    if (getsockopt(sock, SOL_SOCKET, SO_COOKIE, &cookie, &len) < 0 || !cookie) {
        __atomic_fetch_add(&T.sh->bytes_untracked, 1, __ATOMIC_RELAXED);
        return;
    }
    struct nsb_key key;
    memset(&key, 0, sizeof key);
    struct sockaddr_storage me, them;
    socklen_t lm = sizeof me, lt = sizeof them;
    if (!peer && getpeername(sock, (struct sockaddr *)&them, &lt) == 0)
        peer = &them;
    if (peer && getsockname(sock, (struct sockaddr *)&me, &lm) == 0 &&
        me.ss_family == peer->ss_family &&
        addr_of(&me, key.src, &key.sport) && addr_of(peer, key.dst, &key.dport))
        key.family = (uint8_t)me.ss_family;
    pthread_mutex_lock(&T.mu);
    add_slot(cookie, &key);
    pthread_mutex_unlock(&T.mu);
}

static void on_destroyed(void *ctx, uint64_t cookie, uint64_t sent, uint64_t received)
{
    (void)ctx;
    uint32_t pos = hfind(cookie);
    if (pos != HSIZE)
        retire(pos, sent, received, 1);
}

/* ------------------------------------------------------------------------ */
/* A snapshot of the tracked connections (from the shared table, without
 * the lock), brought up to date by a dump: the supervisor's get_stats and
 * the thread's samples. */

struct live {
    uint64_t *cookie, *sent, *received;
    struct nsb_key *key;
    uint8_t *seen;
    uint32_t *hash; /* index + 1 */
    uint32_t n;
};

static uint32_t live_find(struct live *l, uint64_t cookie)
{
    for (uint32_t i = hpos(cookie);; i = (i + 1) & (HSIZE - 1)) {
        uint32_t v = l->hash[i];
        if (!v || l->cookie[v - 1] == cookie)
            return v;
    }
}

static void live_free(struct live *l)
{
    free(l->cookie);
    free(l->sent);
    free(l->received);
    free(l->seen);
    free(l->hash);
    free(l->key);
}

/* 0, or -ENOMEM */
static int live_collect(struct nsb_shared *sh, struct live *l)
{
    memset(l, 0, sizeof *l);
    l->cookie = malloc(NSB_CONNS * sizeof(uint64_t));
    l->sent = malloc(NSB_CONNS * sizeof(uint64_t));
    l->received = malloc(NSB_CONNS * sizeof(uint64_t));
    l->seen = calloc(NSB_CONNS, 1);
    l->hash = calloc(HSIZE, sizeof(uint32_t));
    l->key = malloc(NSB_CONNS * sizeof(struct nsb_key));
    if (!l->cookie || !l->sent || !l->received || !l->seen || !l->hash || !l->key) {
        live_free(l);
        return -ENOMEM;
    }
    for (uint32_t s = 0; s < NSB_CONNS; s++) {
        uint64_t cookie = __atomic_load_n(&sh->conns[s].cookie, __ATOMIC_ACQUIRE);
        if (!cookie || live_find(l, cookie))
            continue;
        uint32_t k = l->n++;
        l->cookie[k] = cookie;
        l->key[k] = sh->conns[s].key;
        l->sent[k] = __atomic_load_n(&sh->conns[s].sent, __ATOMIC_RELAXED);
        l->received[k] = __atomic_load_n(&sh->conns[s].received, __ATOMIC_RELAXED);
        uint32_t i = hpos(cookie);
        while (l->hash[i])
            i = (i + 1) & (HSIZE - 1);
        l->hash[i] = k + 1;
    }
    return 0;
}

static void on_live(void *ctx, uint64_t cookie, uint64_t sent, uint64_t received)
{
    struct live *l = ctx;
    uint32_t v = live_find(l, cookie);
    if (!v)
        return;
    if (sent > l->sent[v - 1])
        l->sent[v - 1] = sent;
    if (received > l->received[v - 1])
        l->received[v - 1] = received;
    l->seen[v - 1] = 1;
}


/* The live connections' counts now: looked up one by one (up to
 * LOOKUP_MAX, their addresses known), else by a dump (*dumped set).
 * 0, or -errno. */
static int live_update(struct live *l, int *dumped)
{
    *dumped = 0;
    if (!l->n)
        return 0;
    if (l->n <= LOOKUP_MAX) {
        uint32_t k = 0;
        while (k < l->n && l->key[k].family)
            k++;
        if (k == l->n && diag_lookup(l->key, l->cookie, l->n, on_live, l) == 0)
            return 0;
    }
    *dumped = 1;
    return diag_dump(on_live, l);
}

/* A sample: every tracked connection's counts now, kept as its last; with
 * `settle`, the ones the dump did not find (gone unseen) are retired with
 * their last counts.  The dump runs without the lock: the connect path
 * never waits for it. */
static void sample(int settle)
{
    struct live l;
    if (live_collect(T.sh, &l) < 0)
        return;
    int dumped = 0;
    int rc = live_update(&l, &dumped);
    if (dumped)
        __atomic_fetch_add(&T.sh->bytes_dumps, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&T.mu);
    for (uint32_t k = 0; k < l.n && rc == 0; k++) {
        uint32_t pos = hfind(l.cookie[k]);
        if (pos == HSIZE)
            continue; /* retired meanwhile */
        struct nsb_conn *c = &T.sh->conns[T.hash[pos] - 1];
        if (!l.seen[k] && settle) {
            retire(pos, l.sent[k], l.received[k], 0);
            continue;
        }
        __atomic_store_n(&c->sent, l.sent[k], __ATOMIC_RELAXED);
        __atomic_store_n(&c->received, l.received[k], __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&T.mu);
    live_free(&l);
    if (rc == 0)
        __atomic_fetch_add(&T.sh->bytes_samples, 1, __ATOMIC_RELEASE);
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *diag_thread(void *arg)
{
    (void)arg;
    char *buf = malloc(BATCH * MSGMAX);
    /* started (its own set-up calls made, its malloc arena there): the
     * handler may load its seccomp filter now */
    sem_post(&T.started);
    if (!buf)
        return NULL;
    int64_t next = 0;
    for (;;) {
        int period = T.nl >= 0 ? SAMPLE_MS : FALLBACK_MS;
        int live = NSB_CONNS - (int)__atomic_load_n(&T.nfree, __ATOMIC_RELAXED);
        int64_t now = mono_ms();
        if (T.resync || (live > 0 && now >= next)) {
            int settle = T.resync || T.nl < 0;
            T.resync = 0;
            sample(settle);
            next = mono_ms() + period;
        }
        int timeout = live > 0 || T.resync ? period : -1;
        if (T.nl < 0) {
            poll(NULL, 0, timeout < 0 ? period : timeout);
            continue;
        }
        struct pollfd p = {T.nl, POLLIN, 0};
        if (poll(&p, 1, timeout) <= 0)
            continue;
        /* many notifications per syscall: each is a datagram of ~400 bytes */
        for (int k = 0; k < 16; k++) {
            struct mmsghdr mm[BATCH];
            struct iovec iov[BATCH];
            for (int i = 0; i < BATCH; i++) {
                iov[i].iov_base = buf + i * MSGMAX;
                iov[i].iov_len = MSGMAX;
                memset(&mm[i], 0, sizeof mm[i]);
                mm[i].msg_hdr.msg_iov = &iov[i];
                mm[i].msg_hdr.msg_iovlen = 1;
            }
            int got = recvmmsg(T.nl, mm, BATCH, MSG_DONTWAIT, NULL);
            if (got < 0) {
                if (errno == ENOBUFS)
                    T.resync = 1; /* some were dropped: settle with a dump */
                if (errno == EINTR || errno == ENOBUFS)
                    continue;
                break;
            }
            pthread_mutex_lock(&T.mu);
            for (int i = 0; i < got; i++) {
                int left = (int)mm[i].msg_len;
                for (struct nlmsghdr *nh = (struct nlmsghdr *)(buf + i * MSGMAX);
                     NLMSG_OK(nh, left); nh = NLMSG_NEXT(nh, left))
                    diag_msg(nh, on_destroyed, NULL);
            }
            pthread_mutex_unlock(&T.mu);
            if (got < BATCH)
                break;
        }
        /* Let notifications gather: one wake-up per BATCH_MS at most, not
         * one per closed connection (they queue in the socket meanwhile) */
        struct timespec ts = {0, BATCH_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* The destroy notifications worth waking for: all but those of sockets
 * to the host's own loopback that are not bound to lo (the host's side of
 * a bypassed gateway connection, the host's own loopback traffic); ours to
 * the gateway are bound to lo, ours to outside addresses never go to
 * loopback.  Classic BPF on the netlink message: its loads are big-endian,
 * the message's integers the host's (hence htons/htonl), addresses big. */
static void attach_filter(int nl)
{
    enum { HDR = NLMSG_HDRLEN, FAM = HDR + 0, IF = HDR + 4 + 36, DST = HDR + 4 + 20 };
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 4),                         /* nlmsg_type */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, htons(SOCK_DIAG_BY_FAMILY), 0, 15), /* other: keep */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, IF),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, htonl(1), 13, 0),           /* bound to lo: keep */
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, FAM),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_INET, 0, 2),
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, DST),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 127, 8, 9),                /* 127/8: drop */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, DST),                        /* IPv6 */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 7),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, DST + 4),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 5),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, DST + 8),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, DST + 12),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, 1),                  /* ::1: drop */
        BPF_STMT(BPF_RET | BPF_K, 0),
        BPF_STMT(BPF_RET | BPF_K, 0xffffffff),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    setsockopt(nl, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog); /* else: all */
}

/* --bypass-bytes=at-close, in the supervisor before it forks a handler: a
 * sock_diag socket subscribed to the kernel's TCP destroy notifications,
 * for nsb_config.diag_fd (the supervisor learns at once, with the errno,
 * when the kernel refuses it).  The fd, or -errno. */
int nsb_diag_subscribe(void)
{
    int nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (nl < 0)
        return -errno;
    int g4 = SKNLGRP_INET_TCP_DESTROY, g6 = SKNLGRP_INET6_TCP_DESTROY;
    int big = 4 << 20;
    if (setsockopt(nl, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0) /* root */
        setsockopt(nl, SOL_SOCKET, SO_RCVBUF, &big, sizeof big); /* else rmem_max */
    attach_filter(nl);
    /* bound (a port id of its own): the kernel's broadcasts skip port 0 */
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    if (bind(nl, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        setsockopt(nl, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &g4, sizeof g4) < 0 ||
        setsockopt(nl, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &g6, sizeof g6) < 0) {
        int err = errno;
        close(nl);
        return -err;
    }
    return nl;
}

/* Start tracking in the handler: the table a previous handler left (its
 * connections' destructions were not seen: settled by a first dump), the
 * thread.  nl: a socket of nsb_diag_subscribe() (--bypass-bytes=at-close:
 * final counts at close), or -1 (sampled: nothing subscribed, the kernel
 * builds no destroy notification for us).  Failures leave bytes uncounted
 * (bytes_mode 0), never the handler down. */
void nsb_diag_start(struct nsb_shared *sh, int nl)
{
    T.sh = sh;
    T.nfree = 0;
    for (uint32_t s = NSB_CONNS; s-- > 0;) {
        uint64_t cookie = __atomic_load_n(&sh->conns[s].cookie, __ATOMIC_ACQUIRE);
        if (!cookie) {
            T.freelist[T.nfree++] = s;
            continue;
        }
        uint32_t i = hpos(cookie);
        while (T.hash[i])
            i = (i + 1) & (HSIZE - 1);
        T.hash[i] = s + 1;
        T.resync = 1;
    }
    T.nl = nl;
    /* the thread takes no signal: the handler's are the main thread's */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 64 << 10);
    sem_init(&T.started, 0, 0);
    int rc = pthread_create(&t, &at, diag_thread, NULL);
    pthread_attr_destroy(&at);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) /* its start-up before the handler's filter (nsb_run) */
        while (sem_wait(&T.started) < 0 && errno == EINTR)
            ;
    if (rc != 0) {
        if (T.nl >= 0)
            close(T.nl);
        T.nl = -1;
        sh->bytes_mode = 0;
        return;
    }
    sh->bytes_mode = T.nl >= 0 ? NSB_BYTES_AT_CLOSE : NSB_BYTES_SAMPLED;
    T.on = 1;
}

/* get_stats, in the supervisor: out[0], out[1] the bytes sent and received
 * (the connections that are gone, then the live ones now: the totals are
 * read first, and the handler clears a slot before it adds to them, so a
 * connection that ends meanwhile is counted short, never twice); out[2]
 * the live connections; out[3] 1 if it walked all the host's TCP sockets
 * (more than LOOKUP_MAX live), 0 if it looked them up.  0, or -errno
 * (then out holds what is known). */
int nsb_sample(struct nsb_shared *sh, uint64_t *out)
{
    out[0] = __atomic_load_n(&sh->bytes_sent, __ATOMIC_ACQUIRE);
    out[1] = __atomic_load_n(&sh->bytes_received, __ATOMIC_ACQUIRE);
    out[2] = 0;
    out[3] = 0;
    struct live l;
    int rc = live_collect(sh, &l);
    if (rc < 0)
        return rc;
    int dumped;
    rc = live_update(&l, &dumped);
    out[3] = (uint64_t)dumped;
    for (uint32_t k = 0; k < l.n; k++) {
        out[0] += l.sent[k];
        out[1] += l.received[k];
    }
    out[2] = l.n;
    live_free(&l);
    return rc;
}
