"""Pure-jnp reference for jagged HSTU attention.

Layout: padded `[B, N, H, d]` tensors plus `lengths[B]` (right padding). The mask follows the
official `_get_valid_attn_mask` of meta-recsys/generative-recommenders (causal, lengths,
`num_targets`, contextual prefix, `max_attn_len`), and additionally masks every padded row and
column so that padding can never change a real position's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def valid_attn_mask(
    n: int,
    lengths: jax.Array,
    num_targets: jax.Array | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    causal: bool = True,
) -> jax.Array:
  """Boolean `[B, N, N]` mask: entry `[b, i, j]` is True when query i may attend to key j.

  Semantics (per sequence of length L with T targets and C contextual tokens):
    * every position gets an id; contextual tokens share id 0 and targets share the id of the
      first target, so targets see all history and themselves but never each other;
    * causal: i sees j when id(i) > id(j), plus the diagonal;
    * `max_attn_len > 0` limits how far back (in ids) a query looks;
    * contextual rows see every non-target position (a bidirectional prefix);
    * rows and columns at positions >= L are masked.
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  ids = jnp.arange(n, dtype=jnp.int32)[None, :]  # [1, N]
  max_ids = lengths[:, None]  # [B, 1]
  if contextual_len > 0:
    ids = jnp.maximum(ids - contextual_len + 1, 0)
    max_ids = max_ids - contextual_len + 1
  if num_targets is not None:
    max_ids = max_ids - jnp.asarray(num_targets, jnp.int32)[:, None]
    ids = jnp.minimum(ids, max_ids)  # [B, N]
  ids = jnp.broadcast_to(ids, (lengths.shape[0], n))
  row, col = ids[:, :, None], ids[:, None, :]
  dist = row - col
  if not causal:
    dist = jnp.abs(dist)
  mask = jnp.logical_or(jnp.eye(n, dtype=bool)[None], dist > 0)
  if max_attn_len > 0:
    mask = jnp.logical_and(mask, dist <= max_attn_len)
  if contextual_len > 0:
    mask = jnp.logical_or(mask, jnp.logical_and(row == 0, col < max_ids[:, :, None]))
  pos = jnp.arange(n, dtype=jnp.int32)
  real = pos[None, :] < lengths[:, None]  # [B, N]
  return mask & real[:, :, None] & real[:, None, :]


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
  scale_len = n if scale_len is None else scale_len
  acc = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=acc) * alpha
  if bias is not None:
    bias = bias.astype(acc)
    logits = logits + (bias[:, None] if bias.ndim == 3 else bias)
  mask = valid_attn_mask(n, lengths, num_targets, contextual_len, max_attn_len, causal)
  weights = jnp.where(mask[:, None], jax.nn.silu(logits) / scale_len, 0.0)
  out = jnp.einsum("bhij,bjhd->bihd", weights.astype(v.dtype), v, preferred_element_type=acc)
  return out.astype(v.dtype)
