/* nsnet data path: the per-packet loop between the TAP fd and libslirp.
 *
 * Python owns the control plane (configuration, port forwards, API,
 * signals).  Everything that happens once per packet lives here, in C,
 * so that no Python code runs per frame:
 *
 *   TAP fd --read--> frame_check --> slirp_input --> host sockets
 *   host sockets --> libslirp --send_packet--> TAP fd --write-->
 *
 * nsnet_dp_run() is called by Python with the GIL released and returns
 * when its time budget is spent, when the control fd becomes readable,
 * or when the TAP fails.
 */
#ifndef NSNET_DATAPATH_H
#define NSNET_DATAPATH_H

#include <stdint.h>
#include <stddef.h>
#include <poll.h>
#include <slirp/libslirp.h>

/* Return values of nsnet_dp_run(). */
#define NSNET_DP_BUDGET 0      /* the time budget is spent */
#define NSNET_DP_CONTROL 1     /* the control fd is readable */
#define NSNET_DP_TAP_ERROR -1  /* the TAP failed: see tap_errno */
#define NSNET_DP_POLL_ERROR -2 /* poll(2) failed: see errno */
#define NSNET_DP_EVENTS 2      /* egress-policy audit records are waiting */

struct nsnet_stats {
    uint64_t rx_frames;          /* frames read from the TAP (namespace -> host) */
    uint64_t rx_bytes;
    uint64_t tx_frames;          /* frames written to the TAP (host -> namespace) */
    uint64_t tx_bytes;
    uint64_t rx_dropped_invalid; /* refused by the frame checker */
    uint64_t rx_dropped_ignored; /* ethertypes libslirp does not handle */
    uint64_t tx_dropped;         /* the TAP would not take a frame */
    uint64_t rx_csum_completed;  /* partial checksums completed (offloads) */
    uint64_t rx_gso_frames;      /* TSO super-frames received (offloads) */
    uint64_t tx_gso_frames;      /* GSO frames written (offloads) */
    uint64_t guest_errors;       /* libslirp guest_error() calls */
    uint64_t loop_turns;
    uint64_t rx_mss_adjusted;    /* SYN MSS options rewritten (NSNET_SLIRP_MSS) */
    uint64_t tx_fragmented;      /* oversize packets cut into fragments */
    uint64_t tx_mss_raised;      /* libslirp's SYN MSS options raised (see offload.c) */
    uint64_t pcap_frames;        /* frames written to the capture (--pcap) */
    uint64_t pcap_dropped;       /* frames not captured: cap reached or write failed */
    uint64_t fd_refused;         /* forwarded connections refused at the fd limit */
};

struct nsnet_dp;

/* Create the Slirp instance with nsnet's C callbacks.  cfg is copied
 * into the context, which keeps it for the Slirp's whole life.
 * vnet_hdr: 1 when the TAP was opened with IFF_VNET_HDR (offloads).
 * Returns NULL on failure (libslirp refused the configuration). */
struct nsnet_dp *nsnet_dp_new(const SlirpConfig *cfg, int tap_fd, int ctl_fd,
                              int vnet_hdr, int tap_mtu);
/* The MSS of the namespace's TCP SYNs and SYN-ACKs is set to that of
 * cfg->if_mtu, at most NSNET_SLIRP_MSS: see nsnet_adjust_syn_mss. */
Slirp *nsnet_dp_slirp(struct nsnet_dp *dp);
/* The TAP, when nsnet_dp_new had -1 (the first forwarder starts before
 * the namespace helper has the TAP); before the first nsnet_dp_run. */
void nsnet_dp_set_tap(struct nsnet_dp *dp, int tap_fd);
int nsnet_dp_run(struct nsnet_dp *dp, int budget_ms);
/* Packet capture (--pcap): every frame read from the TAP and every frame
 * written to it (without the virtio-net header) goes to fd in pcap format
 * (LINKTYPE_ETHERNET).  offset: the fd's current size (the supervisor
 * opened it; a restarted forwarder appends): the global header is written
 * when it is 0.  No record makes the file exceed max_bytes (0: no cap);
 * once one would, capture stops (nsnet_dp_pcap_full says so).  The fd
 * belongs to the caller. */
void nsnet_dp_set_pcap(struct nsnet_dp *dp, int fd, uint64_t offset, uint64_t max_bytes);
/* 1 once the cap stopped the capture (write failures: 2), else 0. */
int nsnet_dp_pcap_full(struct nsnet_dp *dp);
int nsnet_dp_tap_errno(struct nsnet_dp *dp);
void nsnet_dp_get_stats(struct nsnet_dp *dp, struct nsnet_stats *out);
/* Last message libslirp passed to guest_error(), "" if none. */
const char *nsnet_dp_last_guest_error(struct nsnet_dp *dp);
void nsnet_dp_free(struct nsnet_dp *dp);
void nsnet_dp_set_listener(struct nsnet_dp *dp, int fd, int on);
/* The egress-policy filter (policy.h), created on first use; NULL when
 * memory is short.  Frames from the namespace pass it after
 * nsnet_frame_check and before libslirp. */
