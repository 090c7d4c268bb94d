"""cffi API-mode build of the few Linux calls Python 3.11's os module lacks
(setns, prctl; setrlimit without the resource module's import): module ``nsnet._linux_cffi``, used by nsnet/linux.py.
Not ctypes: importing it costs ~1.6 ms on the path to ready, and these are
compiled C calls like the rest of nsnet's extensions.  Run by setuptools at
install time (setup.py's cffi_modules); it needs no library but libc."""

from __future__ import annotations

from cffi import FFI

CDEF = r"""
int nsnet_setns(int fd, int nstype);
int nsnet_prctl(int option, unsigned long arg2);
int nsnet_set_name(const char *name);
int nsnet_raise_nofile(void);
int nsnet_nofile(unsigned long long *soft, unsigned long long *hard);
int nsnet_set_nofile_soft(unsigned long long soft);
int nsnet_drop_caps(void);
int nsnet_empty_root(const char *base, const char **step);
"""

SOURCE = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <errno.h>
#include <linux/capability.h>
#include <sys/mount.h>

static int nsnet_setns(int fd, int nstype) { return setns(fd, nstype); }

/* prctl is variadic: give it its five arguments, the unused ones 0. */
static int nsnet_prctl(int option, unsigned long arg2)
{
    return prctl(option, arg2, 0UL, 0UL, 0UL);
}

static int nsnet_set_name(const char *name)
{
    return prctl(PR_SET_NAME, (unsigned long)name, 0UL, 0UL, 0UL);
}

/* The soft RLIMIT_NOFILE up to the hard one. */
static int nsnet_raise_nofile(void)
{
    struct rlimit r;

    if (getrlimit(RLIMIT_NOFILE, &r) != 0)
        return -1;
    if (r.rlim_cur == r.rlim_max)
        return 0;
    r.rlim_cur = r.rlim_max;
    return setrlimit(RLIMIT_NOFILE, &r);
}

/* The RLIMIT_NOFILE soft and hard limits (RLIM_INFINITY: ~0ULL). */
static int nsnet_nofile(unsigned long long *soft, unsigned long long *hard)
{
    struct rlimit r;

    if (getrlimit(RLIMIT_NOFILE, &r) != 0)
        return -1;
    *soft = r.rlim_cur;
    *hard = r.rlim_max;
    return 0;
}

/* The soft RLIMIT_NOFILE set to `soft` (at most the hard limit). */
static int nsnet_set_nofile_soft(unsigned long long soft)
{
    struct rlimit r;

    if (getrlimit(RLIMIT_NOFILE, &r) != 0)
        return -1;
    r.rlim_cur = soft < r.rlim_max ? soft : r.rlim_max;
    return setrlimit(RLIMIT_NOFILE, &r);
}

/* Give up every capability for good (a namespace-side process, once its
   namespace work is done): no new privileges on exec, ambient set cleared,
   the bounding set emptied (as far as CAP_SETPCAP allows: without it in
   this user namespace the bounding set stays, but the sets below are empty
   and NO_NEW_PRIVS keeps them so), then effective, permitted and
   inheritable sets emptied.  0, or -1 with errno when capset failed. */
static int nsnet_drop_caps(void)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2] = { { 0, 0, 0 }, { 0, 0, 0 } };
    int cap;

    if (prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) != 0)
        return -1;
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0UL, 0UL, 0UL);
    for (cap = 0; cap < 64; cap++) {
        if (prctl(PR_CAPBSET_DROP, (unsigned long)cap, 0UL, 0UL, 0UL) != 0 && errno == EINVAL)
            break;  /* past the kernel's last capability */
    }
    return (int)syscall(SYS_capset, &hdr, data);
}

/* A mount namespace of this process's own whose root is an empty,
   read-only tmpfs mounted on `base` (an existing directory), the old root
   detached: no view of the host's filesystem.  Needs CAP_SYS_ADMIN over
   the current user namespace.  0, or -1 with errno and *step naming the
   call that failed. */
static int nsnet_empty_root(const char *base, const char **step)
{
#define STEP(name, call) do { *step = name; if ((call) != 0) return -1; } while (0)
    STEP("unshare(CLONE_NEWNS)", unshare(CLONE_NEWNS));
    STEP("mount(/, MS_REC|MS_PRIVATE)", mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL));
    STEP("mount(tmpfs)", mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                               "size=4k,nr_inodes=2,mode=0555"));
    STEP("chdir(new root)", chdir(base));
    STEP("pivot_root", (int)syscall(SYS_pivot_root, ".", "."));
    STEP("umount2(old root)", umount2(".", MNT_DETACH));
    STEP("chdir(/)", chdir("/"));
    STEP("remount / read-only", mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY
                                      | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL));
#undef STEP
    *step = "";
    return 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("nsnet._linux_cffi", SOURCE,
                      extra_compile_args=["-O2", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
