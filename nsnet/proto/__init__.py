"""Internal protocols between nsnet's processes: one module per protocol."""
