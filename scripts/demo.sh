#!/usr/bin/env bash
# nsnet's main job, end to end: an unprivileged user's network namespace
# reaches a web server on the host's 127.0.0.1 through nsnet (as 10.0.2.2).
#
#   sudo bash scripts/demo.sh                                 # the installed nsnet
#   NSNET_BIN=/usr/bin/slirp4netns sudo bash scripts/demo.sh  # the reference
#
# Runs scripts/setup.sh first (NSNET_SKIP_SETUP=1 skips it), then does
# everything inside a private network namespace that has only loopback, so
# nothing here can reach any other address.  Every process it starts is
# stopped by PID on exit.  Exit status 0 means the page came through intact.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NSNET_BIN="${NSNET_BIN:-${NSNET_VENV:-/opt/nsnet/venv}/bin/nsnet}"
DEMO_USER=nsnet-test
PORT="${NSNET_DEMO_PORT:-8080}"
say() { printf 'demo: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    say "run as root (the demo creates an unprivileged user and a private netns)"
    exit 1
fi

if [ "${NSNET_DEMO_ISOLATED:-}" != 1 ]; then
    if [ "${NSNET_SKIP_SETUP:-}" != 1 ]; then
        bash "$REPO/scripts/setup.sh"
    fi
    # Re-run this script in a fresh network namespace with only `lo`.
    exec env NSNET_DEMO_ISOLATED=1 NSNET_BIN="$NSNET_BIN" unshare --net -- bash "$0" "$@"
fi

# ---- from here on: inside the private netns ----------------------------------
ip link set lo up
[ -x "$NSNET_BIN" ] || { say "no forwarder binary at $NSNET_BIN"; exit 1; }
uid=$(id -u "$DEMO_USER")
gid=$(id -g "$DEMO_USER")
as_user=(setpriv "--reuid=$uid" "--regid=$gid" --clear-groups --)

work=$(mktemp -d /tmp/nsnet-demo.XXXXXX)
chmod 0755 "$work"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# 1. A web server on the host's loopback, serving a known page.
mkdir "$work/www"
expected="hello from the host's 127.0.0.1:$PORT via nsnet ($(date +%s%N))"
printf '%s\n' "$expected" >"$work/www/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$PORT" \
    >"$work/http.log" 2>&1 &
pids+=($!)

# 2. The target: a user+net namespace owned by the unprivileged user.
"${as_user[@]}" unshare --user --map-root-user --net -- sleep infinity &
target=$!
pids+=("$target")
for _ in $(seq 100); do
    [ "$(cat "/proc/$target/comm" 2>/dev/null)" = sleep ] && break
    sleep 0.05
done
[ "$(cat "/proc/$target/comm" 2>/dev/null)" = sleep ] || { say "namespace did not start"; exit 1; }
say "target namespace: pid $target (user $DEMO_USER)"

# 3. The forwarder, as the same user, with a ready-fd on a FIFO.
mkfifo "$work/ready"
"${as_user[@]}" "$NSNET_BIN" --configure --ready-fd=3 "$target" tap0 \
    3>"$work/ready" >"$work/forwarder.log" 2>&1 &
pids+=($!)
ready=""
read -r -t 15 -N 1 ready <"$work/ready" || true
if [ "$ready" != 1 ]; then
    say "forwarder did not become ready; its log:"
    cat "$work/forwarder.log" >&2
    exit 1
fi
say "forwarder ready: $NSNET_BIN (pid ${pids[-1]})"
for _ in $(seq 50); do  # the http server may still be starting
    python3 - "$PORT" 2>/dev/null <<'EOF' && break
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
EOF
    sleep 0.1
done

# 4. From inside the namespace, fetch the page through 10.0.2.2.
body=$("${as_user[@]}" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    nsenter "--target=$target" --user --net --preserve-credentials -- \
    /usr/bin/python3 - "$PORT" <<'EOF'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(f"http://10.0.2.2:{sys.argv[1]}/", timeout=10) as r:
    sys.stdout.write(r.read().decode())
EOF
)
printf '%s\n' "$body"
if [ "$body" != "$expected" ]; then
    say "FAILED: expected '$expected'"
    exit 1
fi
say "OK: the namespace fetched http://10.0.2.2:$PORT/ from the host's 127.0.0.1:$PORT"
