#!/usr/bin/env bash
# Startup cost of wrapping a command with networking: `nsnet run -- true` vs
# `pasta --config-net -- true` vs unshare + slirp4netns glue doing the same
# job (namespace, TAP configured, then the command).  Run as root; the
# commands run as the unprivileged user $BENCH_USER inside a private
# network namespace (`unshare --net`) that has only lo and a dummy
# interface (or a veth pair) with a default route to nowhere (pasta wants a default route;
# `true` sends nothing, so nothing is ever sent there).
#
#   NSNET_VENV=/opt/nsnet/venv bash bench/startup.sh [RUNS] [ROUNDS]
#
# The machine is noisy: ROUNDS rounds of RUNS runs of each command (hyperfine
# runs one command's runs back to back; rounds interleave them), then the
# median and quartiles over all runs of each command.
set -euo pipefail
RUNS=${1:-20}
ROUNDS=${2:-3}
VENV=${NSNET_VENV:-/opt/nsnet/venv}
BENCH_USER=${BENCH_USER:-nsnet-test}
OUT=${BENCH_OUT:-/tmp/nsnet-startup}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)" >&2; exit 1; }
mkdir -p "$OUT"
chown "$BENCH_USER" "$OUT"
rm -f "$OUT"/startup.*.json
chmod 755 "$OUT"
install -m 755 "$HERE/slirp4netns-glue.sh" "$OUT/slirp4netns-glue.sh"
uid=$(id -u "$BENCH_USER")
gid=$(id -g "$BENCH_USER")

unshare --net -- bash -c '
set -euo pipefail
ip link set lo up
# A dummy interface where the kernel has the module; else a veth pair whose
# both ends stay in this namespace.
ip link add d0 type dummy 2>/dev/null || ip link add d0 type veth peer name d1
ip addr add 192.0.2.1/24 dev d0
ip link set d0 up
ip link show d1 >/dev/null 2>&1 && ip link set d1 up
ip route add default via 192.0.2.254 dev d0
as_user="setpriv --reuid='"$uid"' --regid='"$gid"' --clear-groups --"
cd /
for round in $(seq '"$ROUNDS"'); do
$as_user env HOME=/tmp PATH=/usr/local/bin:/usr/bin:/bin hyperfine -N --style basic \
    --warmup 3 --runs '"$RUNS"' --export-json '"$OUT"'/startup.$round.json \
    -n "nsnet run" "'"$VENV"'/bin/nsnet run -- true" \
    -n "pasta" "pasta --config-net --quiet -- true" \
    -n "unshare+slirp4netns" "'"$OUT"'/slirp4netns-glue.sh true" \
    -n "python3 -c pass (floor)" "/usr/bin/python3 -c pass" \
    -n "unshare -rn true (floor)" "unshare --user --map-root-user --net true"
done
'
/usr/bin/python3 - "$OUT" <<'PY'
import glob, json, statistics, sys
times = {}
for path in sorted(glob.glob(f"{sys.argv[1]}/startup.*.json")):
    for r in json.load(open(path))["results"]:
        times.setdefault(r["command"], []).extend(r["times"])
print(f"{'command':28} {'runs':>5} {'median':>9} {'q1':>8} {'q3':>8} {'min':>8}  (ms)")
for name, t in times.items():
    q = statistics.quantiles(t, n=4)
    print(f"{name:28} {len(t):5d} {statistics.median(t)*1e3:9.1f} {q[0]*1e3:8.1f} "
          f"{q[2]*1e3:8.1f} {min(t)*1e3:8.1f}")
PY
