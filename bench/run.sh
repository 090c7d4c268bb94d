#!/usr/bin/env bash
# nsnet vs slirp4netns vs pasta, side by side: see bench/bench.py.
#   sudo bench/run.sh [--smoke] [--reps N] [--duration S] [--out DIR]
# Uses the venv of scripts/setup.sh (${NSNET_VENV:-/opt/nsnet/venv}) for
# nsnet and matplotlib.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${NSNET_VENV:-/opt/nsnet/venv}"
export NSNET_VENV="$VENV"
exec "$VENV/bin/python" "$HERE/bench.py" "$@"
