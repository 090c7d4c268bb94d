"""Packet capture (--pcap, --pcap-max-bytes; issue 14): the supervisor opens
the file, the forwarder's C loop writes every frame in both directions in
pcap format; a size cap; clear errors for a path nsnet cannot write."""

import json
import os
import struct
import time

import harness
from harness import NS_PYTHON, wait_until

GW = "10.0.2.2"
GUEST = "10.0.2.100"


# --------------------------------------------------------------------------
# A small pcap reader (what tcpdump -r checks first)
# --------------------------------------------------------------------------

def read_pcap(path: str) -> tuple[int, list[bytes], int]:
    """(link type, frames, trailing bytes of a cut record): the global header's
    magic and version are checked, every record's lengths too."""
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) >= 24, f"{path}: {len(data)} bytes, no pcap global header"
    magic = struct.unpack_from("<I", data)[0]
    assert magic == 0xa1b2c3d4, f"bad pcap magic {magic:#x}"
    major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from("<HHiIII", data, 4)
    assert (major, minor) == (2, 4) and snaplen >= 65536 + 14
    frames = []
    off = 24
    while off + 16 <= len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, off)
        assert usec < 1_000_000 and incl == orig and incl <= snaplen, (sec, usec, incl, orig)
        assert abs(sec - time.time()) < 600, f"record time {sec} is not now"
        if off + 16 + incl > len(data):
            break
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return linktype, frames, len(data) - off


def ip4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def decode(frame: bytes) -> tuple | None:
    """("tcp", src, sport, dst, dport, flags) or ("icmp", src, dst, type)
    for an Ethernet IPv4 frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 15) * 4
    proto = frame[23]
    src, dst = ip4(frame[26:30]), ip4(frame[30:34])
    l4 = frame[14 + ihl:]
    if proto == 6 and len(l4) >= 14:
        sport, dport = struct.unpack_from("!HH", l4)
        return ("tcp", src, sport, dst, dport, l4[13])
    if proto == 1 and l4:
        return ("icmp", src, dst, l4[0])
    return None


SYN, ACK, RST = 0x02, 0x10, 0x04


def run_cmd(base_dir: str, port: int) -> list[str]:
    """A ping of the gateway and a TCP connect to the host's port."""
    return ["sh", "-c", f"ping -c1 -W5 {GW} >/dev/null; "
                        f"exec {NS_PYTHON} {base_dir}/nsclient.py connect {GW} {port}"]


def assert_both_directions(frames: list[bytes], port: int) -> None:
    seen = [d for d in map(decode, frames) if d]
    syn_out = [d for d in seen if d[0] == "tcp" and d[1] == GUEST and d[3] == GW
               and d[4] == port and d[5] & SYN and not d[5] & ACK]
    assert syn_out, f"no SYN {GUEST} -> {GW}:{port} captured: {seen}"
    sport = syn_out[0][2]
    syn_ack = [d for d in seen if d[0] == "tcp" and d[1] == GW and d[2] == port
               and d[3] == GUEST and d[4] == sport and d[5] & SYN and d[5] & ACK]
    assert syn_ack, f"no SYN-ACK {GW}:{port} -> {GUEST}:{sport} captured: {seen}"
    assert ("icmp", GUEST, GW, 8) in seen, f"no echo request captured: {seen}"
    assert ("icmp", GW, GUEST, 0) in seen, f"no echo reply captured: {seen}"


# --------------------------------------------------------------------------
# nsnet run --pcap
# --------------------------------------------------------------------------

def nsnet_run(user, args, timeout=60):
    return user.run([harness.nsnet_bin(), "run", *[str(a) for a in args]], timeout=timeout,
                    text=True)


