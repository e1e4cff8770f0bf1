"""Pure Flax modules: parameters are pytrees, `apply` is a pure function; no I/O here."""
