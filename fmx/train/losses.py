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
    neg_logit, nid = gathered_logits(query, table, neg_ids), neg_ids
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
def gathered_logits(query: jax.Array, table: jax.Array, ids: jax.Array) -> jax.Array:
  """`out[..., k] = query[...] . table[ids[..., k]]` (query `[..., d]`, ids `[..., K]`).

  Equal to gathering `table[ids]` and taking dot products, without the `[..., K, d]` gathered
  copy (655 MB for ML-1M's official per-position negatives) and its scatter-add gradient, both
  memory-bound. Chunks of query rows are scored against the whole table by a matmul and the
  sampled columns picked from the block; the backward pass scatters the logits' gradient into
  the block and returns to the query and the table with two matmuls.
  """
  return _gathered_logits_fwd(query, table, ids)[0]


def _chunks(x, rows: int):
  """`[P, ...]` -> `[P / rows, rows, ...]`, zero-padded."""
  pad = -x.shape[0] % rows
  x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x
  return x.reshape((-1, rows) + x.shape[1:])


def _gathered_logits_fwd(query, table, ids):
  lead, d, k = query.shape[:-1], query.shape[-1], ids.shape[-1]
  q, i = query.reshape(-1, d), ids.reshape(-1, k)
  pick = lambda qi: jnp.take_along_axis(qi[0] @ table.T, qi[1], axis=1)
  out = jax.lax.map(pick, (_chunks(q, _LOGIT_ROWS), _chunks(i, _LOGIT_ROWS)))
  return out.reshape(-1, k)[: q.shape[0]].reshape(lead + (k,)), (query, table, ids)


def _gathered_logits_bwd(residuals, g):
  query, table, ids = residuals
  d, k = query.shape[-1], ids.shape[-1]
  q, i, gk = query.reshape(-1, d), ids.reshape(-1, k), g.reshape(-1, k)
  rows = jnp.arange(_LOGIT_ROWS)[:, None]

  def chunk(dtable, qig):
    qc, ic, gc = qig
    dense = jnp.zeros((_LOGIT_ROWS, table.shape[0]), gc.dtype).at[rows, ic].add(gc)
    return dtable + dense.T @ qc, dense @ table

  dtable, dq = jax.lax.scan(chunk, jnp.zeros(table.shape, table.dtype),
                            (_chunks(q, _LOGIT_ROWS), _chunks(i, _LOGIT_ROWS),
                             _chunks(gk, _LOGIT_ROWS)))
  return dq.reshape(-1, d)[: q.shape[0]].reshape(query.shape), dtable, None


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
