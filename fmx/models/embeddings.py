"""Input embeddings shared by the sequential encoders."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmx.models import axes
from fmx.models.dropout import Dropout


def padded_vocab(num_items: int, shards: int = 1) -> int:
  """Item table rows: padding row 0 + items, rounded up to a multiple of 8 that `shards`
  (the mesh's `model` axis, over which the rows are split) divides evenly."""
  multiple = math.lcm(8, shards)
  return -(-(num_items + 1) // multiple) * multiple


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """`x` over its last axis' L2 norm, in float32 at least: the unit vectors feed logits divided
  by a small temperature, which would magnify bfloat16's rounding."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class ItemEmbedding(nn.Module):
  """Item-id table `[vocab, d]`; row 0 is padding. Truncated-normal(0.02) as the official code."""

  vocab_size: int
  dim: int

  def setup(self):
    self.embedding = self.param(
        "embedding", axes.names(nn.initializers.truncated_normal(stddev=0.02), axes.VOCAB,
                                axes.VOCAB_EMBED), (self.vocab_size, self.dim))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0)


class PositionalInput(nn.Module):
  """`x * sqrt(d) + pos_emb(position)`, dropout, padded positions zeroed (official preprocessor)."""

  max_len: int
  dim: int
  dropout: float

  @nn.compact
  def __call__(self, x: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    n = x.shape[1]
    init = nn.initializers.truncated_normal(stddev=math.sqrt(1.0 / self.dim))
    pos = self.param("pos_embedding", axes.names(init, axes.CATEGORY, axes.EMBED),
                     (self.max_len, self.dim))
    x = x * math.sqrt(self.dim) + pos[None, :n]
    x = Dropout(self.dropout, deterministic=not train)(x)
    valid = jnp.arange(n)[None, :] < lengths[:, None]
    return jnp.where(valid[..., None], x, 0.0)
