"""Ranking windows for the foundation model: a user's history followed by candidate impressions.

Per user, chronologically: the last `T` events are the test impressions, the `T` before them
the validation impressions, and everything earlier is the training region. A training example
cuts the training region at a seeded random point c: candidates are events [c, c + T) (within
the region) and the history is the `H` events before c. Every example uses only events before
its impressions. Sequences are laid out as [history, candidates, padding] with N = H + T.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from fmx.data.cross_surface import CrossSurfaceData

SPLITS = ("train", "valid", "test")


def region(n: int, split: str, num_candidates: int) -> tuple[int, int]:
  """[start, end) of the impressions of `split` (for "train": the whole training region)."""
  t = num_candidates
  return {"test": (n - t, n), "valid": (n - 2 * t, n - t), "train": (0, n - 2 * t)}[split]


def example(data: CrossSurfaceData, user: int, cut: int, end: int, max_history: int,
            num_candidates: int) -> dict[str, np.ndarray]:
  """History = events [cut - H, cut), candidates = events [cut, min(end, cut + T))."""
  H, T = max_history, num_candidates
  n = H + T
  ids, ts = data.item_ids[user], data.timestamps[user]
  h0 = max(0, cut - H)
  c1 = min(end, cut + T)
  h, t = cut - h0, c1 - cut
  request = ts[cut]
  surfaces = data.item_surface[ids]
  out = {k: np.zeros(n, dt) for k, dt in (("ids", np.int32), ("surfaces", np.int32),
                                          ("actions", np.int32), ("timestamps", np.int64),
                                          ("query_times", np.int64), ("positions", np.int32))}
  out["ids"][:h + t] = ids[h0:c1]
  out["surfaces"][:h + t] = surfaces[h0:c1]
  out["actions"][:h] = data.actions[user][h0:cut]
  out["timestamps"][:h] = ts[h0:cut]
  out["timestamps"][h:h + t] = request  # candidates are impressions of one request
  out["query_times"][:h] = np.append(ts[h0 + 1:cut], request)
  out["query_times"][h:h + t] = request
  out["positions"][:h] = np.arange(h)
  out["positions"][h:h + t] = h  # candidates share the position after the history
  labels = np.zeros((T, data.spec.num_tasks), np.int8)
  valid = np.zeros((T, data.spec.num_tasks), bool)
  labels[:t] = data.labels[user][cut:c1]
  valid[:t] = data.spec.valid[surfaces[cut:c1]]
  out.update(lengths=np.int32(h + t), num_targets=np.int32(t),
             cand_index=np.minimum(h + np.arange(T), n - 1).astype(np.int32),
             request_time=np.int64(request), labels=labels, label_valid=valid,
             user=np.int32(user), history_end=np.int32(cut))
  return out


def empty_example(max_history, num_candidates, num_tasks):
  n = max_history + num_candidates
  z = lambda dt: np.zeros(n, dt)
  return {"ids": z(np.int32), "surfaces": z(np.int32), "actions": z(np.int32),
          "timestamps": z(np.int64), "query_times": z(np.int64), "positions": z(np.int32),
          "lengths": np.int32(0), "num_targets": np.int32(0),
          "cand_index": np.zeros(num_candidates, np.int32), "request_time": np.int64(0),
          "labels": np.zeros((num_candidates, num_tasks), np.int8),
          "label_valid": np.zeros((num_candidates, num_tasks), bool), "user": np.int32(0),
          "history_end": np.int32(0)}


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def train_batches(data: CrossSurfaceData, max_history: int, num_candidates: int, batch_size: int,
                  seed: int, num_epochs: int, windows_per_user: int = 1,
                  process_rows: slice | None = None):
  """Indexable training batches over `num_epochs` and the steps per epoch; batch `s` is a pure
  function of (seed, s), so a resumed run continues at the exact stream position.
  `process_rows` builds only those rows of each batch (one process's share)."""
  ends = np.array([region(len(s), "train", num_candidates)[1] for s in data.item_ids])
  users = np.repeat(np.flatnonzero(ends >= 2), windows_per_user)
  steps = -(-len(users) // batch_size)
  slots = np.concatenate([users, -np.ones(steps * batch_size - len(users), np.int64)])

  @functools.lru_cache(maxsize=2)
  def epoch_plan(epoch: int):
    """(slot order, one training cut per slot) of an epoch, computed once per epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(slots))
    return order, rng.integers(1, np.maximum(ends[np.maximum(slots, 0)], 2))

  def make(index: int):
    epoch, step = divmod(index, steps)
    order, cuts = epoch_plan(epoch)
    rows = []
    for i in order[step * batch_size:(step + 1) * batch_size][process_rows or slice(None)]:
      u = slots[i]
      rows.append(empty_example(max_history, num_candidates, data.spec.num_tasks) if u < 0 else
                  example(data, int(u), int(cuts[i]), int(ends[u]), max_history, num_candidates))
    return stack(rows)

  return grain.MapDataset.range(num_epochs * steps).map(make), steps


def eval_batches(data: CrossSurfaceData, split: str, max_history: int, num_candidates: int,
                 batch_size: int):
  """Every user's `split` window, in fixed-size batches (the tail padded with empty examples)."""
  rows = []
  for u, ids in enumerate(data.item_ids):
    start, end = region(len(ids), split, num_candidates)
    if start >= 1:
      rows.append(example(data, u, start, end, max_history, num_candidates))
  while len(rows) % batch_size:
    rows.append(empty_example(max_history, num_candidates, data.spec.num_tasks))
  for i in range(0, len(rows), batch_size):
    yield stack(rows[i:i + batch_size])
