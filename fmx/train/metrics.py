"""Full-ranking retrieval metrics: target rank among all items, excluding the user's history."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def target_ranks(scores: jax.Array, targets: jax.Array, seen: jax.Array, num_items: int) -> jax.Array:
  """0-based rank of every target among items 1..num_items, history excluded.

  Args:
    scores: `[B, V]` with `V >= num_items + 1` (column 0 and columns > num_items are ignored).
    targets: `[B]` item ids. seen: `[B, S]` previously consumed item ids (0 = padding); they
      are excluded, except the target itself should it repeat an earlier item.
  Ties are broken by item id (a tied item with a smaller id ranks first).
  """
  b, v = scores.shape
  ids = jnp.arange(v)[None, :]
  excluded = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], seen].set(True)
  excluded = (excluded & (ids != targets[:, None])) | (ids == 0) | (ids > num_items)
  t = jnp.take_along_axis(scores, targets[:, None], axis=1)
  ahead = (scores > t) | ((scores == t) & (ids < targets[:, None]))
  return jnp.sum(ahead & ~excluded, axis=1)


def ranking_metrics(ranks: np.ndarray, ks=(10, 50, 200)) -> dict[str, float]:
  """HR@K, NDCG@K (one relevant item) and MRR from 0-based ranks."""
  ranks = np.asarray(ranks, np.float64)
  out = {}
  for k in ks:
    hit = ranks < k
    out[f"hr@{k}"] = float(hit.mean())
    out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
  out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
  return out
