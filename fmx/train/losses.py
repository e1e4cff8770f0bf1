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


def sampled_softmax(query: jax.Array, pos: jax.Array, neg: jax.Array, pos_ids: jax.Array,
                    neg_ids: jax.Array, weights: jax.Array, temperature: float,
                    normalizer: float | None = None) -> jax.Array:
  """Weighted sum of `-log softmax([q.p, q.n_1..q.n_K] / T)[0]` over positions, divided by
  `normalizer` (default: the sum of weights, i.e. the weighted mean).

  Args:
    query, pos: `[B, N, d]` (L2-normalised by the caller); pos_ids, weights: `[B, N]`.
    neg: `[B, N, K, d]`, `[B, K, d]` or `[K, d]` with matching `neg_ids` `[B, N, K]`, `[B, K]`
      or `[K]`. A negative equal to the positive (an accidental hit) is excluded.
  """
  pos_logit = jnp.sum(query * pos, axis=-1) / temperature  # [B, N]
  if neg.ndim == 4:
    neg_logit, nid = jnp.einsum("bnd,bnkd->bnk", query, neg), neg_ids
  elif neg.ndim == 3:
    neg_logit, nid = jnp.einsum("bnd,bkd->bnk", query, neg), neg_ids[:, None, :]
  else:
    neg_logit, nid = jnp.einsum("bnd,kd->bnk", query, neg), neg_ids[None, None, :]
  neg_logit = jnp.where(nid == pos_ids[..., None], -1e9, neg_logit / temperature)
  logits = jnp.concatenate([pos_logit[..., None], neg_logit], axis=-1)
  loss = jax.nn.logsumexp(logits, axis=-1) - pos_logit
  total = jnp.sum(weights) if normalizer is None else normalizer
  return jnp.sum(loss * weights) / jnp.maximum(total, 1.0)


def mtml_bce(logits: jax.Array, labels: jax.Array, valid: jax.Array, weights: jax.Array):
  """`L = sum_t w_t * mean_{valid samples} BCE_t` (main tasks and auxiliary tasks alike).

  logits, labels, valid: `[..., num_tasks]`; weights `[num_tasks]` (0 drops a task). A sample
  where a task is invalid contributes exactly zero loss and zero gradient to it. Returns
  (loss, per-task mean BCE `[num_tasks]`).
  """
  valid = valid.astype(jnp.float32)
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