def test_run_pcap_both_directions(user, base_dir, workdir, host_server):
    srv = host_server("sink")
    path = os.path.join(workdir, "cap.pcap")
    cp = nsnet_run(user, [f"--pcap={path}", "--offload", "--", *run_cmd(base_dir, srv.port)])
    assert cp.returncode == 0, cp.stderr
    assert '"ok": true' in cp.stdout, cp.stdout
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == (0 if user.is_root else st.st_uid)
    linktype, frames, rest = read_pcap(path)
    assert linktype == 1 and rest == 0  # LINKTYPE_ETHERNET; no record cut
    # Ethernet frames, not virtio-net headers (--offload): every one parses.
    assert all(f[12:14] in (b"\x08\x00", b"\x08\x06", b"\x86\xdd") for f in frames), \
        [f[:16].hex() for f in frames if f[12:14] not in (b"\x08\x00", b"\x08\x06", b"\x86\xdd")]
    assert_both_directions(frames, srv.port)


def test_run_pcap_start_line_json(user, workdir):
    """nsnet run's start-up line (JSON) has the capture file and its cap
    (default 1 GiB)."""
    path = os.path.join(workdir, "json.pcap")
    cp = nsnet_run(user, [f"--pcap={path}", "--log-level=info", "--log-format=json", "--",
                          "true"])
    assert cp.returncode == 0, cp.stderr
    [start] = [e for e in map(json.loads, cp.stderr.splitlines()) if e.get("event") == "start"]
    assert (start["pcap"], start["pcap_max_bytes"]) == (path, 1 << 30), start
    assert f"capture to {path} (at most {1 << 30} bytes)" in start["msg"], start


def test_run_pcap_truncates_and_refuses_symlink(user, base_dir, workdir, host_server):
    srv = host_server("sink")
    path = os.path.join(workdir, "old.pcap")
    with open(path, "wb") as f:
        f.write(b"x" * 5000)
    os.chmod(path, 0o666)
    os.chown(path, user.uid, user.gid)
    cp = nsnet_run(user, [f"--pcap={path}", "--", *run_cmd(base_dir, srv.port)])
    assert cp.returncode == 0, cp.stderr
    _lt, frames, rest = read_pcap(path)  # old bytes gone: a pcap from byte 0
    assert rest == 0 and frames
    link = os.path.join(workdir, "link.pcap")
    target = os.path.join(workdir, "target")
    os.symlink(target, link)
    cp = nsnet_run(user, [f"--pcap={link}", "--", "true"])
    assert cp.returncode == 125, (cp.returncode, cp.stderr)
    assert f"--pcap={link}" in cp.stderr and "ELOOP" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr
    assert not os.path.exists(target)


def test_pcap_unwritable_path(user, nsnet_impl, ns, workdir, start_fwd):
    """A path nsnet cannot create: the real errno, the path, no traceback;
    exit 1 (slirp4netns's start failure) and 125 in nsnet run."""
    path = "/proc/nsnet-no-such-dir/cap.pcap"
    fwd = start_fwd(nsnet_impl, ["--configure", f"--pcap={path}", ns.pid, "tap0"],
                    ready=False)
    assert fwd.wait_exit(20) == 1
    log = fwd.log()
    assert f"--pcap={path}: cannot open it for writing" in log and "ENOENT" in log, log
    assert "Traceback" not in log
    cp = nsnet_run(user, [f"--pcap={path}", "--", "true"])
    assert cp.returncode == 125, (cp.returncode, cp.stderr)
    assert f"--pcap={path}" in cp.stderr and "ENOENT" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr
    if not user.is_root:  # a directory of root's, mode 0755
        cp = nsnet_run(user, ["--pcap=/etc/nsnet-test.pcap", "--", "true"])
        assert cp.returncode == 125 and "EACCES" in cp.stderr, cp.stderr
        assert not os.path.exists("/etc/nsnet-test.pcap")


# --------------------------------------------------------------------------
# The slirp4netns-style command line: both directions, the cap
# --------------------------------------------------------------------------

def test_attach_pcap_both_directions(nsnet_impl, ns, workdir, attach, host_server):
    srv = host_server("sink")
    path = os.path.join(workdir, "attach.pcap")
    net = attach(nsnet_impl, ns, f"--pcap={path}")
    ns.run(["ping", "-c1", "-W5", GW], check=True, timeout=20)
    assert ns.client("connect", GW, srv.port)["ok"] is True
    linktype, frames, _rest = read_pcap(path)
    assert linktype == 1
    assert_both_directions(frames, srv.port)
    net.fwd.stop()


