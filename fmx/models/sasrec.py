"""SASRec (Kang & McAuley 2018) as the official HSTU repository's baseline: pre-LN causal softmax
attention blocks with a point-wise ReLU feed-forward, and a final LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fmx.models import axes
from fmx.models.dropout import Dropout


class SASRecBlock(nn.Module):
  dim: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x, mask, valid, *, train: bool):
    q = axes.layer_norm(epsilon=1e-8)(x)
    # Flax gives the query/key/value and output projections one kernel_init, whose kernels
    # differ in axis order: they stay replicated
    attn = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train,
        kernel_init=axes.names(nn.linear.default_kernel_init, *axes.REPLICATED),
        bias_init=axes.names(nn.initializers.zeros_init(), *axes.REPLICATED))(q, x, x, mask=mask)
    x = q + attn
    x = axes.layer_norm(epsilon=1e-8)(x)
    y = Dropout(self.dropout, deterministic=not train)(nn.relu(axes.dense(self.dim)(x)))
    y = Dropout(self.dropout, deterministic=not train)(
        axes.dense(self.dim, axes=(axes.MLP, axes.EMBED))(y))
    return jnp.where(valid[..., None], x + y, 0.0)


class SASRec(nn.Module):
  num_layers: int
  dim: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x, lengths, timestamps=None, query_times=None, *, num_targets=None,
               train: bool):
    del timestamps, query_times
    if num_targets is not None:
      raise ValueError("SASRec supports retrieval only (num_targets must be None)")
    n = x.shape[1]
    valid = jnp.arange(n)[None, :] < lengths[:, None]
    causal = jnp.tril(jnp.ones((n, n), bool))
    mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, N, N]
    for i in range(self.num_layers):
      x = SASRecBlock(self.dim, self.num_heads, self.dropout, name=f"block_{i}")(
          x, mask, valid, train=train)
    return jnp.where(valid[..., None], axes.layer_norm(epsilon=1e-8)(x), 0.0)
