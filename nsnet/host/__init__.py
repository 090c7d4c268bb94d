"""Code that runs on the host side (the host's namespaces)."""
