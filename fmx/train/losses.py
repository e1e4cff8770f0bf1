"""Losses: sampled softmax over uniform negatives (retrieval) and the masked MTML BCE (ranking)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NEGATIVE_SHARING = ("per_position", "per_sequence", "per_batch")


def negative_shape(sharing: str, batch: int, length: int, k: int) -> tuple[int, ...]:
  """Shape of the sampled negative ids: one set per position, per sequence or per batch."""
  shapes = {"per_position": (batch, length, k), "per_sequence": (batch, k), "per_batch": (k,)}
  if sharing not in shapes:
    raise ValueError(f"loss.negatives={sharing!r}: expected one of {NEGATIVE_SHARING}")
  return shapes[sharing]


def sampled_softmax(query: jax.Array, table: jax.Array, pos_ids: jax.Array, neg_ids: jax.Array,
                    weights: jax.Array, temperature: float,
                    normalizer: float | None = None) -> jax.Array:
  """Weighted sum of `-log softmax([q.p, q.n_1..q.n_K] / T)[0]` over positions, divided by
  `normalizer` (default: the sum of weights, i.e. the weighted mean).

  Args:
    query: `[B, N, d]` and table `[V, d]`, both L2-normalised by the caller; pos_ids, weights:
      `[B, N]`.
    neg_ids: `[B, N, K]` (per position), `[B, K]` (per sequence) or `[K]` (per batch) rows of
      `table`. A negative equal to the positive (an accidental hit) is excluded.
  """
  query, table = query.astype(jnp.float32), table.astype(jnp.float32)  # f32 whatever computed them
  pos_logit = jnp.sum(query * jnp.take(table, pos_ids, axis=0), axis=-1) / temperature  # [B, N]
  if neg_ids.ndim == 3:
    neg_logit, nid = gathered_logits(query, table, neg_ids, weights > 0), neg_ids
  elif neg_ids.ndim == 2:
    neg_logit = jnp.einsum("bnd,bkd->bnk", query, jnp.take(table, neg_ids, axis=0))
    nid = neg_ids[:, None, :]
  else:
    neg_logit = jnp.einsum("bnd,kd->bnk", query, jnp.take(table, neg_ids, axis=0))
    nid = neg_ids[None, None, :]
  neg_logit = jnp.where(nid == pos_ids[..., None], -1e9, neg_logit / temperature)
  logits = jnp.concatenate([pos_logit[..., None], neg_logit], axis=-1)
  loss = jax.nn.logsumexp(logits, axis=-1) - pos_logit
  total = jnp.sum(weights) if normalizer is None else normalizer
  return jnp.sum(loss * weights) / jnp.maximum(total, 1.0)


_LOGIT_ROWS = 256  # query rows per chunk of `gathered_logits`: a [256, V] block stays in cache


@jax.custom_vjp
def gathered_logits(query: jax.Array, table: jax.Array, ids: jax.Array,
                    keep: jax.Array) -> jax.Array:
  """`out[..., k] = query[...] . table[ids[..., k]]` where `keep[...]`, else 0 (query `[..., d]`,
  ids `[..., K]`, keep `[...]` bool). Rows not kept are neither computed nor given a gradient:
  pass the positions whose loss weight is zero (padding).

  Equal to gathering `table[ids]` and taking dot products, without the `[..., K, d]` gathered
  copy (655 MB for ML-1M's official per-position negatives) and its scatter-add gradient, both
  memory-bound. The kept rows are moved to the front; chunks of them are scored against the
  whole table by a matmul and the sampled columns picked from the block, in a loop that stops
  after the last kept row. The backward pass scatters the logits' gradient into the block and
  returns to the query and the table with two matmuls.
  """
  return _gathered_logits_fwd(query, table, ids, keep)[0]


def _kept_first(keep):
  """(order, inverse, chunks): the rows' order with kept rows first (stable), its inverse, and
  the number of `_LOGIT_ROWS` chunks that hold every kept row."""
  keep = keep.reshape(-1)
  order = jnp.argsort(~keep, stable=True)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  chunks = (jnp.sum(keep, dtype=jnp.int32) + _LOGIT_ROWS - 1) // _LOGIT_ROWS
  return order, inverse, chunks


def _rows(x, order):
  """`x[order]` flattened to `[P, last]`, zero-padded to whole `_LOGIT_ROWS` chunks."""
  x = x.reshape(-1, x.shape[-1])[order]
  return jnp.pad(x, ((0, -x.shape[0] % _LOGIT_ROWS), (0, 0)))


def _chunk(x, c):
  return jax.lax.dynamic_slice_in_dim(x, c * _LOGIT_ROWS, _LOGIT_ROWS)


def _gathered_logits_fwd(query, table, ids, keep):
  order, inverse, chunks = _kept_first(keep)
  q, i = _rows(query, order), _rows(ids, order)

  def body(c, out):
    block = jnp.take_along_axis(_chunk(q, c) @ table.T, _chunk(i, c), axis=1)
    return jax.lax.dynamic_update_slice_in_dim(out, block, c * _LOGIT_ROWS, 0)

  out = jax.lax.fori_loop(0, chunks, body, jnp.zeros(i.shape, jnp.result_type(query, table)))
  out = jnp.where(keep[..., None], out[inverse].reshape(ids.shape), 0.0)  # rows not kept
  return out, (q, i, table, keep, order, inverse, chunks)


def _gathered_logits_bwd(residuals, g):
  q, i, table, keep, order, inverse, chunks = residuals
  g = jnp.where(keep[..., None], g, 0.0)  # a partial last chunk holds rows not kept
  gk = _rows(g, order)
  rows = jnp.arange(_LOGIT_ROWS)[:, None]

  def body(c, carry):
    dtable, dq = carry
    dense = jnp.zeros((_LOGIT_ROWS, table.shape[0]), g.dtype).at[rows, _chunk(i, c)].add(
        _chunk(gk, c))
    dq = jax.lax.dynamic_update_slice_in_dim(dq, dense @ table, c * _LOGIT_ROWS, 0)
    return dtable + dense.T @ _chunk(q, c), dq

  dtable, dq = jax.lax.fori_loop(0, chunks, body, (jnp.zeros_like(table), jnp.zeros_like(q)))
  dq = dq[inverse].reshape(keep.shape + q.shape[-1:])  # rows not kept: zero (g was)
  return dq.astype(q.dtype), dtable.astype(table.dtype), None, None


gathered_logits.defvjp(_gathered_logits_fwd, _gathered_logits_bwd)


def mtml_bce(logits: jax.Array, labels: jax.Array, valid: jax.Array, weights: jax.Array):
  """`L = sum_t w_t * mean_{valid samples} BCE_t` (main tasks and auxiliary tasks alike).

  logits, labels, valid: `[..., num_tasks]`; weights `[num_tasks]` (0 drops a task). A sample
  where a task is invalid contributes exactly zero loss and zero gradient to it. Returns
  (loss, per-task mean BCE `[num_tasks]`).
  """
  valid, logits = valid.astype(jnp.float32), logits.astype(jnp.float32)
  safe = jnp.where(valid > 0, logits, 0.0)  # no gradient path through invalid entries
  bce = optax.sigmoid_binary_cross_entropy(safe, labels.astype(jnp.float32)) * valid
  axes = tuple(range(logits.ndim - 1))
  per_task = jnp.sum(bce, axis=axes) / jnp.maximum(jnp.sum(valid, axis=axes), 1.0)
  return jnp.sum(weights * per_task), per_task


def distilled_bce(logits, labels, valid, weights, soft_targets, soft_mask, soft_weight: float):
  """Real-time knowledge distillation: `mtml_bce` on the labels plus `soft_weight` times the
  same BCE against a teacher's probabilities `soft_targets` on the tasks of `soft_mask`
  (`[num_tasks]` bool: the tasks the teacher knows). Returns (loss, per-task label BCE,
  distillation BCE)."""
  loss, per_task = mtml_bce(logits, labels, valid, weights)
  kd, _ = mtml_bce(logits, soft_targets, jnp.broadcast_to(soft_mask, logits.shape), weights)
  return loss + soft_weight * kd, per_task, kd
