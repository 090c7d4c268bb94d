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
"""

SOURCE = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>

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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("nsnet._linux_cffi", SOURCE,
                      extra_compile_args=["-O2", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
