"""nsnet: user-mode networking for unprivileged Linux network namespaces.

A drop-in replacement for slirp4netns 1.2.0 (libslirp through nsnet's own
cffi binding), with a supervisor that survives forwarder crashes,
`nsnet run -- CMD`, and this Python API (see README.md).
"""

__version__ = "0.1.0"
