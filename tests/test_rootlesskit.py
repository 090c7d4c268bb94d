"""RootlessKit 1.1 (Debian 12) driving the forwarder as a real client does.

RootlessKit pre-creates tap0, runs `BIN --mtu 65520 -r 3 [--api-socket ...]
PID tap0` without -c, configures the namespace itself, and with
--port-driver=slirp4netns publishes ports through the API socket.  It runs as
the unprivileged user (it needs /etc/subuid and newuidmap).
"""
import json
import os
import subprocess
import time

import pytest

from harness import (HarnessError, NS_PYTHON, cmdline, descendants, free_port, payload, sha256,
                     tcp_send, unpriv_only, wait_until)

pytestmark = [pytest.mark.timeout(120),
              unpriv_only]


def test_rootlesskit(impl, user, workdir, base_dir, host_server):
    srv = host_server("echo")
    host_port = free_port()
    out1, out2 = f"{workdir}/outbound.json", f"{workdir}/published.json"
    client = f"{NS_PYTHON} {base_dir}/nsclient.py"
    script = (f"{client} tcp-echo 10.0.2.2 {srv.port} 100000 > {out1} && "
              f"{client} tcp-serve 0.0.0.0 80 echo 1 > {out2}")
    log_path = f"{workdir}/rootlesskit.log"
    with open(log_path, "wb") as log:
        proc = user.popen(
            ["rootlesskit", "--debug", f"--state-dir={workdir}/state", "--net=slirp4netns",
             f"--slirp4netns-binary={impl.bin}", "--port-driver=slirp4netns",
             "--copy-up=/etc", "--publish", f"127.0.0.1:{host_port}:80/tcp",
             "sh", "-c", script],
            stdout=log, stderr=log)

    def log_text():
        with open(log_path, errors="replace") as f:
            return f.read()[-6000:]

    try:
        def outbound_done():
            if proc.poll() is not None and not os.path.exists(out2):
                raise HarnessError(f"rootlesskit exited {proc.returncode}:\n{log_text()}")
            return os.path.exists(out1) and os.path.getsize(out1) > 0
        wait_until(outbound_done, 30, interval=0.1, what="namespace -> 10.0.2.2 transfer")
        # The forwarder RootlessKit started is the binary under test.
        cmdlines = [cmdline(p) for p in descendants(proc.pid)]
        assert any(c and c[0:1] == [impl.bin] or impl.bin in c[1:2] for c in cmdlines), cmdlines
        r = json.loads(open(out1).read())
        assert r["sha_received"] == r["sha_sent"] and r["received"] == 100000

        # The published port: retry until the namespace's server is listening.
        data = payload(200_000)
        deadline = time.monotonic() + 30
        while True:
            try:
                if sha256(tcp_send("127.0.0.1", host_port, data, timeout=10)) == sha256(data):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise HarnessError(f"published port never echoed\n{log_text()}")
            time.sleep(0.2)
        assert proc.wait(timeout=30) == 0, log_text()
        served = json.loads(open(out2).read().splitlines()[-1])["connections"]
        assert served[0]["echoed"] == len(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
