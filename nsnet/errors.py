"""The exceptions of nsnet's Python API (importable as ``nsnet.NsnetError``
and so on).  This module imports nothing, so ``import nsnet`` stays cheap.

    NsnetError               base class of everything below
    ├── TargetNotFound       the PID or namespace path to attach to does not exist
    ├── StartError           nsnet could not set up (message has its stderr)
    ├── NotRunning           the handle is closed, or nsnet has exited
    ├── ApiError             the API socket answered an error not covered below
    ├── ForwardError         a port forward spec is invalid or was refused
    │   └── PortInUse        the host address and port are already taken
    └── PolicyError          an egress policy or rule is invalid or was refused
"""


class NsnetError(Exception):
    """Base class of every error raised by nsnet's Python API."""


class TargetNotFound(NsnetError):
    """The process or network namespace to attach to does not exist (or
    exited before nsnet could attach)."""


class StartError(NsnetError):
    """nsnet failed to start; the message includes what it printed."""


class NotRunning(NsnetError):
    """The handle was closed, or the nsnet process has exited (for
    example because the target process exited)."""


class ApiError(NsnetError):
    """The API socket answered with an error; str() is its description."""


class ForwardError(NsnetError, ValueError):
    """A port forward that is malformed (bad port, address or protocol;
    unknown forward id) or that nsnet refused."""


class PortInUse(ForwardError):
    """The host address and port of a forward are already in use."""


class PolicyError(NsnetError, ValueError):
    """An egress policy or rule that cannot be used (nsnet/policy.py); the
    message says which rule and why."""
