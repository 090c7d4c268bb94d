#!/usr/bin/env bash
# The mutation check (docs/testing.md): each one-line mutation of
# tests/mutants.txt is applied to a scratch build in /opt/nsnet/venv-mutant
# (NSNET_MUTANT_VENV), and the tests it names must fail.  Run as root.
#   bash scripts/mutants.sh [--only ID,ID] [--ci] [--list]
set -euo pipefail
exec /usr/bin/python3 "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/mutants.py" "$@"
