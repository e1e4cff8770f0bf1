"""fmx: the Foundation-Expert paradigm and HSTU in JAX/Flax."""
