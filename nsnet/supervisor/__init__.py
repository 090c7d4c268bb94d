"""The supervisor: nsnet's lifecycle (core), its API socket (apiserver,
api), its handle on the forwarder and the restart policy (forwarder), and
on the fast path's relay and connector (fastpath)."""

from .core import Options, Supervisor, run
from .errors import SetupError
from .apiserver import parse_connection_info
from ..proto.exitcodes import EXIT_FAILURE, EXIT_OK

__all__ = ["Options", "SetupError", "Supervisor", "run", "parse_connection_info",
           "EXIT_FAILURE", "EXIT_OK"]
