"""Errors of the supervisor's set-up."""


class SetupError(RuntimeError):
    """Setup failed; the message says why (exit 1)."""
