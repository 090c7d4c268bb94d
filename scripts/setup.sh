#!/usr/bin/env bash
# Prepare a Debian 12 machine to build, run and test nsnet. Run as root; idempotent.
#
#   - installs the Debian packages below (apt output goes to a log file),
#   - creates a venv with the system python (/usr/bin/python3, executable by
#     every user) at ${NSNET_VENV:-/opt/nsnet/venv} and installs nsnet into it
#     NON-editable, so the compiled cffi extension lands in site-packages,
#   - creates the unprivileged test user nsnet-test with subuid/subgid ranges,
#   - makes /dev/net/tun 0666 as distributions ship it.
#
# Environment:
#   NSNET_VENV           venv location (default /opt/nsnet/venv)
#   NSNET_ALLOW_MISSING  =1: a failing build of nsnet is a warning, not an error
#                        (only while nsnet is being written)
#   NSNET_SETUP_APT      =always: run apt-get even when every package is present
set -euo pipefail
umask 022

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NSNET_VENV:-/opt/nsnet/venv}"
TEST_USER=nsnet-test
SUB_RANGE_START=200000
SUB_RANGE_COUNT=65536
LOG_DIR="${NSNET_LOG_DIR:-/tmp/nsnet-setup}"

# The one list of Debian packages the project needs.
APT_PACKAGES=(
    libslirp-dev libglib2.0-dev pkg-config gcc python3-dev python3-venv
    iproute2 uidmap slirp4netns passt iperf3 rootlesskit libseccomp-dev
    util-linux procps iputils-ping runc
)

say() { printf 'setup.sh: %s\n' "$*" >&2; }
fail_with_log() {
    local what=$1 log=$2
    say "FAILED: $what (log: $log); last lines:"
    tail -n 40 "$log" >&2 || true
    exit 1
}

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root"
    exit 1
fi
mkdir -p "$LOG_DIR"

# --- Debian packages -------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ] || [ "${NSNET_SETUP_APT:-}" = always ]; then
    say "installing Debian packages: ${missing[*]:-(forced)}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >"$LOG_DIR/apt-update.log" 2>&1 \
        || fail_with_log "apt-get update" "$LOG_DIR/apt-update.log"
    apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}" \
        >"$LOG_DIR/apt-install.log" 2>&1 \
        || fail_with_log "apt-get install" "$LOG_DIR/apt-install.log"
fi

# --- venv ------------------------------------------------------------------
# Always the system interpreter: a pyenv python under /root is not executable
# by the unprivileged test user.
if [ ! -x "$VENV/bin/python" ] || \
   [ "$(readlink -f "$VENV/bin/python")" != "$(readlink -f /usr/bin/python3)" ]; then
    say "creating venv $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
fi
PIP_LOG="$LOG_DIR/pip.log"
: >"$PIP_LOG"
"$VENV/bin/python" -m pip install -q --upgrade pip >>"$PIP_LOG" 2>&1 \
    || fail_with_log "pip upgrade" "$PIP_LOG"

# Runtime and test dependencies, read from pyproject.toml (the single source),
# then nsnet itself, rebuilt from the current tree every time.
mapfile -t PY_DEPS < <(/usr/bin/python3 - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
for dep in project.get("dependencies", []) + project.get("optional-dependencies", {}).get("test", []) + project.get("optional-dependencies", {}).get("bench", []):
    print(dep)
EOF
)
if [ "${#PY_DEPS[@]}" -gt 0 ]; then
    "$VENV/bin/python" -m pip install -q "${PY_DEPS[@]}" >>"$PIP_LOG" 2>&1 \
        || fail_with_log "pip install of dependencies" "$PIP_LOG"
fi
if "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$REPO" >>"$PIP_LOG" 2>&1; then
    say "installed nsnet from $REPO into $VENV"
elif [ "${NSNET_ALLOW_MISSING:-}" = 1 ]; then
    say "WARNING: building nsnet failed (NSNET_ALLOW_MISSING=1, continuing); see $PIP_LOG"
else
    fail_with_log "pip install of nsnet" "$PIP_LOG"
fi
chmod a+rx "$(dirname "$VENV")"   # e.g. /opt/nsnet: traversable by the test user
chmod -R a+rX "$VENV"

# --- unprivileged test user ------------------------------------------------
if ! id -u "$TEST_USER" >/dev/null 2>&1; then
    say "creating user $TEST_USER"
    useradd --create-home --home-dir "/home/$TEST_USER" --shell /usr/sbin/nologin "$TEST_USER"
fi
for f in /etc/subuid /etc/subgid; do
    touch "$f"
    if ! grep -q "^$TEST_USER:" "$f"; then
        echo "$TEST_USER:$SUB_RANGE_START:$SUB_RANGE_COUNT" >>"$f"
    fi
done

# --- TUN device as distributions ship it -------------------------------------
if [ ! -e /dev/net/tun ]; then
    mkdir -p /dev/net
    mknod -m 0666 /dev/net/tun c 10 200
fi
chmod 0666 /dev/net/tun

say "ok"
