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
  Ties are broken by item id (a tied item with a smaller id ranks first). A NaN score counts
  as -inf, and a NaN target ranks behind every other item: last, never first.
  """
  nan_target = jnp.isnan(jnp.take_along_axis(scores, targets[:, None], axis=1))
  scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  b, v = scores.shape
  ids = jnp.arange(v)[None, :]
  excluded = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], seen].set(True)
  excluded = (excluded & (ids != targets[:, None])) | (ids == 0) | (ids > num_items)
  t = jnp.take_along_axis(scores, targets[:, None], axis=1)
  ahead = (scores > t) | ((scores == t) & (ids < targets[:, None]))
  ahead = jnp.where(nan_target, ids != targets[:, None], ahead)
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


def normalized_entropy(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
  """Mean log loss divided by the entropy of the base rate (lower is better; 1 = base rate)."""
  p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
  y = np.asarray(labels, np.float64)
  logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
  base = np.clip(y.mean(), eps, 1 - eps)
  return float(logloss / -(base * np.log(base) + (1 - base) * np.log(1 - base)))


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
  """ROC AUC by the rank statistic, ties counted half; nan when one class is missing."""
  y = np.asarray(labels).astype(bool)
  pos, neg = y.sum(), (~y).sum()
  if pos == 0 or neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(np.asarray(probs), return_inverse=True, return_counts=True)
  ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average 1-based ranks
  return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def ne_mean(m: dict[str, float]) -> float:
  """Mean of the `ne/...` entries of a metrics dict."""
  return float(np.mean([v for k, v in m.items() if k.startswith("ne/")]))


def widen(values: np.ndarray, tasks: np.ndarray, num_tasks: int) -> np.ndarray:
  """`[M, len(tasks)]` columns of one surface's tasks placed in a zero `[M, num_tasks]` array."""
  out = np.zeros((len(values), num_tasks), values.dtype)
  out[:, tasks] = values
  return out


def surface_task_metrics(probs, labels, valid, surfaces, spec, tasks=None) -> dict[str, float]:
  """`ne/<surface>/<task>`, `auc/...`, `calibration/...` (mean prediction / observed rate) and
  `count/...` for every (surface, task) pair with valid samples. Arrays are `[M, num_tasks]`
  with `surfaces [M]`; `tasks` (bool `[num_tasks]`) restricts the tasks reported."""
  out = {}
  for s, sname in enumerate(spec.surfaces):
    for t, tname in enumerate(spec.tasks):
      if (tasks is not None and not tasks[t]) or not spec.valid[s, t]:
        continue
      m = (surfaces == s) & valid[:, t]
      if m.sum() == 0:
        continue
      p, y = probs[m, t], labels[m, t]
      key = f"{sname}/{tname}"
      out[f"ne/{key}"] = normalized_entropy(p, y)
      out[f"auc/{key}"] = auc(p, y)
      out[f"calibration/{key}"] = float(p.mean() / max(y.mean(), 1e-7))
      out[f"count/{key}"] = int(m.sum())
  return out
