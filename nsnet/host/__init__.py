"""Host side: the forwarder (libslirp + the C data path) and the fast-path
relay.  Nothing here may import namespace-side code (nsnet.ns)."""
