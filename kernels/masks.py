"""The HSTU attention mask, written once for whole matrices, tiles and block-skipping decisions.

The element rule follows the official `_get_valid_attn_mask` (meta-recsys/generative-
recommenders) and additionally masks padding: every position gets an id; contextual tokens
share id 0, targets share the id of the first target; query i sees key j when
`id(i) > id(j)` (causal) or `id(i) != id(j)` (bidirectional), or `i == j`; `max_attn_len`
bounds `id(i) - id(j)`; contextual rows see every non-target; positions >= length see and are
seen by nothing.
"""

from __future__ import annotations

import jax.numpy as jnp


def element_mask(rows, cols, length, num_targets, *, contextual_len: int = 0,
                 max_attn_len: int = 0, causal: bool = True):
  """Mask for broadcastable integer position arrays `rows`, `cols` and per-sequence scalars."""
  max_ids = length - num_targets
  row_ids, col_ids = rows, cols
  if contextual_len > 0:
    row_ids = jnp.maximum(rows - contextual_len + 1, 0)
    col_ids = jnp.maximum(cols - contextual_len + 1, 0)
    max_ids = max_ids - contextual_len + 1
  row_ids = jnp.minimum(row_ids, max_ids)
  col_ids = jnp.minimum(col_ids, max_ids)
  dist = row_ids - col_ids
  if not causal:
    dist = jnp.abs(dist)
  valid = (rows == cols) | (dist > 0)
  if max_attn_len > 0:
    valid = valid & (dist <= max_attn_len)
  if contextual_len > 0:
    valid = valid | ((row_ids == 0) & (col_ids < max_ids))
  return valid & (rows < length) & (cols < length)


def block_needed(q0, k0, block_q: int, block_k: int, length, num_targets, *,
                 contextual_len: int = 0, max_attn_len: int = 0, causal: bool = True):
  """Whether the tile of rows [q0, q0+block_q) x cols [k0, k0+block_k) has any valid entry.

  Exact for causal masks without a contextual prefix (tiles past the length, above the
  diagonal, or between distinct targets are skipped); otherwise conservative (only tiles past
  the length are skipped). Works on Python ints, NumPy arrays and traced scalars alike.
  """
  q1, k1 = q0 + block_q, k0 + block_k
  last_row = jnp.minimum(q1, length) - 1
  real = (q0 < length) & (k0 < length)
  if contextual_len > 0 or not causal:
    return real
  hist = length - num_targets
  diagonal = jnp.maximum(q0, k0) <= jnp.minimum(last_row, k1 - 1)
  earlier = k0 < jnp.minimum(last_row, hist)  # some key j < id(i) for a row i of the tile
  if max_attn_len > 0:
    earlier = earlier & (jnp.minimum(q0, hist) - (k1 - 1) <= max_attn_len)
  return real & (diagonal | earlier)


def kv_block_limit(q0, block_q: int, block_k: int, length, *, contextual_len: int = 0,
                   causal: bool = True):
  """Number of leading key tiles a query tile may need (the loop bound before `block_needed`)."""
  end = length if (contextual_len > 0 or not causal) else jnp.minimum(q0 + block_q, length)
  return jnp.maximum((end + block_k - 1) // block_k, 0)
