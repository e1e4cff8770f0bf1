"""The expert tier: per-task scores of a surface's expert on the FM tier's TAEs and the
candidates' own features, and the surface's value model (a weighted sum of task scores).

The requests of one surface and expert version are scored together, the M-FALCON way: their
short-term events are encoded once (`Expert.encode_events`, padded to `batch_buckets`
requests) and their candidates are scored against that cache in micro-batches of
`micro_batch` (`Expert.score`). Each (expert model, batch bucket) compiles once, at warm-up.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from fmx.models.foundation import probabilities
from fmx.serving.fm_tier import bucket
from fmx.serving.versions import ExpertVersion, FMVersion


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

  def __init__(self, items: dict, spec, *, batch_buckets, micro_batch: int, weights: dict):
    self.items, self.spec = items, spec
    self.batch_buckets, self.micro_batch = tuple(sorted(batch_buckets)), micro_batch
    self.weights = value_weights(spec, weights)
    self.tasks = {name: [spec.tasks[t] for t in np.flatnonzero(spec.valid[s])]
                  for s, name in enumerate(spec.surfaces)}
    self._fns: dict = {}

  def _compiled(self, model):
    """(encode, score) of `model`, jitted once per distinct expert architecture."""
    if model not in self._fns:
      items = self.items
      self._fns[model] = (
          jax.jit(lambda p, ev: model.apply({"params": p}, ev, method="encode_events")),
          jax.jit(lambda p, b, kv, table: probabilities(model.apply(
              {"params": p}, b, kv, items, table, method="score"))))
    return self._fns[model]

  def compilations(self) -> int:
    return sum(f._cache_size() for fs in self._fns.values() for f in fs)  # pylint: disable=protected-access

  def warm(self, fm: FMVersion, experts: dict[str, ExpertVersion]) -> None:
    empty = {f: np.zeros(0, np.int64) for f in ("ids", "actions", "timestamps")}
    d, c = fm.table.shape[1], self.items["content"].shape[1]
    for name, ev in experts.items():
      for b in self.batch_buckets:
        req = ExpertRequest(name, empty, 0, np.ones(1, np.int32), np.zeros((1, c), np.float32),
                            np.zeros((1, d), np.float32), np.zeros(d, np.float32))
        self._score(fm, ev, [req] * b)

  def run(self, fm: FMVersion, experts: dict[str, ExpertVersion],
          requests: list[ExpertRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(per-task probabilities `[M, tasks]`, value scores `[M]`) per request, in order."""
    out = [None] * len(requests)
    by_surface: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      by_surface.setdefault(r.surface, []).append(i)
    big = self.batch_buckets[-1]
    for surface, members in by_surface.items():
      for start in range(0, len(members), big):
        chunk = members[start:start + big]
        for j, p in zip(chunk, self._score(fm, experts[surface], [requests[j] for j in chunk])):
          out[j] = (p, p @ self.weights[surface])
    return out

  def _score(self, fm, ev: ExpertVersion, reqs: list[ExpertRequest]) -> list[np.ndarray]:
    encode, score = self._compiled(ev.model)
    b, t, mb = bucket(len(reqs), self.batch_buckets), ev.short_len, self.micro_batch
    d, c = fm.table.shape[1], self.items["content"].shape[1]
    events = {"ids": np.zeros((b, t), np.int32), "actions": np.zeros((b, t), np.int32),
              "timestamps": np.zeros((b, t), np.int32), "lengths": np.zeros(b, np.int32),
              "request_time": np.zeros(b, np.int32)}
    for i, r in enumerate(reqs):
      k = min(len(r.short["ids"]), t)
      for f in ("ids", "actions", "timestamps"):
        events[f][i, :k] = np.asarray(r.short[f])[len(r.short[f]) - k:]
      events["lengths"][i], events["request_time"][i] = k, r.request_time
    kv = encode(ev.params, events)
    ue = np.zeros((b, d), np.float32)
    ue[:len(reqs)] = [r.ue for r in reqs]
    table = fm.table if ev.uses_table else None
    probs = []
    for part in range(max(math.ceil(len(r.cand_ids) / mb) for r in reqs)):
      cand = {**events, "cand": np.zeros((b, mb), np.int32), "tae": np.zeros((b, mb, d), np.float32),
              "ue": ue, "content": np.zeros((b, mb, c), np.float32)}
      for i, r in enumerate(reqs):
        sl = slice(part * mb, (part + 1) * mb)
        m = len(r.cand_ids[sl])
        cand["cand"][i, :m], cand["tae"][i, :m], cand["content"][i, :m] = (
            r.cand_ids[sl], r.tae[sl], r.content[sl])
      probs.append(np.asarray(score(ev.params, cand, kv, table)))
    probs = np.concatenate(probs, 1)
    return [probs[i, :len(r.cand_ids)] for i, r in enumerate(reqs)]