def test_attach_pcap_cap(nsnet_impl, ns, workdir, attach, host_server):
    """--pcap-max-bytes: the file never exceeds it, holds whole records, and
    the forwarder says once that it stopped."""
    srv = host_server("echo")
    path = os.path.join(workdir, "capped.pcap")
    cap = 3000
    net = attach(nsnet_impl, ns, f"--pcap={path}", f"--pcap-max-bytes={cap}", "--no-offload")
    r = ns.client("tcp-echo", GW, srv.port, 200_000)
    assert r["received"] == 200_000, r
    size = os.path.getsize(path)
    assert 24 < size <= cap, size
    _lt, frames, rest = read_pcap(path)
    assert frames and rest == 0
    stats = json.loads(harness.api_call(net.api, {"execute": "get_stats"}))["return"]
    wait_until(lambda: "capture stopped" in net.fwd.log(), 5, what="the log line")
    assert net.fwd.log().count("capture stopped") == 1, net.fwd.log()
    assert f"--pcap-max-bytes={cap}" in net.fwd.log()
    assert stats["pcap_dropped"] > 0 and stats["pcap_frames"] > 0, stats
    # the start-up line names the capture and its cap
    start = [ln for ln in net.fwd.log().splitlines() if "nsnet: starting:" in ln]
    assert start and f"capture to {path} (at most {cap} bytes)" in start[0], start


def test_attach_pcap_restarted_forwarder_appends(nsnet_impl, ns, workdir, attach, host_server):
    """A restarted forwarder writes to the same open file, after its
    predecessor's records, without a second global header."""
    import signal

    def info():
        return json.loads(harness.api_call(net.api, {"execute": "get_info"}))["return"]

    first_srv, second_srv = host_server("sink"), host_server("sink")
    path = os.path.join(workdir, "restart.pcap")
    net = attach(nsnet_impl, ns, f"--pcap={path}")
    assert ns.client("connect", GW, first_srv.port)["ok"] is True
    ns.run(["ping", "-c1", "-W5", GW], check=True, timeout=20)
    first = info()["forwarder_pid"]
    os.kill(first, signal.SIGKILL)  # a child of the nsnet this test started
    wait_until(lambda: info()["restarts"] >= 1 and info()["forwarder_pid"] != first, 20,
               interval=0.1, what="a restarted forwarder")
    assert wait_until(lambda: ns.client("connect", GW, second_srv.port)["ok"], 20,
                      interval=0.2, what="a connection through the new forwarder")
    ns.run(["ping", "-c1", "-W5", GW], check=True, timeout=20)
    _lt, frames, rest = read_pcap(path)
    assert rest == 0
    assert_both_directions(frames, first_srv.port)
    assert_both_directions(frames, second_srv.port)


def test_attach_pcap_sandbox_seccomp(nsnet_impl, ns, workdir, attach, host_server):
    """The sandboxed, seccomp-confined forwarder (no filesystem) writes the
    capture through the fd it inherited."""
    srv = host_server("sink")
    path = os.path.join(workdir, "sandboxed.pcap")
    net = attach(nsnet_impl, ns, f"--pcap={path}", "--enable-sandbox", "--enable-seccomp")
    ns.run(["ping", "-c1", "-W5", GW], check=True, timeout=20)
    assert ns.client("connect", GW, srv.port)["ok"] is True
    _lt, frames, rest = read_pcap(path)
    assert rest == 0
    assert_both_directions(frames, srv.port)
    info = json.loads(harness.api_call(net.api, {"execute": "get_info"}))["return"]
    assert info["restarts"] == 0, info  # seccomp did not kill it


# --------------------------------------------------------------------------
# start_capture / stop_capture on a running instance (the JSON API)
# --------------------------------------------------------------------------

def api(sock: str, execute: str, **arguments) -> dict:
    req = {"execute": execute, "arguments": arguments} if arguments else {"execute": execute}
    return json.loads(harness.api_call(sock, req))


