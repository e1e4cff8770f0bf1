"""Counter-based hashing on 32-bit words: cheap, stateless, the same on any mesh (each device
hashes the global positions of its own elements). Checkpoint checksums and dropout masks use it."""

from __future__ import annotations

import jax.numpy as jnp


def mix32(h):
  """murmur3's 32-bit finaliser: a bijection of uint32 spreading each input bit over the output."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)
