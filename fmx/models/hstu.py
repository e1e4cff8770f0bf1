"""HSTU encoder (arXiv 2402.17152), following the official research implementation.

Per layer: `U,V,Q,K = split(silu(LN(x) W))`; `A = silu(alpha QK^T + rab) / N`, masked;
`y = x + W_o(dropout(LN(A V) * U))`. The relative attention bias (rab) of every layer is the
sum of a learned position bias over `2N-1` relative positions and a learned time bias over
`num_buckets + 1` log-buckets of `t_next(i) - t(j)`, shared across heads.

Ranking mode: targets (candidates) are appended after the history with `num_targets`; they
share the position right after the history. `encode_history` + `extend` compute the same
target outputs from a per-layer key/value cache of the history (M-FALCON); `append` updates that
cache when rows are appended to (or change at the end of) the history.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmx.models import axes
from fmx.models.dropout import Dropout
from kernels import hstu_attention, hstu_cached_attention, masks
from kernels.reference import masked_attention


@dataclasses.dataclass(frozen=True)
class HSTUConfig:
  """The HSTU stack, shared by every model that embeds one."""

  num_layers: int
  dim: int  # model width d
  num_heads: int
  dqk: int  # per-head query/key width
  dv: int  # per-head value width
  max_len: int  # padded length N: position tables and the 1/N scale
  dropout: float = 0.0  # on the attention output
  num_buckets: int = 128  # log time buckets (+1) of the relative bias
  alpha: float = 1.0  # multiplier of QK^T (the official code uses no 1/sqrt(d))
  scale_len: int = 0  # the 1/scale_len normaliser; 0 means max_len (the official choice)
  use_rab: bool = True  # relative position + time attention bias
  attention_impl: str = "auto"  # kernels.hstu_attention impl

  @classmethod
  def from_model_config(cls, m: Mapping[str, Any], **overrides) -> "HSTUConfig":
    """From a `model` config section (`num_time_buckets` names `num_buckets` there); fields the
    section lacks keep their defaults."""
    names = {f.name: ("num_time_buckets" if f.name == "num_buckets" else f.name)
             for f in dataclasses.fields(cls)}
    values = {f: m[k] for f, k in names.items() if k in m}
    return cls(**{**values, **overrides})


def time_buckets(timestamps: jax.Array, query_times: jax.Array, num_buckets: int) -> jax.Array:
  """`[B, Nq, Nk]` bucket of `query_times[b, i] - timestamps[b, j]` as the official code computes it.

  bucket = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets), where `query_times[b, i]` is
  the timestamp of the item that follows position i (the official code's "next item").
  """
  dt = (query_times[:, :, None] - timestamps[:, None, :]).astype(jnp.float32)  # exact int diff
  b = jnp.floor(jnp.log(jnp.maximum(jnp.abs(dt), 1.0)) / 0.301)
  return jnp.clip(b, 0, num_buckets).astype(jnp.int32)


def relative_positions(q_pos: jax.Array, k_pos: jax.Array, max_len: int) -> jax.Array:
  """`[B, Nq, Nk]` index `max_len - 1 + k_pos[j] - q_pos[i]` into the `2 max_len - 1`
  position-bias table (`q_pos`, `k_pos`: `[B, N]` positions)."""
  return (max_len - 1 + k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.int32)


@jax.custom_vjp
def relative_bias(pos_w: jax.Array, ts_w: jax.Array, rel: jax.Array, buckets: jax.Array):
  """`pos_w[rel] + ts_w[buckets]` (`rel` `[1 or B, ...]`, `buckets` `[B, ...]`).

  The gradient is written out because the one JAX derives is slow on CPU: it sums the position
  part over the batch with a major-axis reduction (here a matmul with ones, 50x faster) and
  scatters into each table (here a segment sum over the flattened index, 3x faster).
  `buckets` must lie in `[0, len(ts_w))`, as `time_buckets` makes them: the time table is read
  and written without bounds checks (2x faster).
  """
  return jnp.take(pos_w, rel) + ts_w.at[buckets].get(mode="promise_in_bounds")


def _relative_bias_fwd(pos_w, ts_w, rel, buckets):
  return relative_bias(pos_w, ts_w, rel, buckets), (pos_w.shape[0], ts_w.shape[0], rel, buckets)


def _relative_bias_bwd(residuals, g):
  pos_rows, ts_rows, rel, buckets = residuals
  g_pos = g
  if rel.shape[0] == 1 and g.shape[0] > 1:  # the position table is shared by the batch
    g_pos = (jnp.ones((1, g.shape[0]), g.dtype) @ g.reshape(g.shape[0], -1)).reshape(rel.shape)
  d_pos = jax.ops.segment_sum(g_pos.reshape(-1), rel.reshape(-1), pos_rows)
  d_ts = jax.ops.segment_sum(g.reshape(-1), buckets.reshape(-1), ts_rows, mode="promise_in_bounds")
  return d_pos, d_ts, None, None


relative_bias.defvjp(_relative_bias_fwd, _relative_bias_bwd)


class RelativeBias(nn.Module):
  """Learned position + bucketed time bias of one layer: `bias[b,i,j] = pos_w[rel] + ts_w[bucket]`."""

  max_len: int
  num_buckets: int = 128

  @nn.compact
  def __call__(self, buckets: jax.Array, rel: jax.Array) -> jax.Array:
    init = axes.names(nn.initializers.normal(stddev=0.02), axes.TABLE)
    pos_w = self.param("pos_w", init, (2 * self.max_len - 1,))
    ts_w = self.param("ts_w", init, (self.num_buckets + 1,))
    return relative_bias(pos_w, ts_w, rel, buckets)


class HSTULayer(nn.Module):
  config: HSTUConfig

  def setup(self):
    c = self.config
    h = c.num_heads
    self.uvqk = axes.dense(2 * h * (c.dv + c.dqk), use_bias=False,
                           kernel_init=nn.initializers.normal(stddev=0.02))
    self.out = axes.dense(c.dim, kernel_init=nn.initializers.xavier_uniform(),
                          axes=(axes.MLP, axes.EMBED))
    self.drop = Dropout(c.dropout)
    if c.use_rab:
      self.rab = RelativeBias(c.max_len, c.num_buckets)

  @property
  def scale_len(self) -> int:
    return self.config.scale_len or self.config.max_len

  def project(self, x):
    """`u [B, L, H*dv]`, `q, k [B, L, H, dqk]`, `v [B, L, H, dv]`."""
    b, n, _ = x.shape
    h, dqk, dv = self.config.num_heads, self.config.dqk, self.config.dv
    uvqk = jax.nn.silu(self.uvqk(_ln(x)))
    u, v, q, k = jnp.split(uvqk, [h * dv, 2 * h * dv, 2 * h * dv + h * dqk], axis=-1)
    return u, q.reshape(b, n, h, dqk), k.reshape(b, n, h, dqk), v.reshape(b, n, h, dv)

  def bias(self, buckets, rel):
    return self.rab(buckets, rel) if self.config.use_rab else None

  def combine(self, x, u, attn, *, train: bool):
    b, n = x.shape[:2]
    a = _ln(attn.reshape(b, n, self.config.num_heads * self.config.dv))
    return x + self.out(self.drop(u * a, deterministic=not train))

  def __call__(self, x, lengths, buckets, rel, *, num_targets=None, train: bool):
    u, q, k, v = self.project(x)
    attn = hstu_attention(q, k, v, lengths, bias=self.bias(buckets, rel), num_targets=num_targets,
                          alpha=self.config.alpha, scale_len=self.scale_len,
                          impl=self.config.attention_impl)
    return self.combine(x, u, attn, train=train), (k, v)

  def extend(self, x_new, k_cache, v_cache, cache_lengths, buckets_cache, rel_cache, buckets_self,
             rel_self):
    """Target rows against this layer's cached history keys/values (inference only)."""
    u, q, k, v = self.project(x_new)
    attn = hstu_cached_attention(
        q, k_cache, v_cache, cache_lengths, k, v, bias_cache=self.bias(buckets_cache, rel_cache),
        bias_self=self.bias(buckets_self, rel_self), alpha=self.config.alpha,
        scale_len=self.scale_len)
    return self.combine(x_new, u, attn, train=False)

  def append(self, x_rows, k_cache, v_cache, rows, mask, buckets, rel):
    """Rows at positions `rows [B, R]` against this layer's cache with their own keys/values
    written in (positions >= N are dropped); returns (outputs, new (k, v)). Inference only."""
    u, q, k, v = self.project(x_rows)
    b = jnp.arange(rows.shape[0])[:, None]
    k = k_cache.at[b, rows].set(k, mode="drop")
    v = v_cache.at[b, rows].set(v, mode="drop")
    attn = masked_attention(q, k, v, mask, bias=self.bias(buckets, rel), alpha=self.config.alpha,
                            scale_len=self.scale_len)
    return self.combine(x_rows, u, attn, train=False), (k, v)


def _ln(x):
  """LayerNorm without learned scale or bias (as the official code), eps 1e-6."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6)


class HSTU(nn.Module):
  """A stack of HSTU layers over `[B, N, d]` right-padded inputs."""

  config: HSTUConfig

  def setup(self):
    self.layers = [HSTULayer(self.config) for _ in range(self.config.num_layers)]

  def __call__(self, x, lengths, timestamps, query_times, *, positions=None, num_targets=None,
               train: bool, return_cache: bool = False):
    n = x.shape[1]
    if positions is None:  # one [1, N, N] table shared by the batch
      positions = jnp.arange(n, dtype=jnp.int32)[None]
    # Computed once for every layer: the barrier keeps XLA from fusing (recomputing) the
    # logarithms into each layer's bias gather and gradient.
    buckets, rel = jax.lax.optimization_barrier((
        time_buckets(timestamps, query_times, self.config.num_buckets),
        relative_positions(positions, positions, self.config.max_len)))
    cache = []
    for layer in self.layers:
      x, kv = layer(x, lengths, buckets, rel, num_targets=num_targets, train=train)
      cache.append(kv)
    valid = jnp.arange(n)[None, :] < lengths[:, None]
    x = jnp.where(valid[..., None], x, 0.0)
    return (x, cache) if return_cache else x

  def extend(self, x_new, cache, cache_lengths, timestamps, new_times, new_positions, positions):
    """Outputs of new target rows given `cache` from `__call__(..., return_cache=True)` over a
    history of `cache_lengths` tokens (`timestamps`, `positions` of the history).
    `new_times` are the targets' query (and key) times, `new_positions` their position."""
    c = self.config
    buckets_cache = time_buckets(timestamps, new_times, c.num_buckets)
    rel_cache = relative_positions(new_positions, positions, c.max_len)
    buckets_self = jnp.zeros(new_times.shape, jnp.int32)  # a target against itself: dt = 0
    rel_self = jnp.full(new_times.shape, c.max_len - 1, jnp.int32)
    for layer, (k, v) in zip(self.layers, cache):
      x_new = layer.extend(x_new, k, v, cache_lengths, buckets_cache, rel_cache, buckets_self, rel_self)
    return x_new

  def append(self, x_rows, cache, start, lengths, timestamps, query_times, positions):
    """Re-encodes rows `start[b] .. start[b] + R - 1` of a history whose rows `< start` have the
    same inputs, query times and positions as in an earlier encoding (being causal, the same
    keys/values at every layer too). Inference only.

    `x_rows [B, R, d]`: the layer-0 inputs of those rows (R static); `cache`: the earlier per-layer
    (k, v) `[B, N, H, .]`, valid for rows < start; `lengths [B]` (<= start + R), `timestamps`,
    `query_times`, `positions` `[B, N]`: the new history. Returns (the rows' outputs `[B, R, d]`,
    zero from `lengths` on; the new cache, rows start .. start + R - 1 that are < N replaced),
    the rows of `__call__(..., return_cache=True)` on the new history below `lengths`.
    """
    c = self.config
    n = timestamps.shape[1]
    rows = start[:, None] + jnp.arange(x_rows.shape[1], dtype=jnp.int32)[None]  # [B, R]
    at = lambda a: jnp.take_along_axis(a, jnp.minimum(rows, n - 1), axis=1)
    buckets = time_buckets(timestamps, at(query_times), c.num_buckets)
    rel = relative_positions(at(positions), positions, c.max_len)
    keys = jnp.arange(n)[None, None]
    mask = masks.element_mask(rows[:, :, None], keys, lengths[:, None, None], 0)  # causal, lengths
    new_cache = []
    for layer, (k, v) in zip(self.layers, cache):
      x_rows, kv = layer.append(x_rows, k, v, rows, mask, buckets, rel)
      new_cache.append(kv)
    return jnp.where((rows < lengths[:, None])[..., None], x_rows, 0.0), new_cache
