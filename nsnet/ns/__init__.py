"""Code that runs inside the target's user and network namespaces.

Nothing here may import the libslirp binding (nsnet._slirp_cffi) or host-side
code (nsnet.host); tests/unit/test_layout.py checks it."""
