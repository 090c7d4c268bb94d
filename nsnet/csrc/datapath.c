/* nsnet data path: see datapath.h for the picture. */
#define _GNU_SOURCE
#include "datapath.h"
#include "policy.h"

#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>

/* A frame is at most 64 KiB of IP plus its Ethernet header; with TAP
 * offloads the kernel hands over TSO super-frames of that size even at
 * MTU 1500, so the read buffer is always this large. */
#define NSNET_FRAME_MAX (65536 + 14 + 4)
/* Frames read from the TAP per wakeup before libslirp's sockets get a
 * turn: keeps one busy direction from starving the other. */
#define NSNET_TAP_BATCH 64

struct nsnet_timer {
    struct nsnet_dp *dp;
    int64_t expire_ms; /* -1 while not armed */
    int opaque_id;     /* 1: fire through slirp_handle_timer(id) */
    SlirpTimerId id;
    SlirpTimerCb cb;   /* else: call cb(cb_opaque) */
    void *cb_opaque;
    struct nsnet_timer *next;
};

struct nsnet_dp {
    Slirp *slirp;
    SlirpCb cb;
    SlirpConfig cfg;
    int tap_fd;
    int ctl_fd;
    int vnet_hdr;
    int tap_mtu;
    int slirp_mtu; /* libslirp's if_mtu: larger than tap_mtu with offloads */
    uint32_t frag_id;
    int tap_errno;
    struct pollfd *pfd;
    int npfd;
    int cappfd;
    struct nsnet_timer *timers;
    uint8_t *rbuf;
    struct nsnet_stats st;
    char last_guest_error[160];
    struct nsnet_filter *filter; /* egress policy; NULL until one is set */
    int64_t events_ms;           /* last return for audit records */
    int pcap_fd;                 /* --pcap: -1 when not capturing */
    int pcap_full;               /* 1: the cap was reached, 2: a write failed */
    uint64_t pcap_size;          /* bytes in the capture file */
    uint64_t pcap_max;           /* 0: no cap */
    uint8_t *listener;           /* fd -> 1: a TCP port forward's listener */
    int nlistener;               /* entries in listener */
    int *lidx;                   /* this turn: pfd indexes of listeners */
    int nlidx, caplidx;
    int reserve_fd;              /* held to make room for accept() at the fd limit */
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- packet capture (--pcap) ---- */

/* pcap's file format (tcpdump, Wireshark): a 24-byte global header, then
 * per frame a 16-byte record header (seconds, microseconds, captured and
 * original length) and the frame, all in host byte order (the magic says
 * which).  Link type 1: Ethernet. */
#define PCAP_SNAPLEN 262144

static void pcap_append(struct nsnet_dp *dp, const struct iovec *iov, int n_iov, size_t len)
{
    ssize_t w;
    if (dp->pcap_max && dp->pcap_size + len > dp->pcap_max) {
        dp->pcap_full = 1;
        dp->st.pcap_dropped++;
        return;
    }
    do {
        w = writev(dp->pcap_fd, iov, n_iov);
    } while (w < 0 && errno == EINTR);
    if (w < 0 || (size_t)w != len) {
        /* Disk full, a pipe without room: stop, leaving at most one
         * truncated record at the end. */
        dp->pcap_full = 2;
        dp->st.pcap_dropped++;
        if (w > 0)
            dp->pcap_size += (size_t)w;
        return;
    }
    dp->pcap_size += len;
}

static void pcap_frame(struct nsnet_dp *dp, const void *frame, size_t len)
{
    struct timespec ts;
    uint32_t rec[4];
    struct iovec iov[2];
    if (dp->pcap_fd < 0)
        return;
    if (dp->pcap_full) {
        dp->st.pcap_dropped++;
        return;
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    rec[0] = (uint32_t)ts.tv_sec;
    rec[1] = (uint32_t)(ts.tv_nsec / 1000);
    rec[2] = (uint32_t)len; /* frames are at most NSNET_FRAME_MAX < snaplen */
    rec[3] = (uint32_t)len;
    iov[0].iov_base = rec;
    iov[0].iov_len = sizeof(rec);
    iov[1].iov_base = (void *)frame;
    iov[1].iov_len = len;
    pcap_append(dp, iov, 2, sizeof(rec) + len);
    if (!dp->pcap_full)
        dp->st.pcap_frames++;
}

void nsnet_dp_set_pcap(struct nsnet_dp *dp, int fd, uint64_t offset, uint64_t max_bytes)
{
    dp->pcap_fd = fd;
    dp->pcap_size = offset;
    dp->pcap_max = max_bytes;
    dp->pcap_full = 0;
    if (fd >= 0 && offset == 0) {
        struct {
            uint32_t magic;
            uint16_t major, minor;
            int32_t thiszone;
            uint32_t sigfigs, snaplen, linktype;
        } g = {0xa1b2c3d4 /* microsecond timestamps */, 2, 4, 0, 0, PCAP_SNAPLEN,
               1 /* LINKTYPE_ETHERNET */};
        struct iovec iov;
        iov.iov_base = &g;
        iov.iov_len = sizeof(g);
        pcap_append(dp, &iov, 1, sizeof(g));
    } else if (fd >= 0 && max_bytes && offset >= max_bytes) {
        dp->pcap_full = 1; /* a predecessor filled it */
    }
}

int nsnet_dp_pcap_full(struct nsnet_dp *dp)
{
    return dp->pcap_full;
}

/* ---- libslirp callbacks (all in C: none of them may call Python) ---- */

/* Write one frame to the TAP, with a virtio-net header when the TAP has
 * one.  Returns what writev returned. */
static ssize_t tap_write(struct nsnet_dp *dp, const uint8_t *hdr, const void *buf, size_t len)
{
    static const uint8_t zero_hdr[NSNET_VNET_HDR_LEN];
    struct iovec iov[2];
    int n_iov = 0;
    ssize_t n;
    if (dp->vnet_hdr) {
        iov[n_iov].iov_base = (void *)(hdr ? hdr : zero_hdr);
        iov[n_iov].iov_len = NSNET_VNET_HDR_LEN;
        n_iov++;
    }
    iov[n_iov].iov_base = (void *)buf;
    iov[n_iov].iov_len = len;
    n_iov++;
    pcap_frame(dp, buf, len); /* the Ethernet frame, never the vnet header */
    do {
        n = writev(dp->tap_fd, iov, n_iov);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        /* The namespace is not taking frames right now: drop, TCP
         * retransmits.  A dead TAP is noticed by the read side. */
        dp->st.tx_dropped++;
    } else {
        dp->st.tx_frames++;
        dp->st.tx_bytes += len;
    }
    return n;
}

static int emit_fragment(const uint8_t *frame, size_t len, void *opaque)
{
    tap_write(opaque, NULL, frame, len);
    return 0;
}

static ssize_t cb_send_packet(const void *buf, size_t len, void *opaque)
{
    struct nsnet_dp *dp = opaque;
    uint8_t hdr[NSNET_VNET_HDR_LEN], syn[NSNET_SYN_FRAME_MAX];
    int is_gso = 0;
    if (dp->filter)
        nsnet_filter_tx(dp->filter, buf, len); /* inbound flows, DNS answers */
    /* libslirp's if_mtu is capped below the TAP's (NSNET_SLIRP_MSS): its
     * SYNs still tell the namespace the MSS of the TAP's MTU, so that the
     * namespace sends segments as large as before. */
    if (dp->slirp_mtu < dp->tap_mtu &&
        nsnet_raise_tx_syn_mss(buf, len, dp->tap_mtu, syn, sizeof(syn))) {
        dp->st.tx_mss_raised++;
        buf = syn;
    }
    if (dp->vnet_hdr) {
        nsnet_vnet_fill_tx(hdr, buf, len, dp->tap_mtu, &is_gso);
        if (is_gso) {
            if (tap_write(dp, hdr, buf, len) >= 0)
                dp->st.tx_gso_frames++;
            return (ssize_t)len;
        }
    }
    if (len > (size_t)dp->tap_mtu + 14) {
        /* Not a TCP segment the namespace's kernel can cut (UDP, ICMP,
         * IPv6 that libslirp never fragments): fragment it here, so that
         * nothing over the MTU the user set reaches the namespace. */
        if (nsnet_tx_fragment(buf, len, dp->tap_mtu, ++dp->frag_id, emit_fragment, dp) == 0) {
            dp->st.tx_fragmented++;
            return (ssize_t)len;
        }
    }
    tap_write(dp, dp->vnet_hdr ? hdr : NULL, buf, len);
    return (ssize_t)len;
}

static void cb_guest_error(const char *msg, void *opaque)
{
    struct nsnet_dp *dp = opaque;
    dp->st.guest_errors++;
    snprintf(dp->last_guest_error, sizeof(dp->last_guest_error), "%s", msg);
}

static int64_t cb_clock_get_ns(void *opaque)
{
    struct timespec ts;
    (void)opaque;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct nsnet_timer *timer_alloc(struct nsnet_dp *dp)
{
    struct nsnet_timer *t = calloc(1, sizeof(*t));
    if (!t)
        abort(); /* libslirp has no way to report this */
    t->dp = dp;
    t->expire_ms = -1;
    t->next = dp->timers;
    dp->timers = t;
    return t;
}

static void *cb_timer_new(SlirpTimerCb cb, void *cb_opaque, void *opaque)
{
    struct nsnet_timer *t = timer_alloc(opaque);
    t->cb = cb;
    t->cb_opaque = cb_opaque;
    return t;
}

static void *cb_timer_new_opaque(SlirpTimerId id, void *cb_opaque, void *opaque)
{
    struct nsnet_timer *t = timer_alloc(opaque);
    t->opaque_id = 1;
    t->id = id;
    t->cb_opaque = cb_opaque;
    return t;
}

static void cb_timer_free(void *timer, void *opaque)
{
    struct nsnet_dp *dp = opaque;
    struct nsnet_timer **pp;
    for (pp = &dp->timers; *pp; pp = &(*pp)->next) {
        if (*pp == timer) {
            *pp = ((struct nsnet_timer *)timer)->next;
            free(timer);
            return;
        }
    }
}

static void cb_timer_mod(void *timer, int64_t expire_time, void *opaque)
{
    (void)opaque;
    ((struct nsnet_timer *)timer)->expire_ms = expire_time;
}

static void cb_register_poll_fd(int fd, void *opaque)
{
    (void)fd;
    (void)opaque; /* the fd set is rebuilt on every turn */
}

static void cb_unregister_poll_fd(int fd, void *opaque)
{
    (void)fd;
    (void)opaque;
}

static void cb_notify(void *opaque)
{
    (void)opaque; /* single-threaded: the next turn picks it up */
}

static void cb_init_completed(Slirp *slirp, void *opaque)
{
    struct nsnet_dp *dp = opaque;
    dp->slirp = slirp;
}

/* ---- poll set ---- */

/* SLIRP_POLL_* are not poll(2)'s bits: OUT and PRI are swapped. */
static short slirp_to_poll(int ev)
{
    short r = 0;
    if (ev & SLIRP_POLL_IN)
        r |= POLLIN;
    if (ev & SLIRP_POLL_OUT)
        r |= POLLOUT;
    if (ev & SLIRP_POLL_PRI)
        r |= POLLPRI;
    if (ev & SLIRP_POLL_ERR)
        r |= POLLERR;
    if (ev & SLIRP_POLL_HUP)
        r |= POLLHUP;
    return r;
}

static int poll_to_slirp(short ev)
{
    int r = 0;
    if (ev & POLLIN)
        r |= SLIRP_POLL_IN;
    if (ev & POLLOUT)
        r |= SLIRP_POLL_OUT;
    if (ev & POLLPRI)
        r |= SLIRP_POLL_PRI;
    if (ev & (POLLERR | POLLNVAL))
        r |= SLIRP_POLL_ERR;
    if (ev & POLLHUP)
        r |= SLIRP_POLL_HUP;
    return r;
}

static int pfd_add(struct nsnet_dp *dp, int fd, short events)
{
    if (dp->npfd == dp->cappfd) {
        int cap = dp->cappfd ? dp->cappfd * 2 : 64;
        struct pollfd *p = realloc(dp->pfd, cap * sizeof(*p));
        if (!p)
            abort();
        dp->pfd = p;
        dp->cappfd = cap;
    }
    dp->pfd[dp->npfd].fd = fd;
    dp->pfd[dp->npfd].events = events;
    dp->pfd[dp->npfd].revents = 0;
    return dp->npfd++;
}

static int cb_add_poll(int fd, int events, void *opaque)
{
    struct nsnet_dp *dp = opaque;
    int idx = pfd_add(dp, fd, slirp_to_poll(events));
    if (fd >= 0 && fd < dp->nlistener && dp->listener[fd]) {
        if (dp->nlidx == dp->caplidx) {
            int cap = dp->caplidx ? dp->caplidx * 2 : 16;
            int *l = realloc(dp->lidx, cap * sizeof(*l));
            if (!l)
                return idx;
            dp->lidx = l;
            dp->caplidx = cap;
        }
        dp->lidx[dp->nlidx++] = idx;
    }
    return idx;
}

/* ---- at the fd limit (nsnet/fdlimit.py) ---- */

void nsnet_dp_set_listener(struct nsnet_dp *dp, int fd, int on)
{
    if (fd < 0)
        return;
    if (fd >= dp->nlistener) {
        int n = fd + 64;
        uint8_t *m = realloc(dp->listener, n);
        if (!m)
            return;
        memset(m + dp->nlistener, 0, n - dp->nlistener);
        dp->listener = m;
        dp->nlistener = n;
    }
    dp->listener[fd] = on ? 1 : 0;
}

/* A connection waits on a port forward's listener: if this process is at
 * its fd limit, libslirp's accept() fails with EMFILE, leaves it queued
 * and the listener readable, and the loop spins.  Refuse it instead: the
 * reserve fd makes room for accept(), the connection is closed (the
 * client sees its end at once).  1 when the listener's event must be
 * hidden from libslirp. */
static int refuse_at_limit(struct nsnet_dp *dp, int fd)
{
    int probe = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int s;
    if (probe >= 0) {
        close(probe);
        return 0;  /* room for libslirp's accept() */
    }
    if (errno != EMFILE && errno != ENFILE)
        return 0;
    if (dp->reserve_fd >= 0)
        close(dp->reserve_fd);
    s = accept(fd, NULL, NULL);
    if (s >= 0) {
        close(s);
        dp->st.fd_refused++;
    }
    dp->reserve_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    return 1;
}

static int cb_get_revents(int idx, void *opaque)
{
    struct nsnet_dp *dp = opaque;
    if (idx < 0 || idx >= dp->npfd)
        return 0;
    return poll_to_slirp(dp->pfd[idx].revents);
}

/* ---- the loop ---- */

/* An ARP frame or an IPv6 neighbour advertisement: input that can resolve
 * an address libslirp queued packets for. */
static int resolves_neighbour(const uint8_t *f, size_t len)
{
    if (len >= 14 && f[12] == 0x08 && f[13] == 0x06)
        return 1;
    return len >= 55 && f[12] == 0x86 && f[13] == 0xdd && f[20] == 58 && f[54] == 136;
}

static void filter_to_ns(const uint8_t *frame, size_t len, void *opaque)
{
    tap_write(opaque, NULL, frame, len);
}

static void filter_to_slirp(const uint8_t *frame, size_t len, void *opaque)
{
    struct nsnet_dp *dp = opaque;
    slirp_input(dp->slirp, frame, (int)len);
}

/* The egress policy's verdict on a checked frame: 1 to pass it on. */
static int filter_ok(struct nsnet_dp *dp, const uint8_t *frame, size_t len)
{
    if (!dp->filter)
        return 1;
    return nsnet_filter_rx(dp->filter, (uint8_t *)frame, len, filter_to_ns, filter_to_slirp, dp);
}

/* Read frames from the TAP until EAGAIN or the batch is full.
 * Returns 1 if a frame resolved a neighbour (see above), else 0, or -1
 * with dp->tap_errno set when the TAP failed. */
static int drain_tap(struct nsnet_dp *dp)
{
    int i, resolved = 0;
    size_t hl = dp->vnet_hdr ? NSNET_VNET_HDR_LEN : 0;
    for (i = 0; i < NSNET_TAP_BATCH; i++) {
        ssize_t n = read(dp->tap_fd, dp->rbuf, NSNET_FRAME_MAX + hl);
        uint8_t *frame;
        size_t flen;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return resolved;
            dp->tap_errno = errno;
            return -1;
        }
        if (n == 0) {
            dp->tap_errno = EPIPE;
            return -1;
        }
        if ((size_t)n <= hl) {
            dp->st.rx_dropped_invalid++;
            continue;
        }
        frame = dp->rbuf + hl;
        flen = (size_t)n - hl;
        dp->st.rx_frames++;
        dp->st.rx_bytes += flen;
        if (hl) {
            const uint8_t *vh = dp->rbuf;
            if (vh[1] != 0) /* gso_type */
                dp->st.rx_gso_frames++;
            if (vh[0] & 1) { /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
                if (nsnet_vnet_complete_csum(vh, frame, flen) < 0) {
                    dp->st.rx_dropped_invalid++;
                    continue;
                }
                dp->st.rx_csum_completed++;
            }
        }
        pcap_frame(dp, frame, flen);
        switch (nsnet_frame_check(frame, flen)) {
        case 1:
            if (!filter_ok(dp, frame, flen))
                break;
            if (nsnet_adjust_syn_mss(frame, flen, dp->tap_mtu, dp->slirp_mtu, NSNET_SLIRP_MSS))
                dp->st.rx_mss_adjusted++;
            slirp_input(dp->slirp, frame, (int)flen);
            resolved |= resolves_neighbour(frame, flen);
            break;
        case NSNET_FRAME_QUEUED:
            break;
        case NSNET_FRAME_REASSEMBLED: {
            size_t wlen;
            const uint8_t *whole = nsnet_frame_reassembled(&wlen);
            if (!filter_ok(dp, whole, wlen))
                break;
            slirp_input(dp->slirp, whole, (int)wlen);
            break;
        }
        case 0:
            dp->st.rx_dropped_invalid++;
            break;
        default:
            dp->st.rx_dropped_ignored++;
            break;
        }
    }
    return resolved;
}

static int64_t next_timer_ms(struct nsnet_dp *dp)
{
    int64_t best = -1;
    struct nsnet_timer *t;
    for (t = dp->timers; t; t = t->next)
        if (t->expire_ms >= 0 && (best < 0 || t->expire_ms < best))
            best = t->expire_ms;
    return best;
}

static void fire_timers(struct nsnet_dp *dp, int64_t now)
{
    struct nsnet_timer *t;
again:
    for (t = dp->timers; t; t = t->next) {
        if (t->expire_ms >= 0 && t->expire_ms <= now) {
            t->expire_ms = -1;
            /* The handler may re-arm or free timers: restart the walk. */
            if (t->opaque_id)
                slirp_handle_timer(dp->slirp, t->id, t->cb_opaque);
            else if (t->cb)
                t->cb(t->cb_opaque);
            goto again;
        }
    }
}

int nsnet_dp_run(struct nsnet_dp *dp, int budget_ms)
{
    int64_t deadline = now_ms() + (budget_ms < 0 ? 0 : budget_ms);
    for (;;) {
        uint32_t slirp_timeout = UINT32_MAX;
        int64_t now, wait, t;
        int n, i;
        short tap_rev;

        dp->npfd = 0;
        dp->nlidx = 0;
        pfd_add(dp, dp->tap_fd, POLLIN);
        pfd_add(dp, dp->ctl_fd, POLLIN);
        slirp_pollfds_fill(dp->slirp, &slirp_timeout, cb_add_poll, dp);

        now = now_ms();
        wait = deadline - now;
        if (slirp_timeout != UINT32_MAX && (int64_t)slirp_timeout < wait)
            wait = slirp_timeout;
        t = next_timer_ms(dp);
        if (t >= 0 && t - now < wait)
            wait = t - now;
        /* Audit records wait at most 100 ms for Python. */
        if (dp->filter && nsnet_filter_audit_pending(dp->filter) &&
            dp->events_ms + 100 - now < wait)
            wait = dp->events_ms + 100 - now;
        if (wait < 0)
            wait = 0;

        n = poll(dp->pfd, dp->npfd, (int)wait);
        if (n < 0) {
            if (errno != EINTR)
                return NSNET_DP_POLL_ERROR;
            for (i = 0; i < dp->npfd; i++)
                dp->pfd[i].revents = 0;
        }
        dp->st.loop_turns++;

        /* Frames from the namespace first, then libslirp's sockets (same
         * poll results: libslirp allows slirp_input between fill and
         * poll).  When the namespace's FIN and the host's EOF arrive in
         * one turn, libslirp then sees the FIN first and closes passively
         * (LAST_ACK, socket freed at once) instead of holding the host
         * socket for 2*MSL in TIME_WAIT: such sockets pile up under
         * connection churn and every turn walks them. */
        tap_rev = dp->pfd[0].revents;
        if (tap_rev & (POLLIN | POLLERR | POLLHUP | POLLNVAL)) {
            int rc = drain_tap(dp);
            if (rc < 0)
                return NSNET_DP_TAP_ERROR;
            /* A neighbour just resolved (after a forwarder restart libslirp's
             * ARP/NDP tables are empty): send what libslirp queued for it
             * now, not on the next turn, which can be TCP's 500 ms slow
             * timer away.  select_error=1: only timers and the output queue. */
            if (rc > 0)
                slirp_pollfds_poll(dp->slirp, 1, cb_get_revents, dp);
            if (tap_rev & POLLNVAL) {
                dp->tap_errno = EBADF;
                return NSNET_DP_TAP_ERROR;
            }
            if ((tap_rev & (POLLERR | POLLHUP)) && !(tap_rev & POLLIN)) {
                /* An error with nothing to read: the interface is gone
                 * (tun reports POLLERR once it is detached). */
                dp->tap_errno = EBADFD;
                return NSNET_DP_TAP_ERROR;
            }
        }

        for (i = 0; n > 0 && i < dp->nlidx; i++) {
            struct pollfd *p = &dp->pfd[dp->lidx[i]];
            if ((p->revents & POLLIN) && refuse_at_limit(dp, p->fd))
                p->revents &= ~POLLIN;
        }

        /* Every turn, timeouts included: TCP's timers run in here. */
        slirp_pollfds_poll(dp->slirp, 0, cb_get_revents, dp);

        now = now_ms();
        fire_timers(dp, now);

        if (dp->pfd[1].revents)
            return NSNET_DP_CONTROL;
        /* Audit records for Python to write: at most every 100 ms, sooner
         * when the ring fills. */
        if (dp->filter && nsnet_filter_audit_pending(dp->filter) &&
            (now - dp->events_ms >= 100 || nsnet_filter_audit_pending(dp->filter) > 512)) {
            dp->events_ms = now;
            return NSNET_DP_EVENTS;
        }
        if (now >= deadline)
            return NSNET_DP_BUDGET;
    }
}

void nsnet_dp_set_tap(struct nsnet_dp *dp, int tap_fd)
{
    dp->tap_fd = tap_fd;
}

struct nsnet_dp *nsnet_dp_new(const SlirpConfig *cfg, int tap_fd, int ctl_fd,
                              int vnet_hdr, int tap_mtu)
{
    struct nsnet_dp *dp;
    /* libslirp allocates and frees socket buffers of about 128 KiB for
     * every TCP connection, right at glibc's mmap threshold: each one
     * came back as fresh pages, faulted in and zeroed by the kernel
     * (40% of the forwarder's CPU when opening connections in a loop).
     * Serve them from the heap, and keep a few MiB of freed heap. */
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    mallopt(M_TRIM_THRESHOLD, 8 << 20);
    dp = calloc(1, sizeof(*dp));
    if (!dp)
        return NULL;
    dp->rbuf = malloc(NSNET_FRAME_MAX + NSNET_VNET_HDR_LEN);
    if (!dp->rbuf) {
        free(dp);
        return NULL;
    }
    dp->cfg = *cfg;
    dp->tap_fd = tap_fd;
    dp->ctl_fd = ctl_fd;
    dp->vnet_hdr = vnet_hdr;
    dp->tap_mtu = tap_mtu;
    dp->slirp_mtu = (int)cfg->if_mtu;
    dp->pcap_fd = -1;
    dp->reserve_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    dp->cb.send_packet = cb_send_packet;
    dp->cb.guest_error = cb_guest_error;
    dp->cb.clock_get_ns = cb_clock_get_ns;
    dp->cb.timer_new = cb_timer_new;
    dp->cb.timer_free = cb_timer_free;
    dp->cb.timer_mod = cb_timer_mod;
    dp->cb.register_poll_fd = cb_register_poll_fd;
    dp->cb.unregister_poll_fd = cb_unregister_poll_fd;
    dp->cb.notify = cb_notify;
    dp->cb.init_completed = cb_init_completed;
    dp->cb.timer_new_opaque = cb_timer_new_opaque;
    /* libslirp keeps pointers to dp->cb and reads dp->cfg during
     * slirp_new: both live in dp for the Slirp's whole life. */
    dp->slirp = slirp_new(&dp->cfg, &dp->cb, dp);
    if (!dp->slirp) {
        free(dp->rbuf);
        free(dp);
        return NULL;
    }
    return dp;
}

Slirp *nsnet_dp_slirp(struct nsnet_dp *dp)
{
    return dp->slirp;
}

int nsnet_dp_tap_errno(struct nsnet_dp *dp)
{
    return dp->tap_errno;
}

void nsnet_dp_get_stats(struct nsnet_dp *dp, struct nsnet_stats *out)
{
    *out = dp->st;
}

const char *nsnet_dp_last_guest_error(struct nsnet_dp *dp)
{
    return dp->last_guest_error;
}

struct nsnet_filter *nsnet_dp_filter(struct nsnet_dp *dp)
{
    if (!dp->filter) {
        dp->filter = nsnet_filter_new();
        if (dp->filter && !dp->cfg.disable_dns) {
            uint8_t d4[4], d6[16];
            memcpy(d4, &dp->cfg.vnameserver, 4);
            memcpy(d6, &dp->cfg.vnameserver6, 16);
            nsnet_filter_set_dns(dp->filter, d4, dp->cfg.in6_enabled ? d6 : NULL);
        }
    }
    return dp->filter;
}

void nsnet_dp_free(struct nsnet_dp *dp)
{
    struct nsnet_timer *t, *next;
    if (!dp)
        return;
    nsnet_filter_free(dp->filter);
    if (dp->slirp)
        slirp_cleanup(dp->slirp);
    for (t = dp->timers; t; t = next) {
        next = t->next;
        free(t);
    }
    if (dp->reserve_fd >= 0)
        close(dp->reserve_fd);
    free(dp->listener);
    free(dp->lidx);
    free(dp->pfd);
    free(dp->rbuf);
    free(dp);
}
