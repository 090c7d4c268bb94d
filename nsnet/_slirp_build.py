"""cffi API-mode build of nsnet's libslirp binding ("libslirp-cffi").

libslirp has no PyPI package, so nsnet binds Debian's libslirp-dev (4.7)
itself.  This module is run by setuptools at install time (see setup.py)
and produces ``nsnet._slirp_cffi``: the libslirp API below, plus nsnet's
C data path (csrc/), which keeps every per-packet callback out of Python.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")

CDEF = r"""
/* ---- libslirp 4.7 (slirp/libslirp.h) ---- */
typedef struct Slirp Slirp;

enum {
    SLIRP_POLL_IN = 1,
    SLIRP_POLL_OUT = 2,
    SLIRP_POLL_PRI = 4,
    SLIRP_POLL_ERR = 8,
    SLIRP_POLL_HUP = 16,
};

#define SLIRP_CONFIG_VERSION_MIN ...
#define SLIRP_CONFIG_VERSION_MAX ...
#define SLIRP_HOSTFWD_UDP ...
#define SLIRP_HOSTFWD_V6ONLY ...

struct in_addr { uint32_t s_addr; };
struct in6_addr { ...; };
struct sockaddr { ...; };
struct sockaddr_in { ...; };
struct sockaddr_in6 { ...; };
typedef unsigned int socklen_t;

typedef ssize_t (*SlirpReadCb)(void *buf, size_t len, void *opaque);
typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);

typedef enum SlirpTimerId {
    SLIRP_TIMER_RA,
    SLIRP_TIMER_NUM,
} SlirpTimerId;

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
} SlirpCb;

typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    struct sockaddr_in *outbound_addr;
    struct sockaddr_in6 *outbound_addr6;
    bool disable_dns;
    bool disable_dhcp;
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout,
                        SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error,
                        SlirpGetREventsCb get_revents, void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr,
                      int host_port, struct in_addr guest_addr, int guest_port);
int slirp_remove_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr,
                         int host_port);
int slirp_add_hostxfwd(Slirp *slirp,
                       const struct sockaddr *haddr, socklen_t haddrlen,
                       const struct sockaddr *gaddr, socklen_t gaddrlen,
                       int flags);
int slirp_remove_hostxfwd(Slirp *slirp,
                          const struct sockaddr *haddr, socklen_t haddrlen,
                          int flags);
char *slirp_connection_info(Slirp *slirp);
char *slirp_neighbor_info(Slirp *slirp);
const char *slirp_version_string(void);

void free(void *ptr);

/* ---- nsnet's C data path (csrc/datapath.h) ---- */
#define NSNET_DP_BUDGET ...
#define NSNET_DP_CONTROL ...
#define NSNET_DP_TAP_ERROR ...
#define NSNET_DP_POLL_ERROR ...
#define NSNET_VNET_HDR_LEN ...
#define NSNET_SLIRP_MSS ...

struct nsnet_stats {
    uint64_t rx_frames;
    uint64_t rx_bytes;
    uint64_t tx_frames;
    uint64_t tx_bytes;
    uint64_t rx_dropped_invalid;
    uint64_t rx_dropped_ignored;
    uint64_t tx_dropped;
    uint64_t rx_csum_completed;
    uint64_t rx_gso_frames;
    uint64_t tx_gso_frames;
    uint64_t guest_errors;
    uint64_t loop_turns;
    uint64_t rx_mss_adjusted;
    uint64_t tx_fragmented;
    uint64_t tx_mss_raised;
    uint64_t pcap_frames;
    uint64_t pcap_dropped;
    uint64_t fd_refused;
};
struct nsnet_dp;
struct nsnet_dp *nsnet_dp_new(const SlirpConfig *cfg, int tap_fd, int ctl_fd,
                              int vnet_hdr, int tap_mtu);
Slirp *nsnet_dp_slirp(struct nsnet_dp *dp);
void nsnet_dp_set_tap(struct nsnet_dp *dp, int tap_fd);
int nsnet_dp_run(struct nsnet_dp *dp, int budget_ms);
void nsnet_dp_set_pcap(struct nsnet_dp *dp, int fd, uint64_t offset, uint64_t max_bytes);
int nsnet_dp_pcap_full(struct nsnet_dp *dp);
int nsnet_dp_tap_errno(struct nsnet_dp *dp);
void nsnet_dp_get_stats(struct nsnet_dp *dp, struct nsnet_stats *out);
const char *nsnet_dp_last_guest_error(struct nsnet_dp *dp);
void nsnet_dp_free(struct nsnet_dp *dp);
void nsnet_dp_set_listener(struct nsnet_dp *dp, int fd, int on);
int nsnet_frame_check(const uint8_t *frame, size_t len);
#define NSNET_FRAME_QUEUED ...
#define NSNET_FRAME_REASSEMBLED ...
const uint8_t *nsnet_frame_reassembled(size_t *len);
int nsnet_vnet_complete_csum(const uint8_t *hdr, uint8_t *frame, size_t len);
void nsnet_vnet_fill_tx(uint8_t *hdr, const uint8_t *frame, size_t len,
                        int tap_mtu, int *is_gso);
