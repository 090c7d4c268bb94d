/* nsnet socket bypass: the seccomp user-notification handler.
 *
 * The command runs with a seccomp filter that sends connect(2),
 * getsockname(2) and getpeername(2) here.  For a connect of a fresh TCP
 * socket of the command's namespace to a destination the virtual network
 * maps to the host (see decide()), the handler
 *   - reads the sockaddr ONCE from the command's memory, then checks that
 *     the notification is still live (SECCOMP_IOCTL_NOTIF_ID_VALID), and
 *     decides on that copy only;
 *   - takes a copy of the command's socket (pidfd_getfd) to check what it
 *     is (netns cookie, domain, type, protocol, unbound) and read the
 *     options worth keeping;
 *   - creates a host socket itself, connects it itself (non-blocking), and
 *     installs it over the command's fd (SECCOMP_IOCTL_NOTIF_ADDFD, SETFD)
 *     right before the reply that carries connect's own result (0,
 *     EINPROGRESS, or the errno).  ADDFD_FLAG_SEND is not used for the
 *     reply: it makes the syscall return the new fd's number, and connect
 *     must return 0 or -1/EINPROGRESS.
 * Everything else gets SECCOMP_USER_NOTIF_FLAG_CONTINUE: the call runs in
 * the namespace as if there were no filter, and libslirp's path applies
 * the network's rules.  A blocking connect that does not finish at once
 * waits in this process's poll loop, never in a blocking call.
 */
