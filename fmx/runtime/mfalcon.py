"""M-FALCON request encoding: one user's history is encoded once per request and candidates are
scored in micro-batches against its per-layer key/value cache (`FoundationModel.encode_history`
and `extend`)."""

from __future__ import annotations

import jax
import numpy as np

from fmx.models.foundation import FoundationModel, probabilities


def history_inputs(ids, surfaces, actions, timestamps, request_time, max_len: int) -> dict:
  """One user's history (1-D arrays, chronological) as a `[1, H]` batch for `encode_history`:
  the most recent `max_len` events, query times = next event's time (the request for the last)."""
  ids, surfaces, actions, timestamps = (np.asarray(a)[-max_len:] for a in (ids, surfaces, actions, timestamps))
  h = len(ids)
  pad = lambda a: np.pad(a, (0, max_len - h))[None]
  query = np.append(timestamps[1:], request_time)
  return {"ids": pad(ids).astype(np.int32), "surfaces": pad(surfaces).astype(np.int32),
          "actions": pad(actions).astype(np.int32), "timestamps": pad(timestamps).astype(np.int64),
          "query_times": pad(query).astype(np.int64), "lengths": np.array([h], np.int32),
          "request_time": np.array([request_time], np.int64)}


class MFalcon:
  """Request-level inference (M-FALCON): the history is encoded once per request and candidates
  are scored in micro-batches of `micro_batch` (the last one padded) against its k/v cache.
  Holds only the jitted pure functions; `params` are passed to every call."""

  def __init__(self, model: FoundationModel, items: dict, micro_batch: int = 256):
    self.items, self.micro_batch = items, micro_batch
    self._encode = jax.jit(lambda p, h, it: model.apply({"params": p}, h, it, method="encode_history"))
    self._extend = jax.jit(lambda p, h, c, cd, it: model.apply({"params": p}, h, c, cd, it,
                                                               method="extend"))

  def target_aware_embeddings(self, params, history: dict, candidates: dict) -> np.ndarray:
    """`[num_candidates, d]` TAEs; `history` from `history_inputs`, candidates: ids, surfaces."""
    return self._score(params, history, candidates)[0]

  def predict(self, params, history: dict, candidates: dict) -> np.ndarray:
    """`[num_candidates, num_tasks]` task probabilities."""
    return np.asarray(probabilities(self._score(params, history, candidates)[1]))

  def user_embedding(self, params, history: dict) -> np.ndarray:
    """`[d]`: the output at the last history position (the non-target-aware baseline)."""
    out, _ = self._encode(params, history, self.items)
    return np.asarray(out[0, int(history["lengths"][0]) - 1])

  def _score(self, params, history, candidates):
    _, cache = self._encode(params, history, self.items)
    m, mb = len(candidates["ids"]), self.micro_batch
    taes, logits = [], []
    for start in range(0, m, mb):
      chunk = {k: np.asarray(v)[start:start + mb] for k, v in candidates.items()}
      size = len(chunk["ids"])
      chunk = {k: np.pad(v, (0, mb - size))[None] for k, v in chunk.items()}
      t, l = self._extend(params, history, cache, chunk, self.items)
      taes.append(np.asarray(t[0, :size]))
      logits.append(np.asarray(l[0, :size]))
    return np.concatenate(taes), np.concatenate(logits)
