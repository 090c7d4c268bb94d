"""nsnet: user-mode networking for unprivileged Linux network namespaces.

A drop-in replacement for slirp4netns 1.2.0 (libslirp through nsnet's own
cffi binding), with a supervisor that survives forwarder crashes,
`nsnet run -- CMD`, and this Python API (docs/python-api.md):

    import nsnet

    with nsnet.attach(pid) as net:                  # a process's network namespace
        net.add_forward("127.0.0.1:8080:80")
        print(net.forwards(), net.info(), net.stats())

    cp = nsnet.run(["curl", "http://10.0.2.2:8000/"], capture_output=True)
    with nsnet.Popen(["python3", "-m", "http.server", "80"],
                     publish=["127.0.0.1:8080:80"]) as p:
        p.wait_ready()
        ...

`import nsnet` is cheap: the API is imported on first use.
"""

from .errors import (
    ApiError,
    ForwardError,
    NotRunning,
    NsnetError,
    PolicyError,
    PortInUse,
    StartError,
    TargetNotFound,
)

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "ForwardError",
    "Network",
    "NotRunning",
    "NsnetError",
    "PolicyError",
    "PortForward",
    "PortInUse",
    "PortSpec",
    "Popen",
    "StartError",
    "TargetNotFound",
    "attach",
    "run",
]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .client import Network, PortForward, Popen, attach, run
    from .portspec import PortSpec

_LAZY = {
    "Network": "client",
    "PortForward": "client",
    "Popen": "client",
    "attach": "client",
    "run": "client",
    "PortSpec": "portspec",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nsnet' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
