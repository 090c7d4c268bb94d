"""Exit codes shared by nsnet's processes."""

EXIT_OK = 0
EXIT_FAILURE = 1

# The forwarder's exit status when its TAP fails (host.forwarder.EXIT_TAP_ERROR).
FORWARDER_EXIT_TAP_ERROR = 3
