#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the two test tiers with the
# INSTALLED nsnet (the venv's pytest; never `python -m pytest` from the repo
# root, which would put the uncompiled source tree first on sys.path):
#
#   1. the unit tier, tests/unit/: no root, no namespaces; imports nsnet and
#      calls it directly.  Run with --confcutdir so that tests/conftest.py
#      (the end-to-end tier's re-exec as root) is not loaded, and as the
#      unprivileged test user when the tree is readable by it.
#   2. the end-to-end tier, tests/ without tests/unit: re-executes itself
#      inside a private network namespace (tests/conftest.py), and runs in
#      NSNET_TEST_JOBS pytest-xdist workers (default 4; 1: one process), each
#      in a sealed network namespace of its own.  Its tests mostly wait (for
#      processes to start, for timers, for the peer), so 4 workers finish it
#      in about half the time even on 2 cores.  Options that choose the
#      workers themselves (-n, --dist, -p no:xdist, --pdb) turn this off.
#
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k api -x`.  Paths
# among them pick the tier(s): `bash scripts/test.sh tests/unit` runs only the
# unit tier, `bash scripts/test.sh tests/test_api.py` only the end-to-end one.
# A tier that selects no test (pytest's exit 5) fails the run when it was
# asked for by path or when no arguments were given.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NSNET_VENV:-/opt/nsnet/venv}"
TEST_USER=nsnet-test

[ "${NSNET_TEST_SKIP_SETUP:-}" = 1 ] || bash "$REPO/scripts/setup.sh"

cd "$REPO"

# Split the arguments: paths go to the tier they are in, the rest to both.
opts=() unit_paths=() e2e_paths=()
for a in "$@"; do
    p="${a%%::*}"
    if [ -n "$p" ] && [ "${p#-}" = "$p" ] && [ -e "$p" ]; then
        case "$(realpath "$p")/" in
            "$REPO/tests/unit/"*) unit_paths+=("$a") ;;
            # tests/ (or the repository) holds both tiers: each gets its own
            # part, never the unit tier inside the end-to-end one (their
            # test_policy.py files share a name).
            "$REPO/tests/" | "$REPO/")
                unit_paths+=(tests/unit); e2e_paths+=(tests --ignore=tests/unit) ;;
            *) e2e_paths+=("$a") ;;
        esac
    else
        opts+=("$a")
    fi
done
run_unit=1 run_e2e=1
if [ "${#unit_paths[@]}" -gt 0 ] || [ "${#e2e_paths[@]}" -gt 0 ]; then
    [ "${#unit_paths[@]}" -gt 0 ] || run_unit=0
    [ "${#e2e_paths[@]}" -gt 0 ] || run_e2e=0
fi
[ "${#unit_paths[@]}" -gt 0 ] || unit_paths=(tests/unit)
[ "${#e2e_paths[@]}" -gt 0 ] || e2e_paths=(tests --ignore=tests/unit)
strict_empty=$([ "$#" -eq 0 ] && echo 1 || echo 0)

# tier NAME CMD...: run, print the outcome; exit 5 (nothing selected) is a
# failure only for a full run or a tier asked for by path.
results=()
tier() {
    local name=$1 by_path=$2; shift 2
    echo "test.sh: === $name tier ===" >&2
    set +e
    "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        if [ "$strict_empty" = 1 ] || [ "$by_path" = 1 ]; then
            echo "test.sh: FAILURE: the $name tier collected no tests (pytest exit 5)" >&2
            rc=1
        else
            echo "test.sh: the $name tier selected no tests with these options" >&2
        fi
    fi
    results+=("$name:$rc")
}

overall=0
if [ "$run_unit" = 1 ]; then
    unit_cmd=("$VENV/bin/pytest" -p no:cacheprovider --rootdir "$REPO"
              --confcutdir "$REPO/tests/unit" "${opts[@]}" "${unit_paths[@]}")
    # As the unprivileged user, which proves the tier needs no root; as
    # the caller when that user cannot read the tree or run the venv.
    if [ "$(id -u)" -eq 0 ] && id -u "$TEST_USER" >/dev/null 2>&1 \
       && setpriv --reuid="$TEST_USER" --regid="$TEST_USER" --clear-groups \
              test -r "$REPO/tests/unit/conftest.py" -a -x "$VENV/bin/pytest" 2>/dev/null; then
        unit_cmd=(setpriv --reuid="$TEST_USER" --regid="$TEST_USER" --clear-groups
                  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8
                  ${NSNET_VENV:+NSNET_VENV=$NSNET_VENV} PYTHONDONTWRITEBYTECODE=1
                  HYPOTHESIS_STORAGE_DIRECTORY=/tmp/nsnet-unit-hypothesis
                  "${unit_cmd[@]}")
    else
        echo "test.sh: unit tier runs as uid $(id -u) ($TEST_USER cannot read $REPO)" >&2
    fi
    tier unit "$([ "$run_unit" = 1 ] && [ "${unit_paths[0]}" != tests/unit ] && echo 1 || echo 0)" \
        "${unit_cmd[@]}"
fi
if [ "$run_e2e" = 1 ]; then
    by_path=0
    [ "${e2e_paths[0]}" != tests ] && by_path=1
    jobs="${NSNET_TEST_JOBS:-4}"
    workers=(-n "$jobs" --dist worksteal)
    case "$jobs" in
        ''|*[!0-9]*) echo "test.sh: NSNET_TEST_JOBS must be a number of workers, not '$jobs'" >&2
                     exit 2 ;;
        0|1) workers=() ;;
    esac
    if [ "${#workers[@]}" -gt 0 ] && ! "$VENV/bin/python" -c 'import xdist' 2>/dev/null; then
        echo "test.sh: pytest-xdist is not in $VENV (run scripts/setup.sh): one process" >&2
        workers=()
    fi
    for a in ${opts[@]+"${opts[@]}"}; do
        case "$a" in
            -n|-n[0-9]*|--numprocesses*|--dist*|no:xdist|--pdb) workers=() ;;
        esac
    done
    tier end-to-end "$by_path" \
        "$VENV/bin/pytest" -p no:cacheprovider --rootdir "$REPO" ${workers[@]+"${workers[@]}"} \
        ${opts[@]+"${opts[@]}"} "${e2e_paths[@]}"
fi

all_empty=1
for r in "${results[@]}"; do
    rc=${r#*:}
    [ "$rc" -eq 5 ] || all_empty=0
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then overall=1; fi
done
if [ "$all_empty" = 1 ]; then
    echo "test.sh: FAILURE: no tier selected any test" >&2
    overall=1
fi
echo "test.sh: tiers: ${results[*]}" >&2
exit "$overall"
