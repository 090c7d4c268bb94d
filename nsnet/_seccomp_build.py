"""cffi API-mode build of nsnet's libseccomp binding.

Produces ``nsnet._seccomp_cffi``: just the libseccomp calls nsnet's
--enable-seccomp allowlist needs (see nsnet/seccomp.py).  Built by
setup.py (``cffi_modules``) against Debian's libseccomp-dev.
"""

from __future__ import annotations

from cffi import FFI

CDEF = r"""
typedef void *scmp_filter_ctx;

#define SCMP_ACT_KILL_PROCESS ...
#define SCMP_ACT_KILL ...
#define SCMP_ACT_ALLOW ...
#define SCMP_ACT_LOG ...
#define __NR_SCMP_ERROR ...

static const int SCMP_CMP_EQ;
static const int SCMP_CMP_MASKED_EQ;

struct scmp_arg_cmp {
    unsigned int arg;
    int op;
    uint64_t datum_a;
    uint64_t datum_b;
};
int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                           unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);

struct scmp_version {
    unsigned int major;
    unsigned int minor;
    unsigned int micro;
};
const struct scmp_version *seccomp_version(void);

scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
int seccomp_syscall_resolve_name(const char *name);
char *seccomp_syscall_resolve_num_arch(uint32_t arch_token, int num);
int seccomp_load(const scmp_filter_ctx ctx);
int seccomp_export_pfc(const scmp_filter_ctx ctx, int fd);
int seccomp_export_bpf(const scmp_filter_ctx ctx, int fd);

/* seccomp_rule_add(ctx, SCMP_ACT_ALLOW, syscall, 0), without cffi
 * calling a variadic function. */
int nsnet_seccomp_allow(scmp_filter_ctx ctx, int syscall);
"""

SOURCE = r"""
#include <seccomp.h>

static int nsnet_seccomp_allow(scmp_filter_ctx ctx, int syscall)
{
    return seccomp_rule_add(ctx, SCMP_ACT_ALLOW, syscall, 0);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "nsnet._seccomp_cffi",
    SOURCE,
    libraries=["seccomp"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
