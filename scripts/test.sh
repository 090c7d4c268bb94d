#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the end-to-end suite with the
# INSTALLED nsnet (the venv's pytest; never `python -m pytest` from the repo
# root, which would put the uncompiled source tree first on sys.path).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k api -x`.
# The suite re-executes itself inside a private network namespace (tests/conftest.py).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NSNET_VENV:-/opt/nsnet/venv}"

bash "$REPO/scripts/setup.sh"

cd "$REPO"
set +e
"$VENV/bin/pytest" -p no:cacheprovider --rootdir "$REPO" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: FAILURE: pytest collected no tests (exit 5)" >&2
    exit 1
fi
exit "$rc"