def syns_to(frames: list[bytes], port: int) -> list:
    return [d for d in map(decode, frames) if d and d[0] == "tcp" and d[3] == GW
            and d[4] == port and d[5] & SYN]


def test_api_start_stop_capture(nsnet_impl, ns, workdir, attach, host_server):
    """Capture from a running instance (sandboxed, seccomp-confined
    forwarder): only what happens between start_capture and stop_capture."""
    before, during, after = host_server("sink"), host_server("sink"), host_server("sink")
    path = os.path.join(workdir, "live.pcap")
    net = attach(nsnet_impl, ns, "--enable-sandbox", "--enable-seccomp")
    assert ns.client("connect", GW, before.port)["ok"] is True
    assert api(net.api, "stop_capture") == {"error": {"desc": "bad request: stop_capture: no capture is running"}}
    assert api(net.api, "start_capture", path=path) == {"return": {}}
    assert api(net.api, "get_info")["return"]["capture"] == path
    again = api(net.api, "start_capture", path=path + ".2")
    assert "a capture to" in again["error"]["desc"] and not os.path.exists(path + ".2")
    ns.run(["ping", "-c1", "-W5", GW], check=True, timeout=20)
    assert ns.client("connect", GW, during.port)["ok"] is True
    assert api(net.api, "stop_capture") == {"return": {}}
    assert api(net.api, "get_info")["return"]["capture"] is None
    assert ns.client("connect", GW, after.port)["ok"] is True
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o600
    _lt, frames, rest = read_pcap(path)
    assert rest == 0
    assert_both_directions(frames, during.port)
    assert not syns_to(frames, before.port) and not syns_to(frames, after.port)
    assert api(net.api, "get_info")["return"]["restarts"] == 0


def test_api_start_capture_errors(nsnet_impl, ns, workdir, attach, host_server):
    net = attach(nsnet_impl, ns)
    bad = "/proc/nsnet-no-such-dir/x.pcap"
    r = api(net.api, "start_capture", path=bad)
    assert "ENOENT" in r["error"]["desc"] and bad in r["error"]["desc"], r
    r = api(net.api, "start_capture", path=os.path.join(workdir, "x.pcap"), max_bytes=-1)
    assert r == {"error": {"desc": "bad request: start_capture: bad arguments.max_bytes "
                                   "(a non-negative integer; 0: no limit)"}}
    r = api(net.api, "start_capture")
    assert r["error"]["desc"].startswith("bad request: start_capture: bad arguments.path"), r
    # Still serving, with a cap given through the API.
    path = os.path.join(workdir, "capped.pcap")
    assert api(net.api, "start_capture", path=path, max_bytes=2000) == {"return": {}}
    srv = host_server("echo")
    assert ns.client("tcp-echo", GW, srv.port, 100_000)["received"] == 100_000
    assert 24 < os.path.getsize(path) <= 2000


def test_python_api_capture(ns, workdir, host_server):
    """nsnet.attach(pcap=...) from the start; start_capture()/stop_capture()
    on the handle; an error reply is nsnet.ApiError with the errno."""
    import nsnet

    first, second = host_server("sink"), host_server("sink")
    start = os.path.join(workdir, "from-start.pcap")
    live = os.path.join(workdir, "live.pcap")
    with nsnet.attach(ns.pid, pcap=start, pcap_max_bytes=1_000_000) as net:
        assert ns.client("connect", GW, first.port)["ok"] is True
        net.stop_capture()
        try:
            net.start_capture("/proc/nsnet-no-such-dir/x.pcap")
        except nsnet.ApiError as e:
            assert "ENOENT" in str(e), e
        else:
            raise AssertionError("start_capture to a missing directory succeeded")
        net.start_capture(live, max_bytes=0)
        ns.run(["ping", "-c1", "-W5", GW], check=True, timeout=20)
        assert ns.client("connect", GW, second.port)["ok"] is True
        net.stop_capture()
    _lt, frames, _rest = read_pcap(start)
    assert syns_to(frames, first.port) and not syns_to(frames, second.port)
    _lt, frames, rest = read_pcap(live)
    assert rest == 0
    assert_both_directions(frames, second.port)
