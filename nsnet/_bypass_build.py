"""cffi API-mode build of the socket bypass's notification handler
(csrc/bypass.c): module ``nsnet._bypass_cffi``.  Run by setuptools at
install time (setup.py's cffi_modules).  It needs no library but libc."""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")

CDEF = r"""
#define NSB_SLOTS ...
#define NSB_CONNS ...
#define NSB_BYTES_AT_CLOSE ...
#define NSB_BYTES_SAMPLED ...
#define NSB_GATEWAY ...
#define NSB_EGRESS ...
#define NSB_IPV6 ...
#define NSB_OUT4 ...
#define NSB_OUT6 ...
#define NSB_GUEST6 ...
#define NSB_AUDIT_DENY ...
#define NSB_AUDIT_ALL ...
#define NSB_AUDIT_RATE ...
#define NSB_AUDIT_BURST ...

struct nsb_config {
    uint32_t flags;
    uint8_t net4[4];
    uint8_t mask4[4];
    uint8_t gw4[4];
    uint8_t guest4[4];
    uint8_t outbound4[4];
    uint8_t prefix6[16];
    uint8_t gw6[16];
    uint8_t guest6[16];
    uint8_t outbound6[16];
    uint64_t ns_cookie;
    int32_t def_sndbuf;
    int32_t def_rcvbuf;
    int32_t nr_connect, nr_getsockname, nr_getpeername;
    int32_t audit_fd;
    uint32_t audit_arch;
    int32_t diag_fd;
    const void *filter;
    uint32_t filter_len;
};
struct nsb_audit {
    int64_t time_ms;
    uint8_t family;
    uint8_t action;
    uint16_t sport, dport;
    uint8_t pad[2];
    uint8_t src[16], dst[16];
};
struct nsb_key {
    uint32_t src[4], dst[4];
    uint16_t sport, dport;
    uint8_t family;
    uint8_t pad[3];
};
struct nsb_conn {
    uint64_t cookie;
    uint64_t sent, received;
    struct nsb_key key;
};
struct nsb_shared {
    uint64_t notifications;
    uint64_t bypassed;
    uint64_t bypassed6;
    uint64_t failed;
    uint64_t fallback;
    uint64_t translated;
    uint64_t aborted;
    uint64_t errors;
    uint64_t pending;
    uint64_t scope;
    uint64_t audit;
    uint64_t audit_lost;
    uint64_t bytes_sent;
    uint64_t bytes_received;
    uint64_t bytes_inexact;
    uint64_t bytes_untracked;
    uint64_t bytes_mode;
    uint64_t bytes_samples;
    uint64_t bytes_dumps;
    uint64_t sync_wakeup;
    uint64_t inflight[...];
    struct nsb_conn conns[...];
};
int nsb_probe(int listener);
int nsb_run(int listener, const struct nsb_config *cfg, struct nsb_shared *sh);
int nsb_load_filter(const void *prog, uint32_t n);
int nsb_sample(struct nsb_shared *sh, uint64_t *out);
int nsb_diag_subscribe(void);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "nsnet._bypass_cffi",
    '#include "bypass.h"\n',
    sources=[os.path.relpath(os.path.join(CSRC, f), os.path.dirname(HERE))
             for f in ("bypass.c", "bypassdiag.c")],
    include_dirs=[CSRC],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