struct nsnet_filter;
struct nsnet_filter *nsnet_dp_filter(struct nsnet_dp *dp);

/* frame_check.c: 1 if libslirp can safely take this Ethernet frame,
 * 0 to drop it as malformed, -1 to drop it as an ethertype libslirp
 * ignores anyway; for IPv4 fragments (never given to libslirp: nsnet
 * reassembles them) NSNET_FRAME_QUEUED, or NSNET_FRAME_REASSEMBLED when
 * this fragment completed a datagram: pass nsnet_frame_reassembled()
 * to libslirp instead of the frame. */
#define NSNET_FRAME_QUEUED 2
#define NSNET_FRAME_REASSEMBLED 3
int nsnet_frame_check(const uint8_t *frame, size_t len);
const uint8_t *nsnet_frame_reassembled(size_t *len);

/* offload.c: virtio-net header handling for IFF_VNET_HDR TAPs. */
#define NSNET_VNET_HDR_LEN 10
/* Complete a partial checksum described by the header; returns 0 on
 * success, -1 when the header's offsets do not fit the frame. */
int nsnet_vnet_complete_csum(const uint8_t *hdr, uint8_t *frame, size_t len);
/* Fill a virtio-net header for a frame written to the namespace: a GSO
 * header when a TCP segment is larger than the TAP's MTU allows. */
void nsnet_vnet_fill_tx(uint8_t *hdr, const uint8_t *frame, size_t len,
                        int tap_mtu, int *is_gso);

/* libslirp's MSS (t_maxseg) at large MTUs.  It is not only its segment
 * size: libslirp has no window scaling, so at most 64 KiB is ever in
 * flight, and it sends a window update only once two MSS of window have
 * opened.  Its MSS is min(if_mtu - 40, 32768) (libslirp's TCP_MAXSEG_MAX)
 * unless an MSS option lowers it, and libslirp reads the options only of
 * the SYN-ACKs of connections it opens (port forwards), never of a SYN
 * from the namespace.  At 32768 two MSS exceed any window it can
 * advertise: a sender in the namespace stalled whenever the host's
 * receiver was slower (measured at MTU 65520: 1.5-1.9 Gbit/s to the
 * gateway, 1.6 through a port forward; 5.0-6.5 with this MSS).  So
 * without TSO and without IPv6, libslirp's if_mtu is capped at
 * NSNET_SLIRP_MSS + 40 (slirp.py), the MSS options of the namespace's
 * SYNs and SYN-ACKs are lowered to match (which is what reaches libslirp
 * on a port forward in every configuration), and those of libslirp's own
 * SYNs raised back (nsnet_raise_tx_syn_mss).  Three segments per window
 * also let libslirp fill the next one while the namespace takes the last. */
#define NSNET_SLIRP_MSS 21800

/* Set the MSS option of a TCP SYN (IPv4 or IPv6) to min(MSS of slirp_mtu,
 * mss_max), fixing the checksum: lowered when larger (always safe), raised
 * only when the SYN advertises the full MSS of tap_mtu (a smaller one says
 * the path behind the namespace is narrower).
 * Returns 1 when the frame was changed. */
int nsnet_adjust_syn_mss(uint8_t *frame, size_t len, int tap_mtu, int slirp_mtu,
                         unsigned mss_max);
/* Towards the namespace: when frame is one of libslirp's IPv4 SYNs or
 * SYN-ACKs with an MSS option lower than that of tap_mtu (libslirp's
 * if_mtu is capped below the TAP's: libslirp takes larger IPv4 segments
 * all the same, and the namespace then sends fewer of them), copy it to
 * out (out_size bytes; libslirp's buffer stays untouched) with the MSS
 * raised and return 1; else return 0. */
int nsnet_raise_tx_syn_mss(const uint8_t *frame, size_t len, int tap_mtu,
                           uint8_t *out, size_t out_size);
/* The longest SYN frame: Ethernet, IPv6 and TCP headers with the most
 * options. */
#define NSNET_SYN_FRAME_MAX (14 + 40 + 60)
/* Cut an IPv4 or IPv6 packet longer than tap_mtu into fragments that fit,
 * passing each (Ethernet header included) to emit.  Returns 0, or -1 when
 * the frame cannot be fragmented here. */
#define NSNET_FRAG_BUF (65536 + 14 + 48)
typedef int (*nsnet_emit_fn)(const uint8_t *frame, size_t len, void *opaque);
int nsnet_tx_fragment(const uint8_t *frame, size_t len, int tap_mtu, uint32_t ident,
                      nsnet_emit_fn emit, void *opaque);

#endif
