"""HSTU encoder (arXiv 2402.17152), following the official research implementation.

Per layer: `U,V,Q,K = split(silu(LN(x) W))`; `A = silu(alpha QK^T + rab) / N`, masked;
`y = x + W_o(dropout(LN(A V) * U))`. The relative attention bias (rab) of every layer is the
sum of a learned position bias over `2N-1` relative positions and a learned time bias over
`num_buckets + 1` log-buckets of `t_next(i) - t(j)`, shared across heads.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import hstu_attention


def time_buckets(timestamps: jax.Array, query_times: jax.Array, num_buckets: int) -> jax.Array:
  """`[B, N, N]` bucket of `query_times[b, i] - timestamps[b, j]` as the official code computes it.

  bucket = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets), where `query_times[b, i]` is
  the timestamp of the item that follows position i (the official code's "next item").
  """
  dt = query_times[:, :, None].astype(jnp.float32) - timestamps[:, None, :].astype(jnp.float32)
  b = jnp.floor(jnp.log(jnp.maximum(jnp.abs(dt), 1.0)) / 0.301)
  return jnp.clip(b, 0, num_buckets).astype(jnp.int32)


def relative_positions(n: int) -> jax.Array:
  """`[N, N]` index `N - 1 + j - i` into the `2N-1` position-bias table."""
  i = jnp.arange(n)[:, None]
  j = jnp.arange(n)[None, :]
  return (n - 1 + j - i).astype(jnp.int32)


class RelativeBias(nn.Module):
  """Learned position + bucketed time bias of one layer."""

  max_len: int
  num_buckets: int = 128

  @nn.compact
  def __call__(self, buckets: jax.Array, n: int) -> jax.Array:
    init = nn.initializers.normal(stddev=0.02)
    pos_w = self.param("pos_w", init, (2 * self.max_len - 1,))
    ts_w = self.param("ts_w", init, (self.num_buckets + 1,))
    rel = relative_positions(n) + (self.max_len - n)
    return jnp.take(pos_w, rel)[None] + jnp.take(ts_w, buckets)


class HSTULayer(nn.Module):
  dim: int
  num_heads: int
  dqk: int
  dv: int
  max_len: int
  dropout: float
  num_buckets: int = 128
  alpha: float = 1.0
  scale_len: int | None = None
  use_rab: bool = True
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, lengths, buckets, *, num_targets=None, train: bool):
    b, n, _ = x.shape
    h, dqk, dv = self.num_heads, self.dqk, self.dv
    normed = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False)(x)
    uvqk = nn.Dense(2 * h * (dv + dqk), use_bias=False,
                    kernel_init=nn.initializers.normal(stddev=0.02), name="uvqk")(normed)
    u, v, q, k = jnp.split(jax.nn.silu(uvqk), [h * dv, 2 * h * dv, 2 * h * dv + h * dqk], axis=-1)
    bias = RelativeBias(self.max_len, self.num_buckets)(buckets, n) if self.use_rab else None
    attn = hstu_attention(
        q.reshape(b, n, h, dqk), k.reshape(b, n, h, dqk), v.reshape(b, n, h, dv), lengths,
        bias=bias, num_targets=num_targets, alpha=self.alpha,
        scale_len=self.scale_len or self.max_len, impl=self.attention_impl)
    a = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False)(attn.reshape(b, n, h * dv))
    y = nn.Dropout(self.dropout, deterministic=not train)(u * a)
    y = nn.Dense(self.dim, kernel_init=nn.initializers.xavier_uniform(), name="out")(y)
    return x + y


class HSTU(nn.Module):
  """A stack of HSTU layers over `[B, N, d]` right-padded inputs."""

  num_layers: int
  dim: int
  num_heads: int
  dqk: int
  dv: int
  max_len: int
  dropout: float
  num_buckets: int = 128
  alpha: float = 1.0
  scale_len: int | None = None
  use_rab: bool = True
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, lengths, timestamps, query_times, *, num_targets=None, train: bool):
    buckets = time_buckets(timestamps, query_times, self.num_buckets)
    for i in range(self.num_layers):
      x = HSTULayer(self.dim, self.num_heads, self.dqk, self.dv, self.max_len, self.dropout,
                    self.num_buckets, self.alpha, self.scale_len, self.use_rab,
                    self.attention_impl, name=f"layer_{i}")(
                        x, lengths, buckets, num_targets=num_targets, train=train)
    valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    return jnp.where(valid[..., None], x, 0.0)