#define _GNU_SOURCE
#include "bypass.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <net/if.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_ADDFD_FLAG_SETFD
#define SECCOMP_ADDFD_FLAG_SETFD (1UL << 0)
#endif
#ifndef SECCOMP_ADDFD_FLAG_SEND
#define SECCOMP_ADDFD_FLAG_SEND (1UL << 1)
#endif
#ifndef SECCOMP_IOCTL_NOTIF_ADDFD
struct seccomp_notif_addfd {
    __u64 id;
    __u32 flags;
    __u32 srcfd;
    __u32 newfd;
    __u32 newfd_flags;
};
#define SECCOMP_IOCTL_NOTIF_ADDFD _IOW('!', 3, struct seccomp_notif_addfd)
#endif
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS _IOW('!', 4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif
#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif
#ifndef SO_BINDTOIFINDEX
#define SO_BINDTOIFINDEX 62
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

/* ------------------------------------------------------------------------ */

struct pending { /* a blocking connect that has not finished yet */
    uint64_t id;
    int slot;
    int fd;       /* the command's fd number */
    int sock;     /* our host socket, connecting */
    int cloexec;
    int family;
    int64_t deadline_ms; /* SO_SNDTIMEO of the command's socket, or 0 */
    int64_t recheck_ms;  /* next ID_VALID check */
};

/* pidfds (and /proc/TID/fdinfo dirs) of the threads that called lately,
 * by thread id.  Only thread pidfds (PIDFD_THREAD) are kept: a pidfd pins
 * its thread, so a stale entry fails (ESRCH) rather than reach a new
 * thread that reuses the id.  Also kept: the open /proc/TID/fdinfo/FD
 * files of the last few fd numbers the thread connected (by fd % PFD).
 * Such a file is not a snapshot: each read at offset 0 looks the fd up in
 * the thread's fd table again, so it says what that fd number is now (or
 * fails, ENOENT, once it is closed or the thread is gone); one pread
 * instead of an open, a read and a close (7 us -> 1 us, measured). */
#define PCACHE 64
#define PFD 4
struct pcache {
    int tid;
    int pidfd;
    int infofd;
    int ffd[PFD];  /* open fdinfo file of fd number fnum[i], or -1 */
    int fnum[PFD];
};

#define DEFER 8
struct handler {
    int defer[DEFER]; /* fds to close before the next reply */
    int ndefer;
    struct pcache pc[PCACHE];
    int lfd;
    const struct nsb_config *cfg;
    struct nsb_shared *sh;
    uint64_t host_cookie;
    struct pending *pend;
    size_t npend, cappend;
    double audit_tokens; /* token bucket of audit records */
    int64_t audit_refill_ms;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int slot_take(struct handler *h, uint64_t id)
{
    for (int i = 0; i < NSB_SLOTS; i++)
        if (!h->sh->inflight[i]) {
            __atomic_store_n(&h->sh->inflight[i], id, __ATOMIC_RELEASE);
            return i;
        }
    return -1;
}

static void slot_free(struct handler *h, int slot)
{
    if (slot >= 0)
        __atomic_store_n(&h->sh->inflight[slot], 0, __ATOMIC_RELEASE);
}

static int id_valid(struct handler *h, uint64_t id)
{
    return ioctl(h->lfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0;
}

/* Close `fd` right before the next reply: the reply wakes the command, and
 * the handler's work should be done by then, not delayed behind it. */
static void later(struct handler *h, int fd)
{
    if (h->ndefer == DEFER)
        close(fd);
    else
        h->defer[h->ndefer++] = fd;
}

static void reply(struct handler *h, uint64_t id, int64_t val, int err, int cont)
{
    while (h->ndefer > 0)
        close(h->defer[--h->ndefer]);
    struct seccomp_notif_resp r;
    memset(&r, 0, sizeof r);
    r.id = id;
    r.val = val;
    r.error = err ? -err : 0;
    r.flags = cont ? SECCOMP_USER_NOTIF_FLAG_CONTINUE : 0;
    /* ENOENT: the command was interrupted or is gone; nothing to do */
    ioctl(h->lfd, SECCOMP_IOCTL_NOTIF_SEND, &r);
}

static void cont(struct handler *h, uint64_t id)
{
    reply(h, id, 0, 0, 1);
}

static int getint(int s, int level, int name, int *out)
{
    socklen_t len = sizeof *out;
    return getsockopt(s, level, name, out, &len);
}

static uint64_t netns_cookie(int s)
{
    uint64_t c = 0;
    socklen_t len = sizeof c;
    if (getsockopt(s, SOL_SOCKET, SO_NETNS_COOKIE, &c, &len) < 0)
        return 0;
    return c;
}

/* One read of a small /proc file (f: an open fd, or < 0 when the open
 * failed; closed here); the text after `key`, or NULL. */
static const char *proc_field(int f, char *buf, size_t size, const char *key)
{
    if (f < 0)
        return NULL;
    ssize_t n = read(f, buf, size - 1);
    close(f);
    if (n <= 0)
        return NULL;
    buf[n] = 0;
    const char *p = strstr(buf, key);
    return p ? p + strlen(key) : NULL;
}

static long parse_flags(const char *buf, ssize_t n)
{
    if (n <= 0)
        return -1;
    const char *p = strstr(buf, "flags:");
    return p ? (long)strtoul(p + 6, NULL, 8) : -1;
}

/* The fd's flags in the command: the file's status flags (O_NONBLOCK) and
 * the fd's close-on-exec flag, from /proc/TID/fdinfo/FD ("flags:\t0NNN",
 * octal), read now.  e: the thread's cache entry, or NULL.  -1 if it
 * cannot be read. */
static long fd_flags(struct pcache *e, int tid, int fd)
{
    char path[64], buf[256];
    if (e) {
        int k = (int)((unsigned)fd % PFD);
        if (e->ffd[k] >= 0 && e->fnum[k] == fd) {
            ssize_t n = pread(e->ffd[k], buf, sizeof buf - 1, 0);
            if (n > 0) {
                buf[n] = 0;
                return parse_flags(buf, n);
            }
            close(e->ffd[k]); /* closed meanwhile (ENOENT): look again */
            e->ffd[k] = -1;
        }
        if (e->infofd >= 0) {
            snprintf(path, sizeof path, "%d", fd);
            int f = openat(e->infofd, path, O_RDONLY | O_CLOEXEC);
            if (f >= 0) {
                ssize_t n = pread(f, buf, sizeof buf - 1, 0);
                if (n > 0) {
                    if (e->ffd[k] >= 0)
                        close(e->ffd[k]);
                    e->ffd[k] = f;
                    e->fnum[k] = fd;
                    buf[n] = 0;
                    return parse_flags(buf, n);
                }
                close(f);
            }
        }
    }
    snprintf(path, sizeof path, "/proc/%d/fdinfo/%d", tid, fd);
    const char *p = proc_field(open(path, O_RDONLY | O_CLOEXEC), buf, sizeof buf, "flags:");
    return p ? (long)strtoul(p, NULL, 8) : -1;
}

static int read_mem(int pid, uint64_t addr, void *buf, size_t len)
{
    struct iovec local = {buf, len}, remote = {(void *)(uintptr_t)addr, len};
    ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    return n == (ssize_t)len ? 0 : -1;
}

static int write_mem(int pid, uint64_t addr, const void *buf, size_t len)
{
    struct iovec local = {(void *)buf, len}, remote = {(void *)(uintptr_t)addr, len};
    ssize_t n = process_vm_writev(pid, &local, 1, &remote, 1, 0);
    return n == (ssize_t)len ? 0 : -1;
}

static int tgid_of(int tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/status", tid);
    const char *p = proc_field(open(path, O_RDONLY | O_CLOEXEC), buf, sizeof buf, "\nTgid:");
    return p ? atoi(p) : -1;
}

static void pc_drop(struct pcache *e)
{
    if (e->tid) {
        close(e->pidfd);
        if (e->infofd >= 0)
            close(e->infofd);
        for (int k = 0; k < PFD; k++)
            if (e->ffd[k] >= 0)
                close(e->ffd[k]);
    }
    e->tid = 0;
    e->pidfd = e->infofd = -1;
    for (int k = 0; k < PFD; k++)
        e->ffd[k] = e->fnum[k] = -1;
}

/* Which classes may be bypassed now: the supervisor rewrites it when the
 * egress policy changes (set_policy). */
static uint32_t scope_now(struct handler *h)
{
    return (uint32_t)__atomic_load_n(&h->sh->scope, __ATOMIC_ACQUIRE) &
           (NSB_GATEWAY | NSB_EGRESS);
}

/* Whether a decision of this kind goes to the audit log now (the
 * supervisor sets nsb_shared.audit from --audit and the policy). */
static int auditing(struct handler *h, uint64_t what)
{
    return h->cfg->audit_fd >= 0 && (__atomic_load_n(&h->sh->audit, __ATOMIC_ACQUIRE) & what);
}

/* One audit record to the supervisor: a write to a non-blocking stream
 * socket, never a wait.  Over NSB_AUDIT_RATE a second (burst
 * NSB_AUDIT_BURST), or when the supervisor has not read the socket, it is
 * counted in audit_lost instead.  `sock`: the host socket (its port is the
 * source port), or -1; `dst`: the address the command asked for. */
static void audit(struct handler *h, int action, int sock, const struct sockaddr_storage *dst)
{
    int64_t now = now_ms();
    h->audit_tokens += (double)(now - h->audit_refill_ms) * NSB_AUDIT_RATE / 1000.0;
    if (h->audit_tokens > NSB_AUDIT_BURST)
        h->audit_tokens = NSB_AUDIT_BURST;
    h->audit_refill_ms = now;
    if (h->audit_tokens < 1.0) {
        h->sh->audit_lost++;
        return;
    }
    h->audit_tokens -= 1.0;
    struct nsb_audit r;
    memset(&r, 0, sizeof r);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    r.time_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    r.action = (uint8_t)action;
    struct sockaddr_storage local;
    socklen_t len = sizeof local;
    uint16_t sport = 0;
    if (sock >= 0 && getsockname(sock, (struct sockaddr *)&local, &len) == 0)
        sport = local.ss_family == AF_INET ? ((struct sockaddr_in *)&local)->sin_port
                                           : ((struct sockaddr_in6 *)&local)->sin6_port;
    r.sport = ntohs(sport);
    if (dst->ss_family == AF_INET) {
        const struct sockaddr_in *d = (const struct sockaddr_in *)dst;
        r.family = 4;
        memcpy(r.src, h->cfg->guest4, 4);
        memcpy(r.dst, &d->sin_addr, 4);
        r.dport = ntohs(d->sin_port);
    } else {
        const struct sockaddr_in6 *d = (const struct sockaddr_in6 *)dst;
        r.family = 6;
        if (h->cfg->flags & NSB_GUEST6)
            memcpy(r.src, h->cfg->guest6, 16);
        memcpy(r.dst, &d->sin6_addr, 16);
        r.dport = ntohs(d->sin6_port);
    }
    if (send(h->cfg->audit_fd, &r, sizeof r, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)sizeof r) {
        h->sh->audit_lost++; /* full (the supervisor is stopped) or gone */
        h->audit_tokens += 1.0;
    }
}

/* A copy of the command's fd, or -1 (errno).  A new pidfd is opened after
 * the notification and the id re-checked: the id cannot have been reused.
 * *pe: the thread's cache entry (for fd_flags), or NULL. */
static int grab_fd(struct handler *h, const struct seccomp_notif *n, int fd, struct pcache **pe)
{
    struct pcache *e = &h->pc[n->pid % PCACHE];
    *pe = NULL;
    if (e->tid == (int)n->pid) {
        int s = (int)syscall(SYS_pidfd_getfd, e->pidfd, fd, 0);
        if (s >= 0) {
            *pe = e;
            return s;
        }
        if (errno != ESRCH && errno != EBADF)
            return -1;
        pc_drop(e); /* gone: a new thread may have the id now */
    }
    /* n->pid is the calling thread's id: a thread pidfd (PIDFD_THREAD,
     * Linux 6.9), else the thread group's leader from /proc */
    int thread = 1;
    int pidfd = (int)syscall(SYS_pidfd_open, n->pid, PIDFD_THREAD);
    if (pidfd < 0 && errno == EINVAL) {
        thread = 0;
        pidfd = (int)syscall(SYS_pidfd_open, n->pid, 0);
        if (pidfd < 0 && errno == EINVAL)
            pidfd = (int)syscall(SYS_pidfd_open, tgid_of(n->pid), 0);
    }
    if (pidfd < 0)
        return -1;
    if (!id_valid(h, n->id)) {
        close(pidfd);
        return -1;
    }
    int s = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    int err = errno;
    if (s >= 0 && thread) {
        pc_drop(e);
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/fdinfo", (int)n->pid);
        e->tid = (int)n->pid;
        e->pidfd = pidfd;
        e->infofd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        *pe = e;
        return s;
    }
    close(pidfd);
    errno = err;
    return s;
}

/* ------------------------------------------------------------------------ */
/* The decision: where a connect to `dst` goes, on our copy of the address.
 * Returns 1 (bypass: `host` is where the host socket connects, *lo set for
 * the gateway alias) or 0 (the namespace's normal path). */

static int in_net4(const struct nsb_config *c, const uint8_t *a)
{
    for (int i = 0; i < 4; i++)
        if ((a[i] & c->mask4[i]) != c->net4[i])
            return 0;
    return 1;
}

static int decide(const struct nsb_config *c, uint32_t scope, int family,
                  const struct sockaddr_storage *dst, struct sockaddr_storage *host,
                  socklen_t *hlen, int *lo)
{
    *lo = 0;
    if (family == AF_INET) {
        const struct sockaddr_in *d = (const struct sockaddr_in *)dst;
        const uint8_t *a = (const uint8_t *)&d->sin_addr;
        if (d->sin_port == 0)
            return 0;
        struct sockaddr_in *o = (struct sockaddr_in *)host;
        memset(o, 0, sizeof *o);
        o->sin_family = AF_INET;
        o->sin_port = d->sin_port;
        *hlen = sizeof *o;
        if (memcmp(a, c->gw4, 4) == 0) {
            if (!(scope & NSB_GATEWAY))
                return 0;
            o->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            *lo = 1;
            return 1;
        }
        if (!(scope & NSB_EGRESS) || in_net4(c, a))
            return 0;
        /* not: 0/8 this-network, 127/8 the namespace's own loopback,
         * multicast/broadcast/reserved 224/3 */
        if (a[0] == 0 || a[0] == 127 || a[0] >= 224)
            return 0;
        o->sin_addr = d->sin_addr;
        return 1;
    }
    if (family == AF_INET6 && (c->flags & NSB_IPV6)) {
        const struct sockaddr_in6 *d = (const struct sockaddr_in6 *)dst;
        const uint8_t *a = d->sin6_addr.s6_addr;
        if (d->sin6_port == 0 || d->sin6_scope_id != 0)
            return 0;
        struct sockaddr_in6 *o = (struct sockaddr_in6 *)host;
        memset(o, 0, sizeof *o);
        o->sin6_family = AF_INET6;
        o->sin6_port = d->sin6_port;
        o->sin6_flowinfo = d->sin6_flowinfo;
        *hlen = sizeof *o;
        if (memcmp(a, c->gw6, 16) == 0) {
            if (!(scope & NSB_GATEWAY))
                return 0;
            o->sin6_addr = in6addr_loopback;
            *lo = 1;
            return 1;
        }
        if (!(scope & NSB_EGRESS) || memcmp(a, c->prefix6, 8) == 0)
            return 0;
        /* only global unicast 2000::/3 (no ::1, v4-mapped, ULA, link-local,
         * multicast) */
        if ((a[0] & 0xe0) != 0x20)
            return 0;
        o->sin6_addr = d->sin6_addr;
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */

/* Options of the command's socket `src` worth keeping on the host socket
 * `dst`.  Buffer sizes only when the command set them (they differ from a
 * fresh socket's): a fixed size turns autotuning off. */
static void copy_options(const struct nsb_config *c, int src, int dst, int family)
{
    int v;
    if (getint(src, IPPROTO_TCP, TCP_NODELAY, &v) == 0 && v)
        setsockopt(dst, IPPROTO_TCP, TCP_NODELAY, &v, sizeof v);
    if (getint(src, SOL_SOCKET, SO_SNDBUF, &v) == 0 && v != c->def_sndbuf) {
        v /= 2; /* the kernel doubles what it is given */
        setsockopt(dst, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
    }
    if (getint(src, SOL_SOCKET, SO_RCVBUF, &v) == 0 && v != c->def_rcvbuf) {
        v /= 2;
        setsockopt(dst, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
    }
    if (getint(src, SOL_SOCKET, SO_KEEPALIVE, &v) == 0 && v) {
        setsockopt(dst, SOL_SOCKET, SO_KEEPALIVE, &v, sizeof v);
        static const int kopts[] = {TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT};
        for (unsigned i = 0; i < 3; i++)
            if (getint(src, IPPROTO_TCP, kopts[i], &v) == 0)
                setsockopt(dst, IPPROTO_TCP, kopts[i], &v, sizeof v);
    }
    struct linger lg;
    socklen_t len = sizeof lg;
    if (getsockopt(src, SOL_SOCKET, SO_LINGER, &lg, &len) == 0 && lg.l_onoff)
        setsockopt(dst, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    struct timeval tv;
    static const int topts[] = {SO_SNDTIMEO, SO_RCVTIMEO};
    for (unsigned i = 0; i < 2; i++) {
        len = sizeof tv;
        if (getsockopt(src, SOL_SOCKET, topts[i], &tv, &len) == 0 && (tv.tv_sec || tv.tv_usec))
            setsockopt(dst, SOL_SOCKET, topts[i], &tv, sizeof tv);
    }
    if (getint(src, SOL_SOCKET, SO_OOBINLINE, &v) == 0 && v)
        setsockopt(dst, SOL_SOCKET, SO_OOBINLINE, &v, sizeof v);
    if (getint(src, IPPROTO_TCP, TCP_USER_TIMEOUT, &v) == 0 && v)
        setsockopt(dst, IPPROTO_TCP, TCP_USER_TIMEOUT, &v, sizeof v);
    if (getint(src, SOL_SOCKET, SO_PRIORITY, &v) == 0 && v)
        setsockopt(dst, SOL_SOCKET, SO_PRIORITY, &v, sizeof v);
    if (family == AF_INET) {
        if (getint(src, IPPROTO_IP, IP_TOS, &v) == 0 && v)
            setsockopt(dst, IPPROTO_IP, IP_TOS, &v, sizeof v);
    } else {
        if (getint(src, IPPROTO_IPV6, IPV6_TCLASS, &v) == 0 && v > 0)
            setsockopt(dst, IPPROTO_IPV6, IPV6_TCLASS, &v, sizeof v);
    }
}

/* The command's socket is one the handler may replace: TCP over IPv4/IPv6
 * of the given family, unbound (or bound to the wildcard without a port,
 * IP_BIND_ADDRESS_NO_PORT), not bound to a device, not connected. */
static int replaceable(int s, int family)
{
    int v;
    /* IPPROTO_TCP: a SOCK_STREAM socket (MPTCP and SCTP are other protocols) */
    if (getint(s, SOL_SOCKET, SO_PROTOCOL, &v) < 0 || v != IPPROTO_TCP)
        return 0;
    if (getint(s, SOL_SOCKET, SO_BINDTOIFINDEX, &v) < 0 || v != 0)
        return 0;
    /* the family, and no local port: neither listening nor connecting nor
     * connected (all of which hold a port) */
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(s, (struct sockaddr *)&ss, &len) < 0 || ss.ss_family != family)
        return 0;
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        return a->sin_port == 0 && a->sin_addr.s_addr == htonl(INADDR_ANY);
    }
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    if (a->sin6_port != 0 || memcmp(&a->sin6_addr, &in6addr_any, 16) != 0)
        return 0;
    /* v4-mapped destinations are not bypassed; V6ONLY does not matter */
    return 1;
}

/* Install `sock` as the command's `fd` and answer `err` (0, EINPROGRESS).
 * Takes `sock`; dst: where it connects (NULL: connected, it knows).
 * Returns 0 when installed. */
static int install(struct handler *h, uint64_t id, int fd, int sock, int cloexec,
                   int nonblock, int err, int family, const struct sockaddr_storage *dst)
{
    if (!nonblock) /* ours: O_NONBLOCK is the only status flag it has */
        fcntl(sock, F_SETFL, 0);
    struct seccomp_notif_addfd a;
    memset(&a, 0, sizeof a);
    a.id = id;
    a.flags = SECCOMP_ADDFD_FLAG_SETFD;
    a.srcfd = (uint32_t)sock;
    a.newfd = (uint32_t)fd;
    a.newfd_flags = cloexec ? O_CLOEXEC : 0;
    if (ioctl(h->lfd, SECCOMP_IOCTL_NOTIF_ADDFD, &a) < 0) {
        close(sock);
        return -1; /* interrupted (ESRCH/ENOENT): the syscall restarts or is gone */
    }
    nsb_diag_track(sock, dst); /* its bytes, for get_stats (bypassdiag.c) */
    later(h, sock);
    /* counted before the reply: what the command does next may read them */
    h->sh->bypassed++;
    if (family == AF_INET6)
        h->sh->bypassed6++;
    reply(h, id, 0, err, 0);
    return 0;
}

static int sock_error(int s)
{
    int e = 0;
    socklen_t len = sizeof e;
    if (getsockopt(s, SOL_SOCKET, SO_ERROR, &e, &len) < 0)
        return errno;
    return e;
}

/* Whether a connecting socket has finished: 0 not yet; 1 connected;
 * 2 with an error or hung up (SO_ERROR says which).  POLLOUT alone is
 * tcp_poll's "established, no error". */
static int connected_now(int s)
{
    struct pollfd p = {s, POLLOUT, 0};
    if (poll(&p, 1, 0) != 1)
        return 0;
    return p.revents & (POLLERR | POLLHUP) ? 2 : 1;
}

static void add_pending(struct handler *h, const struct seccomp_notif *n, int slot, int fd,
                        int sock, int cloexec, int src, int family)
{
    if (h->npend == h->cappend) {
        size_t cap = h->cappend ? h->cappend * 2 : 16;
        struct pending *p = realloc(h->pend, cap * sizeof *p);
        if (!p) {
            close(sock);
            reply(h, n->id, 0, ENOMEM, 0);
            slot_free(h, slot);
            return;
        }
        h->pend = p;
        h->cappend = cap;
    }
    struct pending *p = &h->pend[h->npend++];
    p->id = n->id;
    p->slot = slot;
    p->fd = fd;
    p->sock = sock;
    p->cloexec = cloexec;
    p->family = family;
    p->deadline_ms = 0;
    p->recheck_ms = now_ms() + 1000;
    struct timeval tv;
    socklen_t len = sizeof tv;
    if (src >= 0 && getsockopt(src, SOL_SOCKET, SO_SNDTIMEO, &tv, &len) == 0 &&
        (tv.tv_sec || tv.tv_usec))
        p->deadline_ms = now_ms() + (int64_t)tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000;
    h->sh->pending = h->npend;
}

/* Connect a new host socket for the command's `orig` (its fd `fd`). */
static void bypass_connect(struct handler *h, const struct seccomp_notif *n, int slot, int fd,
                           int orig, struct pcache *pc, int family, const struct sockaddr_storage *dst,
                           int lo, const struct sockaddr_storage *asked)
{
    long fl = fd_flags(pc, (int)n->pid, fd);
    if (fl < 0) { /* the command is gone, or /proc says no: the file's flags */
        fl = fcntl(orig, F_GETFL);
        fl = fl < 0 ? O_CLOEXEC : fl | O_CLOEXEC;
    }
    int nonblock = (fl & O_NONBLOCK) != 0;
    int cloexec = (fl & O_CLOEXEC) != 0;
    int s = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (s < 0) {
        int e = errno;
        h->sh->errors++;
        reply(h, n->id, 0, e, 0); /* EMFILE, ENOBUFS...: what socket() would say */
        return;
    }
    copy_options(h->cfg, orig, s, family);
    socklen_t dlen = family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
    if (lo) {
        /* The gateway alias reaches the host's loopback and nothing else:
         * bound to lo, this socket cannot be reconnected anywhere else. */
        if (setsockopt(s, SOL_SOCKET, SO_BINDTODEVICE, "lo", 3) < 0) {
            h->sh->errors++;
            close(s);
            h->sh->fallback++;
            cont(h, n->id);
            return;
        }
    } else if ((family == AF_INET && (h->cfg->flags & NSB_OUT4)) ||
               (family == AF_INET6 && (h->cfg->flags & NSB_OUT6))) {
        struct sockaddr_storage b;
        memset(&b, 0, sizeof b);
        if (family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&b;
            a->sin_family = AF_INET;
            memcpy(&a->sin_addr, h->cfg->outbound4, 4);
        } else {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&b;
            a->sin6_family = AF_INET6;
            memcpy(&a->sin6_addr, h->cfg->outbound6, 16);
        }
        int one = 1;
        setsockopt(s, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&b, dlen) < 0) {
            int e = errno;
            close(s);
            h->sh->failed++;
            reply(h, n->id, 0, e, 0);
            return;
        }
    }
    int rc = connect(s, (const struct sockaddr *)dst, dlen);
    int err = rc == 0 ? 0 : errno;
    if (auditing(h, NSB_AUDIT_ALL))
        audit(h, 0, s, asked); /* allowed, whatever the host answers (as on the SYN) */
    int done = err == EINPROGRESS ? connected_now(s) : 0;
    if (done) /* loopback: decided already */
        err = done == 2 ? sock_error(s) : 0, rc = err ? -1 : 0;
    if (rc == 0 || err == EINPROGRESS) {
        if (rc == 0 || nonblock) {
            /* a non-blocking connect says EINPROGRESS, as the kernel does
             * on loopback; the socket completes (or fails) on its own */
            install(h, n->id, fd, s, cloexec, nonblock, nonblock ? EINPROGRESS : 0, family, dst);
            return;
        }
        add_pending(h, n, slot, fd, s, cloexec, orig, family);
        return;
    }
    /* failed at once (refused, unreachable): the command's own socket stays,
     * unconnected, as after a failed connect; it gets the errno */
    later(h, s);
    h->sh->failed++;
    reply(h, n->id, 0, err, 0);
}

static void finish_pending(struct handler *h, size_t i, int timed_out)
{
    struct pending p = h->pend[i];
    h->pend[i] = h->pend[--h->npend];
    h->sh->pending = h->npend;
    if (timed_out) {
        /* SO_SNDTIMEO ran out: connect says EINPROGRESS, the socket goes on */
        install(h, p.id, p.fd, p.sock, p.cloexec, 0, EINPROGRESS, p.family, NULL);
    } else {
        int err = sock_error(p.sock);
        if (err) {
            h->sh->failed++;
            later(h, p.sock);
            reply(h, p.id, 0, err, 0);
        } else {
            install(h, p.id, p.fd, p.sock, p.cloexec, 0, 0, p.family, NULL);
        }
    }
    slot_free(h, p.slot);
}

static void on_connect(struct handler *h, const struct seccomp_notif *n, int slot)
{
    int fd = (int)n->data.args[0];
    uint64_t uaddr = n->data.args[1];
    uint64_t ulen = n->data.args[2];
    struct sockaddr_storage dst;
    memset(&dst, 0, sizeof dst);
    if (ulen < sizeof(sa_family_t) || ulen > sizeof dst) {
        cont(h, n->id); /* the kernel says EINVAL */
        return;
    }
    size_t want = ulen > sizeof(struct sockaddr_in6) ? sizeof(struct sockaddr_in6) : ulen;
    if (read_mem((int)n->pid, uaddr, &dst, want) < 0) {
        cont(h, n->id); /* EFAULT, from the kernel */
        return;
    }
    /* The copy is ours from here on; is it still the same live call? */
    if (!id_valid(h, n->id))
        return;
    int family = dst.ss_family;
    struct pcache *pc;
    int orig = grab_fd(h, n, fd, &pc);
    if (orig < 0) {
        if (errno == EBADF || errno == ESRCH || errno == ENOENT) {
            cont(h, n->id); /* EBADF from the kernel, or gone */
        } else {
            h->sh->errors++; /* EPERM...: we cannot look, the normal path can */
            h->sh->fallback++;
            cont(h, n->id);
        }
        return;
    }
    uint64_t cookie = netns_cookie(orig);
    struct sockaddr_storage host;
    socklen_t hlen;
    int lo;
    if (cookie == h->cfg->ns_cookie) {
        if ((family == AF_INET && ulen >= sizeof(struct sockaddr_in)) ||
            (family == AF_INET6 && ulen >= 24 /* SIN6_LEN_RFC2133 */)) {
            if (decide(h->cfg, scope_now(h), family, &dst, &host, &hlen, &lo) && replaceable(orig, family)) {
                later(h, orig);
                bypass_connect(h, n, slot, fd, orig, pc, family, &host, lo, &dst);
                return;
            }
        }
        h->sh->fallback++;
        later(h, orig);
        cont(h, n->id);
        return;
    }
    if (cookie != h->host_cookie || cookie == 0) {
        /* a socket of another namespace (one the command made): its own
         * network decides */
        later(h, orig);
        cont(h, n->id);
        return;
    }
    /* A socket of the host's namespace: one the handler installed (or one the
     * command inherited).  Never CONTINUE: the kernel would connect it, in
     * the host's namespace, to whatever the command's memory says then. */
    int v = 0;
    if (getint(orig, SOL_SOCKET, SO_PROTOCOL, &v) < 0 || v != IPPROTO_TCP) {
        later(h, orig);
        cont(h, n->id); /* not TCP: the command can sendto() anywhere with it anyway */
        return;
    }
    if (family == AF_UNSPEC) {
        struct sockaddr sa = {.sa_family = AF_UNSPEC};
        int rc = connect(orig, &sa, sizeof sa);
        int e = rc < 0 ? errno : 0;
        later(h, orig);
        reply(h, n->id, 0, e, 0);
        return;
    }
    struct tcp_info ti;
    socklen_t len = sizeof ti;
    int state = getsockopt(orig, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 ? ti.tcpi_state : -1;
    int dom = 0;
    getint(orig, SOL_SOCKET, SO_DOMAIN, &dom);
    if (state == TCP_CLOSE) {
        if (dom == family &&
            ((family == AF_INET && ulen >= sizeof(struct sockaddr_in)) ||
             (family == AF_INET6 && ulen >= 24)) &&
            decide(h->cfg, scope_now(h), family, &dst, &host, &hlen, &lo)) {
            later(h, orig);
            bypass_connect(h, n, slot, fd, orig, pc, family, &host, lo, &dst);
        } else {
            if ((family == AF_INET || family == AF_INET6) && auditing(h, NSB_AUDIT_DENY))
                audit(h, 1, -1, &dst);
            later(h, orig);
            reply(h, n->id, 0, ENETUNREACH, 0);
        }
        return;
    }
    if (state == TCP_SYN_SENT || state == TCP_SYN_RECV) {
        int fl = fcntl(orig, F_GETFL);
        if (fl >= 0 && (fl & O_NONBLOCK)) {
            later(h, orig);
            reply(h, n->id, 0, EALREADY, 0);
            return;
        }
        /* a second blocking connect on a connecting socket waits for it;
         * completion is answered without replacing anything */
        add_pending(h, n, slot, -1, orig, 0, orig, family);
        return;
    }
    later(h, orig);
    reply(h, n->id, 0, EISCONN, 0);
}

/* getsockname/getpeername on a bypassed socket: the namespace's view. */
static void on_name(struct handler *h, const struct seccomp_notif *n, int peer)
{
    int fd = (int)n->data.args[0];
    struct pcache *pc;
    int s = grab_fd(h, n, fd, &pc);
    if (s < 0) {
        cont(h, n->id);
        return;
    }
    uint64_t cookie = netns_cookie(s);
    int v = 0;
    if (cookie != h->host_cookie || getint(s, SOL_SOCKET, SO_PROTOCOL, &v) < 0 ||
        v != IPPROTO_TCP || (getint(s, SOL_SOCKET, SO_ACCEPTCONN, &v) == 0 && v)) {
        close(s);
        cont(h, n->id);
        return;
    }
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t slen = sizeof ss;
    int rc = peer ? getpeername(s, (struct sockaddr *)&ss, &slen)
                  : getsockname(s, (struct sockaddr *)&ss, &slen);
    if (rc < 0) {
        int e = errno;
        close(s);
        reply(h, n->id, 0, e, 0);
        return;
    }
    int bound_lo = getint(s, SOL_SOCKET, SO_BINDTOIFINDEX, &v) == 0 && v == 1;
    close(s);
    const struct nsb_config *c = h->cfg;
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        if (!peer)
            memcpy(&a->sin_addr, c->guest4, 4);
        else if (bound_lo && ((const uint8_t *)&a->sin_addr)[0] == 127)
            memcpy(&a->sin_addr, c->gw4, 4);
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        if (!peer) {
            if (c->flags & NSB_GUEST6)
                memcpy(&a->sin6_addr, c->guest6, 16);
        } else if (bound_lo && memcmp(&a->sin6_addr, &in6addr_loopback, 16) == 0) {
            memcpy(&a->sin6_addr, c->gw6, 16);
        }
    }
    /* value-result addrlen, as the kernel does: copy min(len, real), set real */
    uint32_t ulen;
    if (read_mem((int)n->pid, n->data.args[2], &ulen, sizeof ulen) < 0 || (int32_t)ulen < 0) {
        cont(h, n->id); /* EFAULT/EINVAL from the kernel */
        return;
    }
    size_t copy = ulen < slen ? ulen : slen;
    if (!id_valid(h, n->id))
        return;
    if ((copy && write_mem((int)n->pid, n->data.args[1], &ss, copy) < 0) ||
        write_mem((int)n->pid, n->data.args[2], &slen, sizeof(uint32_t)) < 0) {
        reply(h, n->id, 0, EFAULT, 0);
        return;
    }
    h->sh->translated++;
    reply(h, n->id, 0, 0, 0);
}

/* ------------------------------------------------------------------------ */

int nsb_probe(int listener)
{
    struct seccomp_notif_addfd a;
    memset(&a, 0, sizeof a);
    a.id = ~(uint64_t)0; /* no such notification */
    a.flags = SECCOMP_ADDFD_FLAG_SETFD | SECCOMP_ADDFD_FLAG_SEND;
    a.srcfd = 0;
    a.newfd = 0;
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &a) == 0)
        return 0;
    return errno == ENOENT ? 0 : errno;
}

int nsb_load_filter(const void *prog, uint32_t n)
{
    if (n == 0 || n > 0xffff)
        return -EINVAL;
    struct sock_fprog fp = {(unsigned short)n, (struct sock_filter *)prog};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    long rc = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fp);
    if (rc < 0)
        return -errno;
    return rc == 0 ? 0 : -ESRCH; /* rc > 0: the id of a thread that could not */
}

static void answer_leftovers(struct handler *h)
{
    for (int i = 0; i < NSB_SLOTS; i++) {
        uint64_t id = h->sh->inflight[i];
        if (!id)
            continue;
        if (id_valid(h, id)) {
            reply(h, id, 0, ECONNABORTED, 0);
            h->sh->aborted++;
        }
        slot_free(h, i);
    }
}

int nsb_run(int listener, const struct nsb_config *cfg, struct nsb_shared *sh)
{
    struct handler h = {.lfd = listener, .cfg = cfg, .sh = sh,
                        .audit_tokens = NSB_AUDIT_BURST, .audit_refill_ms = now_ms()};
    for (int i = 0; i < PCACHE; i++) {
        h.pc[i].tid = 0;
        pc_drop(&h.pc[i]);
    }
    int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (t < 0)
        return -errno;
    h.host_cookie = netns_cookie(t);
    close(t);
    if (!h.host_cookie)
        return -ENOPROTOOPT;
    answer_leftovers(&h);
    nsb_diag_start(sh, cfg->diag_fd);
    /* The command waits while we work: the kernel may as well wake this
     * process on the command's CPU for the notification, and the command
     * on ours for the reply, instead of waking an idle CPU (an IPI, and on
     * a VM an exit) each way.  Linux 6.6; older kernels say EINVAL (no such
     * ioctl): the wake-ups stay ordinary ones, slower, nothing else
     * changes.  docs/performance.md has the measurements. */
    int sw = ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                   (unsigned long)SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP);
    sh->sync_wakeup = sw == 0;
    struct seccomp_notif_sizes sizes;
    if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) < 0)
        return -errno;
    size_t nsz = sizes.seccomp_notif > sizeof(struct seccomp_notif) ? sizes.seccomp_notif
                                                                      : sizeof(struct seccomp_notif);
    struct seccomp_notif *n = malloc(nsz);
    struct pollfd *pfd = NULL;
    size_t cappfd = 0;
    if (!n)
        return -ENOMEM;
    /* --enable-seccomp: from here on (both threads: the byte-tracking one
     * has started, see nsb_diag_start), only the calls the loop needs;
     * nothing the command sent has been read yet. */
    if (cfg->filter) {
        int e = nsb_load_filter(cfg->filter, cfg->filter_len);
        if (e < 0) {
            free(n);
            return e;
        }
    }
    for (;;) {
        if (cappfd < h.npend + 1) {
            cappfd = (h.npend + 1) * 2;
            struct pollfd *p = realloc(pfd, cappfd * sizeof *p);
            if (!p)
                return -ENOMEM;
            pfd = p;
        }
        pfd[0].fd = listener;
        pfd[0].events = POLLIN;
        int64_t now = now_ms(), next = -1;
        for (size_t i = 0; i < h.npend; i++) {
            pfd[i + 1].fd = h.pend[i].sock;
            pfd[i + 1].events = POLLOUT;
            int64_t d = h.pend[i].recheck_ms;
            if (h.pend[i].deadline_ms && h.pend[i].deadline_ms < d)
                d = h.pend[i].deadline_ms;
            if (next < 0 || d < next)
                next = d;
        }
        int timeout = next < 0 ? -1 : next <= now ? 0 : (int)(next - now);
        int rc = poll(pfd, h.npend + 1, timeout);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        now = now_ms();
        /* pending connects first (from the end: finishing one moves the last) */
        for (size_t i = h.npend; i-- > 0;) {
            struct pending *p = &h.pend[i];
            if (pfd[i + 1].revents) {
                if (p->fd < 0) { /* a second connect on a connecting socket */
                    struct pending q = *p;
                    h.pend[i] = h.pend[--h.npend];
                    int e = sock_error(q.sock);
                    reply(&h, q.id, 0, e, 0);
                    close(q.sock);
                    slot_free(&h, q.slot);
                    h.sh->pending = h.npend;
                } else {
                    finish_pending(&h, i, 0);
                }
            } else if (p->deadline_ms && now >= p->deadline_ms && p->fd >= 0) {
                finish_pending(&h, i, 1);
            } else if (now >= p->recheck_ms) {
                if (!id_valid(&h, p->id)) { /* the command gave up (signal, exit) */
                    close(p->sock);
                    slot_free(&h, p->slot);
                    h.pend[i] = h.pend[--h.npend];
                    h.sh->pending = h.npend;
                } else {
                    p->recheck_ms = now + 1000;
                }
            }
        }
        if (pfd[0].revents & POLLIN) {
            memset(n, 0, nsz);
            if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, n) < 0) {
                if (errno == EINTR || errno == ENOENT)
                    continue;
                free(n);
                return -errno;
            }
            h.sh->notifications++;
            int slot = slot_take(&h, n->id);
            int nr = n->data.nr;
            size_t before = h.npend;
            if (n->data.arch != cfg->audit_arch) /* another ABI: its numbers mean other calls */
                cont(&h, n->id);
            else if (nr == cfg->nr_connect)
                on_connect(&h, n, slot);
            else if (nr == cfg->nr_getsockname)
                on_name(&h, n, 0);
            else if (nr == cfg->nr_getpeername)
                on_name(&h, n, 1);
            else
                cont(&h, n->id);
            if (h.npend == before) /* not waiting: answered (or gone) */
                slot_free(&h, slot);
        } else if (pfd[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            break; /* no task of the command is left */
        }
    }
    for (size_t i = 0; i < h.npend; i++)
        close(h.pend[i].sock);
    free(h.pend);
    free(pfd);
    free(n);
    return 0;
}
