"""Host side (the host's namespaces): the forwarder (libslirp + the C data
path), the fast-path relay, the bypass handler.  Nothing here may import
namespace-side code (nsnet.ns)."""
