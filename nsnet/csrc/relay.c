/* nsnet's fast path for published ports: a splice(2) relay between pairs
 * of connected kernel sockets (see nsnet/supervisor/fastpath.py, docs/fastpath.md).
 *
 * One relay context owns an epoll instance and any number of connection
 * pairs.  Each pair is an outer socket (the client's connection, accepted
 * in the host namespace) and an inner socket (connected to the guest port
 * inside the target namespace), and one pipe per direction:
 *
 *     outer --splice--> pipe[0] --splice--> inner
 *     inner --splice--> pipe[1] --splice--> outer
 *
 * Sockets are registered edge-triggered (EPOLLIN|EPOLLOUT|EPOLLRDHUP|
 * EPOLLET), so no interest changes are ever needed: every event on either
 * socket of a pair pumps both directions until each is blocked on EAGAIN
 * (source empty, or destination full).  A blocked direction always has an
 * edge coming that wakes it again: new data or EOF on the source, or free
 * space on the destination.  A direction that has moved a lot in one go is
 * put on a "again" list and resumed on the next turn, so that one fast
 * connection cannot starve the others.
 *
 * EOF on a source, once its pipe is drained, becomes shutdown(SHUT_WR) on
 * the destination (half-close is relayed); a pair whose two directions are
 * both shut is closed.  A hard error on either socket (reset, EPIPE) closes
 * both with SO_LINGER 0, so the other peer sees a reset, as it would have
 * seen with a direct connection.
 *
 * relay_run() returns to its caller when one of the "wake" fds (the
 * caller's control sockets and listeners) is readable, or after its time
 * budget: the caller (Python) runs it with the GIL released and never
 * sees a data chunk.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "relay.h"

#define RELAY_EVENTS 128
/* Rounds (one splice in, one splice out) a direction may make per event
 * before it yields to the others. */
#define RELAY_ROUNDS 16

struct relay_dir {
    int pr, pw;     /* the pipe: read end, write end */
    size_t cap;     /* the pipe's size */
    size_t inpipe;  /* bytes in the pipe */
    int eof;        /* the source said EOF */
    int shut;       /* shutdown(SHUT_WR) done on the destination */
};

struct relay_conn {
    int fd[2];               /* 0: outer, 1: inner */
    struct relay_dir d[2];   /* d[0]: fd[0] -> fd[1]; d[1]: fd[1] -> fd[0] */
    int dead;
    int queued;              /* on the "again" list */
    struct relay_conn *prev, *next;      /* all live connections */
    struct relay_conn *again_next;       /* the "again" list */
};

struct relay {
    int ep;
    size_t pipe_size;
    char wake_marker;
    struct relay_conn *conns;
    struct relay_conn *again;
    struct relay_conn *zombies;  /* closed in this turn; freed at its end */
    struct relay_stats stats;
};

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

struct relay *relay_new(size_t pipe_size)
{
    struct relay *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->ep = epoll_create1(EPOLL_CLOEXEC);
    if (r->ep < 0) {
        free(r);
        return NULL;
    }
    r->pipe_size = pipe_size ? pipe_size : 65536;
    return r;
}

