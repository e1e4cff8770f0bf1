"""The expert tier: per-task scores of a surface's expert on the FM tier's TAEs and the
candidates' own features, and the surface's value model (a weighted sum of task scores).

Rows of all requests on one surface and expert version go through the expert in one call,
padded to `row_buckets`; each (surface, expert model, bucket) compiles once, at warm-up.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fmx.models.foundation import probabilities
from fmx.serving.versions import ExpertVersion, FMVersion, dummy_rows


@dataclasses.dataclass
class ExpertRequest:
  surface: str
  short: dict[str, np.ndarray]  # ids, actions, timestamps: the surface's last events, unpadded
  request_time: int
  cand_ids: np.ndarray  # [M]
  content: np.ndarray  # [M, C]: the candidates' content features
  tae: np.ndarray  # [M, d_fm]
  ue: np.ndarray  # [d_fm]


def value_weights(spec, weights: dict) -> dict[str, np.ndarray]:
  """{surface: weights over its tasks} from {task: weight} (tasks not named weigh 0)."""
  unknown = set(weights) - set(spec.tasks)
  if unknown:
    raise ValueError(f"serve.value_weights names tasks {sorted(unknown)} that the data lacks: "
                     f"expected some of {list(spec.tasks)}")
  out = {}
  for s, name in enumerate(spec.surfaces):
    tasks = [spec.tasks[t] for t in np.flatnonzero(spec.valid[s])]
    w = np.array([float(weights.get(t, 0.0)) for t in tasks], np.float32)
    if not w.any():
      raise ValueError(f"serve.value_weights weighs none of surface {name}'s tasks {tasks}")
    out[name] = w
  return out


class ExpertTier:
  """Scores requests with the experts of a `Served`; `items` is the expert's item table."""

  def __init__(self, items: dict, spec, row_buckets, weights: dict):
    self.items, self.spec = items, spec
    self.row_buckets = tuple(sorted(row_buckets))
    self.weights = value_weights(spec, weights)
    self.tasks = {name: [spec.tasks[t] for t in np.flatnonzero(spec.valid[s])]
                  for s, name in enumerate(spec.surfaces)}
    self._fns: dict = {}

  def _fn(self, model):
    if model not in self._fns:
      items = self.items
      self._fns[model] = jax.jit(lambda p, b, table: probabilities(
          model.apply({"params": p}, b, items, fm_table=table)))
    return self._fns[model]

  def compilations(self) -> int:
    return sum(f._cache_size() for f in self._fns.values())  # pylint: disable=protected-access

  def warm(self, fm: FMVersion, experts: dict[str, ExpertVersion]) -> None:
    d = fm.table.shape[1]
    for ev in experts.values():
      for n in self.row_buckets:
        rows = {k: np.asarray(v) for k, v in dummy_rows(n, ev.short_len, d).items()}
        rows["content"] = np.zeros((n, self.items["content"].shape[1]), np.float32)
        jax.block_until_ready(self._fn(ev.model)(ev.params, rows,
                                                 fm.table if ev.uses_table else None))

  def run(self, fm: FMVersion, experts: dict[str, ExpertVersion],
          requests: list[ExpertRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(per-task probabilities `[M, tasks]`, value scores `[M]`) per request, in order."""
    out = [None] * len(requests)
    by_surface: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      by_surface.setdefault(r.surface, []).append(i)
    big = self.row_buckets[-1]
    for surface, members in by_surface.items():
      ev = experts[surface]
      chunk, rows = [], 0
      for i in members + [None]:  # requests in chunks of at most the largest bucket's rows
        m = 0 if i is None else len(requests[i].cand_ids)
        if chunk and (i is None or rows + m > big):
          probs = self._score(fm, ev, [requests[j] for j in chunk])
          for j, p in zip(chunk, probs):
            out[j] = (p, p @ self.weights[surface])
          chunk, rows = [], 0
        if i is not None:
          chunk, rows = chunk + [i], rows + m
    return out

  def _score(self, fm, ev: ExpertVersion, reqs: list[ExpertRequest]) -> list[np.ndarray]:
    sizes = [len(r.cand_ids) for r in reqs]
    n = sum(sizes)
    b = next(s for s in self.row_buckets if s >= n)
    t = ev.short_len
    rows = {"ids": np.zeros((b, t), np.int32), "actions": np.zeros((b, t), np.int32),
            "timestamps": np.zeros((b, t), np.int32), "lengths": np.zeros(b, np.int32),
            "cand": np.zeros(b, np.int32), "request_time": np.zeros(b, np.int32),
            "tae": np.zeros((b, fm.table.shape[1]), np.float32),
            "ue": np.zeros((b, fm.table.shape[1]), np.float32),
            "content": np.zeros((b, self.items["content"].shape[1]), np.float32)}
    at = 0
    for r, m in zip(reqs, sizes):
      k = min(len(r.short["ids"]), t)
      sl = slice(at, at + m)
      for f in ("ids", "actions", "timestamps"):
        rows[f][sl, :k] = np.asarray(r.short[f])[len(r.short[f]) - k:]
      rows["lengths"][sl], rows["request_time"][sl] = k, r.request_time
      rows["cand"][sl], rows["tae"][sl], rows["ue"][sl] = r.cand_ids, r.tae, r.ue
      rows["content"][sl] = r.content
      at += m
    probs = np.asarray(self._fn(ev.model)(ev.params, rows, fm.table if ev.uses_table else None))
    return np.split(probs[:n], np.cumsum(sizes)[:-1])
