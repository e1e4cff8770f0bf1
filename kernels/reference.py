"""Pure-jnp reference for jagged HSTU attention.

Layout: padded `[B, N, H, d]` tensors plus `lengths[B]` (right padding). The mask follows the
official `_get_valid_attn_mask` of meta-recsys/generative-recommenders (causal, lengths,
`num_targets`, contextual prefix, `max_attn_len`), and additionally masks every padded row and
column so that padding can never change a real position's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import masks


def valid_attn_mask(
    n: int,
    lengths: jax.Array,
    num_targets: jax.Array | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    causal: bool = True,
) -> jax.Array:
  """Boolean `[B, N, N]` mask: entry `[b, i, j]` is True when query i may attend to key j
  (the rule is documented in `kernels/masks.py`)."""
  lengths = jnp.asarray(lengths, jnp.int32)
  targets = jnp.zeros_like(lengths) if num_targets is None else jnp.asarray(num_targets, jnp.int32)
  pos = jnp.arange(n, dtype=jnp.int32)
  return masks.element_mask(pos[None, :, None], pos[None, None, :], lengths[:, None, None],
                            targets[:, None, None], contextual_len=contextual_len,
                            max_attn_len=max_attn_len, causal=causal)


def hstu_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    bias: jax.Array | None = None,
    num_targets: jax.Array | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    causal: bool = True,
    alpha: float = 1.0,
    scale_len: int | None = None,
) -> jax.Array:
  """`out[b,i,h] = sum_j mask[b,i,j] * silu(alpha * q_i.k_j + bias[b,i,j]) / scale_len * v_j`."""
  _, n, _, _ = q.shape
  mask = valid_attn_mask(n, lengths, num_targets, contextual_len, max_attn_len, causal)
  return masked_attention(q, k, v, mask, bias=bias, alpha=alpha,
                          scale_len=n if scale_len is None else scale_len)


def masked_attention(q, k, v, mask, *, bias=None, alpha: float = 1.0, scale_len: int) -> jax.Array:
  """HSTU attention of queries `[B, R, H, dqk]` over keys and values `[B, N, H, d]` under an
  explicit `[B, R, N]` mask (and bias `[B, R, N]` or `[B, H, R, N]`)."""
  acc = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=acc) * alpha
  if bias is not None:
    bias = bias.astype(acc)
    logits = logits + (bias[:, None] if bias.ndim == 3 else bias)
  weights = jnp.where(mask[:, None], jax.nn.silu(logits) / scale_len, 0.0)
  out = jnp.einsum("bhij,bjhd->bihd", weights.astype(v.dtype), v, preferred_element_type=acc)
  return out.astype(v.dtype)


def hstu_cached_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    cache_lengths: jax.Array,
    k_self: jax.Array,
    v_self: jax.Array,
    *,
    bias_cache: jax.Array | None = None,
    bias_self: jax.Array | None = None,
    max_attn_len: int = 0,
    alpha: float = 1.0,
    scale_len: int,
) -> jax.Array:
  """Targets against a cached history: row m sees the `cache_lengths[b]` cached keys and itself.

  q, k_self: `[B, M, H, dqk]`; v_self: `[B, M, H, dv]`; k_cache, v_cache: `[B, N, H, d]`;
  bias_cache: `[B, M, N]`; bias_self: `[B, M]`. Equals the rows of the full op with
  `num_targets` (targets share the id right after the history) for the same inputs.
  """
  acc = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bmhd,bnhd->bhmn", q, k_cache, preferred_element_type=acc) * alpha
  if bias_cache is not None:
    logits = logits + bias_cache.astype(acc)[:, None]
  n = k_cache.shape[1]
  j = jnp.arange(n)[None, :]
  h = jnp.asarray(cache_lengths, jnp.int32)[:, None]
  valid = j < h
  if max_attn_len > 0:
    valid = valid & (h - j <= max_attn_len)
  w = jnp.where(valid[:, None, None, :], jax.nn.silu(logits) / scale_len, 0.0)
  out = jnp.einsum("bhmn,bnhd->bmhd", w.astype(v_cache.dtype), v_cache, preferred_element_type=acc)
  self_logit = jnp.einsum("bmhd,bmhd->bmh", q, k_self, preferred_element_type=acc) * alpha
  if bias_self is not None:
    self_logit = self_logit + bias_self.astype(acc)[:, :, None]
  out = out + (jax.nn.silu(self_logit) / scale_len)[..., None] * v_self.astype(acc)
  return out.astype(v_self.dtype)