int relay_watch(struct relay *r, int fd)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &r->wake_marker};
    return epoll_ctl(r->ep, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int relay_unwatch(struct relay *r, int fd)
{
    return epoll_ctl(r->ep, EPOLL_CTL_DEL, fd, NULL) < 0 ? -errno : 0;
}

static void close_pipe(struct relay_dir *d)
{
    if (d->pr >= 0)
        close(d->pr);
    if (d->pw >= 0)
        close(d->pw);
    d->pr = d->pw = -1;
}

static void reset_socket(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

/* Close a pair now (fds, pipes); the struct lives until the turn ends,
 * because the same batch of events may still point at it. */
static void conn_close(struct relay *r, struct relay_conn *c, int reset)
{
    if (c->dead)
        return;
    c->dead = 1;
    for (int i = 0; i < 2; i++) {
        epoll_ctl(r->ep, EPOLL_CTL_DEL, c->fd[i], NULL);
        if (reset)
            reset_socket(c->fd[i]);
        close(c->fd[i]);
        close_pipe(&c->d[i]);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        r->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = r->zombies;
    r->zombies = c;
    r->stats.active--;
    if (reset)
        r->stats.reset++;
    else
        r->stats.closed++;
}

static int make_pipe(struct relay *r, struct relay_dir *d)
{
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        return -errno;
    d->pr = p[0];
    d->pw = p[1];
    /* A larger pipe means fewer splice calls; failure (e.g. past the
     * user's pipe-user-pages-soft) keeps the default size. */
    int got = fcntl(p[1], F_SETPIPE_SZ, (int)r->pipe_size);
    if (got < 0)
        got = fcntl(p[1], F_GETPIPE_SZ);
    return got > 0 ? got : 4096;
}

/* Take ownership of two connected sockets and relay between them.
 * On failure both are closed (reset) and -errno is returned. */
int relay_add(struct relay *r, int outer, int inner)
{
    struct relay_conn *c = calloc(1, sizeof(*c));
    int err = 0, one = 1;
    if (!c) {
        err = -ENOMEM;
        goto fail_fds;
    }
    c->fd[0] = outer;
    c->fd[1] = inner;
    c->d[0].pr = c->d[0].pw = c->d[1].pr = c->d[1].pw = -1;
    for (int i = 0; i < 2; i++) {
        int sz = make_pipe(r, &c->d[i]);
        if (sz < 0) {
            err = sz;
            goto fail;
        }
        c->d[i].cap = (size_t)sz;
        if (set_nonblock(c->fd[i]) < 0) {
            err = -errno;
            goto fail;
        }
        /* The relay must not add latency: the original sender already
         * decided when to push; Nagle here would delay small replies. */
        setsockopt(c->fd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {
            .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
            .data.ptr = c,
        };
        if (epoll_ctl(r->ep, EPOLL_CTL_ADD, c->fd[i], &ev) < 0) {
            err = -errno;
            epoll_ctl(r->ep, EPOLL_CTL_DEL, c->fd[0], NULL);
            goto fail;
        }
    }
    c->next = r->conns;
    if (r->conns)
        r->conns->prev = c;
    r->conns = c;
    r->stats.active++;
    r->stats.total++;
    return 0;
fail:
    close_pipe(&c->d[0]);
    close_pipe(&c->d[1]);
    free(c);
fail_fds:
    reset_socket(outer);
    reset_socket(inner);
    close(outer);
    close(inner);
    r->stats.failed++;
    return err;
}

/* Move data in direction s. Returns <0 (-errno) on a hard error, 1 if it
 * stopped only because of its round budget, 0 when blocked or finished. */
static int pump(struct relay *r, struct relay_conn *c, int s)
{
    struct relay_dir *d = &c->d[s];
    int src = c->fd[s], dst = c->fd[1 - s];

    for (int round = 0; round < RELAY_ROUNDS; round++) {
        int progress = 0;
        if (!d->eof && d->inpipe < d->cap) {
            ssize_t n = splice(src, NULL, d->pw, NULL, d->cap - d->inpipe,
                               SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                d->inpipe += (size_t)n;
                progress = 1;
            } else if (n == 0) {
                d->eof = 1;
            } else if (errno != EAGAIN && errno != EINTR) {
                return -errno;
            }
        }
        if (d->inpipe > 0) {
            ssize_t m = splice(d->pr, NULL, dst, NULL, d->inpipe,
                               SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (m > 0) {
                d->inpipe -= (size_t)m;
                r->stats.bytes[s] += (uint64_t)m;
                progress = 1;
            } else if (m < 0 && errno != EAGAIN && errno != EINTR) {
                return -errno;
            }
        }
        if (d->eof && d->inpipe == 0) {
            if (!d->shut) {
                d->shut = 1;
                /* ENOTCONN if the peer is already gone: the other
                 * direction will see the error. */
                shutdown(dst, SHUT_WR);
            }
            return 0;
        }
        if (!progress)
            return 0;
    }
    return 1;
}

static int socket_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return errno;
    return err;
}

static void service(struct relay *r, struct relay_conn *c, uint32_t events)
{
    if (c->dead)
        return;
    if (events & EPOLLERR) {
        for (int i = 0; i < 2; i++) {
            if (socket_error(c->fd[i])) {
                conn_close(r, c, 1);
                return;
            }
        }
    }
    int more = 0;
    for (int s = 0; s < 2; s++) {
        int rc = pump(r, c, s);
        if (rc < 0) {
            conn_close(r, c, 1);
            return;
        }
        more |= rc;
    }
    if (c->d[0].shut && c->d[1].shut) {
        conn_close(r, c, 0);
        return;
    }
    if (more && !c->queued) {
        c->queued = 1;
        c->again_next = r->again;
        r->again = c;
    }
}

static void free_zombies(struct relay *r)
{
    while (r->zombies) {
        struct relay_conn *c = r->zombies;
        r->zombies = c->next;
        free(c);
    }
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int relay_run(struct relay *r, int budget_ms)
{
    struct epoll_event ev[RELAY_EVENTS];
    int64_t deadline = now_ms() + budget_ms;
    for (;;) {
        int timeout = 0;
        if (!r->again) {
            int64_t left = deadline - now_ms();
            timeout = left > 0 ? (int)left : 0;
        }
        int n = epoll_wait(r->ep, ev, RELAY_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                return RELAY_WAKE;  /* a signal: let the caller look */
            return -errno;
        }
        /* Resume the directions that yielded on the previous turn. */
        struct relay_conn *again = r->again;
        r->again = NULL;
        while (again) {
            struct relay_conn *c = again;
            again = c->again_next;
            c->queued = 0;
            service(r, c, 0);
        }
        int woke = 0;
        for (int i = 0; i < n; i++) {
            if (ev[i].data.ptr == &r->wake_marker)
                woke = 1;
            else
                service(r, ev[i].data.ptr, ev[i].events);
        }
        /* Nothing closed in this turn may stay on the "again" list. */
        struct relay_conn **pp = &r->again;
        while (*pp) {
            if ((*pp)->dead)
                *pp = (*pp)->again_next;
            else
                pp = &(*pp)->again_next;
        }
        free_zombies(r);
        r->stats.turns++;
        if (woke)
            return RELAY_WAKE;
        if (!r->again && now_ms() >= deadline)
            return RELAY_BUDGET;
    }
}

void relay_get_stats(struct relay *r, struct relay_stats *out)
{
    *out = r->stats;
}

void relay_free(struct relay *r)
{
    if (!r)
        return;
    while (r->conns)
        conn_close(r, r->conns, 1);
    free_zombies(r);
    close(r->ep);
    free(r);
}
