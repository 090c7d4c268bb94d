"""Build information: the git commit nsnet was built from.

setup.py replaces COMMIT in the installed copy of this file; a source
checkout asks git."""

from __future__ import annotations

import os
import subprocess

COMMIT = ""


def commit() -> str:
    if COMMIT:
        return COMMIT
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=2, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out or "unknown"