int nsnet_adjust_syn_mss(uint8_t *frame, size_t len, int tap_mtu, int slirp_mtu,
                         unsigned mss_max);
typedef int (*nsnet_emit_fn)(const uint8_t *frame, size_t len, void *opaque);
int nsnet_tx_fragment(const uint8_t *frame, size_t len, int tap_mtu, uint32_t ident,
                      nsnet_emit_fn emit, void *opaque);

/* ---- egress policy (csrc/policy.h) ---- */
#define NSNET_DP_EVENTS ...
struct nsnet_pol_rule { uint8_t action; uint8_t protos; uint16_t port_lo; uint16_t port_hi; };
struct nsnet_pol_prefix { uint8_t family; uint8_t plen; uint8_t addr[16]; uint32_t first;
                          uint32_t count; };
struct nsnet_pol_name { uint32_t off; uint16_t len; uint8_t suffix; uint32_t first;
                        uint32_t count; };
struct nsnet_policy;
struct nsnet_policy *nsnet_policy_new(int dflt,
                                      const struct nsnet_pol_rule *rules, uint32_t nrules,
                                      const struct nsnet_pol_prefix *prefixes, uint32_t nprefixes,
                                      const struct nsnet_pol_name *names, uint32_t nnames,
                                      const char *namebuf, uint32_t namebuf_len,
                                      const uint32_t *index, uint32_t nindex);
void nsnet_policy_free(struct nsnet_policy *p);
int nsnet_policy_decide_v(const struct nsnet_policy *p, int proto, int family,
                          const uint8_t *addr, unsigned port, const char *names,
                          int32_t *rule);
int nsnet_policy_name_allowed(const struct nsnet_policy *p, const char *name);
struct nsnet_pol_event {
    int64_t time_ms;
    uint8_t family, proto, action, pad;
    int32_t rule;
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
    char name[256];
};
struct nsnet_filter_stats {
    uint64_t flows_allowed;
    uint64_t flows_denied;
    uint64_t packets_denied;
    uint64_t unclassified_denied;
    uint64_t flows_cut;
    uint64_t dns_refused;
    uint64_t dns_learned;
    uint64_t audit_lost;
};
struct nsnet_filter;
struct nsnet_filter *nsnet_dp_filter(struct nsnet_dp *dp);
void nsnet_filter_set_policy(struct nsnet_filter *f, struct nsnet_policy *p,
                             int keep_established, int audit_all);
void nsnet_filter_set_udp_forward(struct nsnet_filter *f, unsigned port, int on);
void nsnet_filter_get_stats(struct nsnet_filter *f, struct nsnet_filter_stats *out);
int nsnet_filter_audit_pending(struct nsnet_filter *f);
int nsnet_filter_audit_pop(struct nsnet_filter *f, struct nsnet_pol_event *out, int max);
const char *nsnet_filter_learned(struct nsnet_filter *f, int family, const uint8_t *addr);
"""


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", *args, "slirp"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return shlex.split(out)


def _build_flags() -> tuple[list[str], list[str], list[str]]:
    include_dirs = [CSRC]
    library_dirs: list[str] = []
    libraries = ["slirp"]
    for flag in _pkg_config("--cflags-only-I"):
        if flag.startswith("-I"):
            include_dirs.append(flag[2:])
    for flag in _pkg_config("--libs-only-L"):
        if flag.startswith("-L"):
            library_dirs.append(flag[2:])
    # libslirp.h itself needs no glib headers; link only libslirp.
    return include_dirs, library_dirs, libraries


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_inc, _libdirs, _libs = _build_flags()
ffibuilder.set_source(
    "nsnet._slirp_cffi",
    '#include <slirp/libslirp.h>\n#include "datapath.h"\n#include "policy.h"\n',
    sources=[
        # setuptools wants paths relative to setup.py's directory
        os.path.relpath(os.path.join(CSRC, name), os.path.dirname(HERE))
        for name in ("datapath.c", "frame_check.c", "offload.c", "policy.c", "filter.c")
    ],
    include_dirs=_inc,
    library_dirs=_libdirs,
    libraries=_libs,
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
