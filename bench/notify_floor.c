/* The floor of a connect() bypass built on seccomp user notification, for
 * bench/bypass_bench.py's "floor-continue" and "floor-addfd" candidates:
 * what the kernel's mechanism alone costs a connection, with none of
 * nsnet's checks.  NOT a network: it never changes where a connect goes.
 *
 *   notify_floor continue|addfd -- COMMAND [ARG...]
 *
 * COMMAND runs under a filter that sends every connect() to this process
 * (SECCOMP_RET_USER_NOTIF; SYNC_WAKE_UP where the kernel has it, as
 * nsnet's handler sets), which answers each
 *   continue: at once with SECCOMP_USER_NOTIF_FLAG_CONTINUE (the kernel
 *             then does the command's connect itself): the notification's
 *             two wake-ups and nothing else;
 *   addfd:    as a bypass must, at least: it reads the sockaddr from the
 *             command's memory (process_vm_readv), makes a socket of its
 *             own, connects it there (blocking), installs it over the
 *             command's fd (SECCOMP_IOCTL_NOTIF_ADDFD, SETFD), answers 0
 *             and closes its copy.  Only AF_INET; the bench's clients make
 *             blocking close-on-exec sockets.
 * Exits with COMMAND's status.  Everything runs in the caller's network
 * namespace (the bench's sealed one): the destination is COMMAND's own.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS _IOW('!', 4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif

static int die(const char *what)
{
    fprintf(stderr, "notify_floor: %s: %s\n", what, strerror(errno));
    return 125;
}

static int send_fd(int sock, int fd)
{
    char data = 'f', cbuf[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec iov = {&data, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                       .msg_controllen = sizeof cbuf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(sock, &m, 0) == 1 ? 0 : -1;
}

static int recv_fd(int sock)
{
    char data, cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {&data, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                       .msg_controllen = sizeof cbuf};
    if (recvmsg(sock, &m, MSG_CMSG_CLOEXEC) != 1)
        return -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (!c || c->cmsg_type != SCM_RIGHTS)
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static int child(int sock, char **argv)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_connect, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return die("PR_SET_NO_NEW_PRIVS");
    int l = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (l < 0)
        return die("seccomp(NEW_LISTENER)");
    if (send_fd(sock, l) < 0)
        return die("sending the listener");
    close(l);
    close(sock);
    execvp(argv[0], argv);
    return die(argv[0]);
}

static int answer(int l, struct seccomp_notif *n, int addfd)
{
    struct seccomp_notif_resp r = {.id = n->id};
    if (!addfd) {
        r.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
        return ioctl(l, SECCOMP_IOCTL_NOTIF_SEND, &r);
    }
    struct sockaddr_in a;
    socklen_t len = (socklen_t)n->data.args[2];
    struct iovec local = {&a, sizeof a}, remote = {(void *)n->data.args[1], sizeof a};
    int s = -1;
    if (len != sizeof a || process_vm_readv(n->pid, &local, 1, &remote, 1, 0) != sizeof a ||
        a.sin_family != AF_INET) {
        r.error = -EINVAL;
    } else if ((s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
               connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        r.error = -errno;
    } else {
        struct seccomp_notif_addfd ad = {.id = n->id, .flags = SECCOMP_ADDFD_FLAG_SETFD,
                                         .srcfd = (__u32)s, .newfd = (__u32)n->data.args[0],
                                         .newfd_flags = O_CLOEXEC};
        if (ioctl(l, SECCOMP_IOCTL_NOTIF_ADDFD, &ad) < 0)
            r.error = -errno;
    }
    if (s >= 0)
        close(s);
    return ioctl(l, SECCOMP_IOCTL_NOTIF_SEND, &r);
}

int main(int argc, char **argv)
{
    if (argc < 4 || strcmp(argv[2], "--") || (strcmp(argv[1], "continue") && strcmp(argv[1], "addfd"))) {
        fprintf(stderr, "usage: notify_floor continue|addfd -- COMMAND [ARG...]\n");
        return 125;
    }
    int addfd = !strcmp(argv[1], "addfd"), sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) < 0)
        return die("socketpair");
    pid_t pid = fork();
    if (pid < 0)
        return die("fork");
    if (pid == 0) {
        close(sp[0]);
        _exit(child(sp[1], argv + 3));
    }
    close(sp[1]);
    int l = recv_fd(sp[0]);
    close(sp[0]);
    if (l >= 0) {
        ioctl(l, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, 0);
        struct seccomp_notif n;
        struct pollfd p = {l, POLLIN, 0};
        for (;;) {
            if (poll(&p, 1, -1) < 0 && errno != EINTR)
                break;
            if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
                break;
            if (!(p.revents & POLLIN))
                continue;
            memset(&n, 0, sizeof n);
            if (ioctl(l, SECCOMP_IOCTL_NOTIF_RECV, &n) < 0)
                continue;  /* ENOENT: the caller left meanwhile */
            answer(l, &n, addfd);
        }
        close(l);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return die("waitpid");
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
