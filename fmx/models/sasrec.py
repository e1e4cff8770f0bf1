"""SASRec (Kang & McAuley 2018) as the official HSTU repository's baseline: pre-LN causal softmax
attention blocks with a point-wise ReLU feed-forward, and a final LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class SASRecBlock(nn.Module):
  dim: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x, mask, valid, *, train: bool):
    q = nn.LayerNorm(epsilon=1e-8)(x)
    attn = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout, deterministic=not train)(
            q, x, x, mask=mask)
    x = q + attn
    x = nn.LayerNorm(epsilon=1e-8)(x)
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(nn.Dense(self.dim)(x)))
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.Dense(self.dim)(y))
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
    return jnp.where(valid[..., None], nn.LayerNorm(epsilon=1e-8)(x), 0.0)
