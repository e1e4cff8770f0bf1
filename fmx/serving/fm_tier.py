"""The online FM tier: target-aware embeddings and FM task predictions for ranking requests, with
M-FALCON over batches of requests.

A batch of requests is grouped by padded history length (`history_buckets`); each group's
histories are encoded once, in batches padded to `batch_buckets`, and every request's
candidates are scored against its history's key/value cache in micro-batches of `micro_batch`.
Encoded histories go into the per-user `HistoryCache`: a follow-up request with the same events
reuses its encoding, one that appends events recomputes only the rows from the first changed
one on (`append_buckets` rows at a time). All shapes come from these buckets, so jit compiles
only at `warm`, never while serving.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from fmx.models.foundation import age_bucket, probabilities
from fmx.runtime.mfalcon import history_inputs
from fmx.serving.history_cache import FIELDS, Entry, HistoryCache, common_prefix


@dataclasses.dataclass
class FMRequest:
  user: str | None  # the cache key (None: not cached)
  events: dict[str, np.ndarray]  # ids, surfaces, actions, timestamps: chronological, unpadded
  request_time: int
  cand_ids: np.ndarray  # [M]
  cand_surfaces: np.ndarray  # [M]


@dataclasses.dataclass
class FMResult:
  tae: np.ndarray  # [M, d]
  probs: np.ndarray  # [M, num_tasks]
  ue: np.ndarray  # [d]: the output at the last history position
  cache: str  # "hit" | "append" | "miss" | "off"


def bucket(n: int, sizes) -> int | None:
  """The smallest of `sizes` that holds `n` (None if none does)."""
  return next((s for s in sorted(sizes) if s >= n), None)


class FMTier:
  """Compiled M-FALCON functions of one FM (`model`, `items`); versions pass their `params`."""

  def __init__(self, model, items, *, batch_buckets, history_buckets, micro_batch: int,
               append_buckets, cache_bytes: int):
    self.batch_buckets, self.history_buckets = tuple(sorted(batch_buckets)), tuple(sorted(history_buckets))
    self.micro_batch, self.append_buckets = micro_batch, tuple(sorted(append_buckets))
    self.cache = HistoryCache(cache_bytes)
    apply = lambda p, *a, **kw: model.apply({"params": p}, *a, **kw)
    self._encode = jax.jit(lambda p, h: apply(p, h, items, method="encode_history"))
    self._extend = jax.jit(lambda p, h, kv, cd: _with_probs(apply(p, h, kv, cd, items,
                                                                  method="extend")))
    self._append = jax.jit(lambda p, h, kv, start, rows: apply(
        p, h, kv, start, rows, items, method="append_history"), static_argnums=4)
    self._ages = jax.jit(age_bucket)

  def compilations(self) -> int:
    """How many shapes the tier's functions have been compiled for."""
    return sum(f._cache_size() for f in (self._encode, self._extend, self._append, self._ages))  # pylint: disable=protected-access

  # ---- warm-up --------------------------------------------------------------------------------

  def warm(self, params) -> None:
    """Compiles every shape serving can use (and runs it once)."""
    host = lambda kv: [(np.asarray(k), np.asarray(v)) for k, v in kv]  # as serving passes them
    for h in self.history_buckets:
      one = self._dummy(h)
      for b in self.batch_buckets:
        hist = {k: np.repeat(v, b, 0) for k, v in one.items()}
        kv = host(self._encode(params, hist)[1])
        cand = {"ids": np.zeros((b, self.micro_batch), np.int32),
                "surfaces": np.zeros((b, self.micro_batch), np.int32)}
        jax.block_until_ready(self._extend(params, hist, kv, cand))
      kv = host(self._encode(params, one)[1])
      for r in self.append_buckets:
        if r <= h:
          jax.block_until_ready(self._append(params, one, kv, np.zeros(1, np.int32), r))
      self._ages(np.zeros((), np.int64), np.zeros(h, np.int64)).block_until_ready()

  def _dummy(self, h: int) -> dict:
    z = np.zeros(1, np.int64)
    return history_inputs(z, z, z, z, 0, h)

  # ---- serving --------------------------------------------------------------------------------

  def run(self, params, fm_version: int, requests: list[FMRequest]) -> list[FMResult]:
    """One result per request, in order."""
    out: list[FMResult | None] = [None] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(bucket(len(r.events["ids"]), self.history_buckets), []).append(i)
    for h, members in groups.items():
      for start in range(0, len(members), self.batch_buckets[-1]):
        chunk = members[start:start + self.batch_buckets[-1]]
        results = self._run_group(params, fm_version, [requests[i] for i in chunk], h)
        for i, res in zip(chunk, results):
          out[i] = res
    return out

  def _run_group(self, params, fm_version, reqs: list[FMRequest], h: int) -> list[FMResult]:
    hists = [history_inputs(*(r.events[f] for f in FIELDS), r.request_time, h) for r in reqs]
    encoded: list[tuple[list, np.ndarray] | None] = [None] * len(reqs)
    kinds = ["off" if r.user is None or not self.cache.capacity else "miss" for r in reqs]
    for i, (r, hist) in enumerate(zip(reqs, hists)):  # reuse cached encodings
      entry = self.cache.get(r.user, fm_version)
      if entry is not None:
        reused = self._reuse(params, entry, r, hist, h)
        if reused is not None:
          kinds[i], encoded[i] = reused
    todo = [i for i, e in enumerate(encoded) if e is None]
    for s in range(0, len(todo), self.batch_buckets[-1]):  # encode the rest in padded batches
      idx = todo[s:s + self.batch_buckets[-1]]
      batch = self._stack([hists[i] for i in idx])
      outputs, kv = self._encode(params, batch)
      outputs, kv = np.asarray(outputs), [(np.asarray(k), np.asarray(v)) for k, v in kv]
      for j, i in enumerate(idx):
        n = len(reqs[i].events["ids"])
        encoded[i] = ([(k[j], v[j]) for k, v in kv], outputs[j, n - 1])
    for r, (kv, ue), kind in zip(reqs, encoded, kinds):
      if kind != "hit":  # a hit's entry is already the newest (get moved it)
        self.cache.put(r.user, Entry(fm_version, {f: np.asarray(r.events[f]) for f in FIELDS},
                                     r.request_time, kv, ue))
    taes, probs = self._score(params, hists, [e[0] for e in encoded], reqs)
    return [FMResult(t, p, e[1], k) for t, p, e, k in zip(taes, probs, encoded, kinds)]

  def _reuse(self, params, entry: Entry, r: FMRequest, hist: dict, h: int):
    """(kind, (kv, ue)) from a cached entry, or None if it cannot serve this request."""
    n, n_old = len(r.events["ids"]), len(entry.events["ids"])
    p = common_prefix(entry, r.events)
    if p == 0:
      return None
    kv = [(_fit(k, h), _fit(v, h)) for k, v in entry.kv]
    if p == n == n_old and entry.request_time == r.request_time:
      return "hit", (kv, entry.ue)
    start = p - 1  # the row before the first new event has a new query time
    if entry.request_time != r.request_time:  # history ages are relative to the request
      old = self._ages(np.int64(entry.request_time), hist["timestamps"][0])
      new = self._ages(np.int64(r.request_time), hist["timestamps"][0])
      changed = np.flatnonzero(np.asarray(old)[:start] != np.asarray(new)[:start])
      start = int(changed[0]) if len(changed) else start
    rows = bucket(n - start, [a for a in self.append_buckets if a <= h])
    if rows is None:
      return None
    stacked = [(k[None], v[None]) for k, v in kv]
    outputs, new_kv = self._append(params, hist, stacked, np.array([start], np.int32), rows)
    ue = np.asarray(outputs)[0, n - 1 - start]
    return "append", ([(np.asarray(k)[0], np.asarray(v)[0]) for k, v in new_kv], ue)

  def _stack(self, hists: list[dict]) -> dict:
    b = bucket(len(hists), self.batch_buckets)
    pad = [hists[0]] * (b - len(hists))  # padding rows repeat a real one; their output is dropped
    return {k: np.concatenate([x[k] for x in hists + pad]) for k in hists[0]}

  def _score(self, params, hists, kvs, reqs):
    b = bucket(len(reqs), self.batch_buckets)
    hist = self._stack(hists)
    rows = kvs + [kvs[0]] * (b - len(kvs))  # padded as _stack pads the histories
    kv = [tuple(np.stack([x[l][i] for x in rows]) for i in (0, 1)) for l in range(len(kvs[0]))]
    mb = self.micro_batch
    chunks = max(math.ceil(len(r.cand_ids) / mb) for r in reqs)
    taes, probs = [], []
    for c in range(chunks):
      cand = {"ids": np.zeros((b, mb), np.int32), "surfaces": np.zeros((b, mb), np.int32)}
      for i, r in enumerate(reqs):
        part = slice(c * mb, (c + 1) * mb)
        m = len(r.cand_ids[part])
        cand["ids"][i, :m], cand["surfaces"][i, :m] = r.cand_ids[part], r.cand_surfaces[part]
      t, p = self._extend(params, hist, kv, cand)
      taes.append(np.asarray(t))
      probs.append(np.asarray(p))
    taes, probs = np.concatenate(taes, 1), np.concatenate(probs, 1)
    return ([taes[i, :len(r.cand_ids)] for i, r in enumerate(reqs)],
            [probs[i, :len(r.cand_ids)] for i, r in enumerate(reqs)])


def _with_probs(out):
  tae, logits = out
  return tae, probabilities(logits)


def _fit(x: np.ndarray, h: int) -> np.ndarray:
  """A cached `[H_old, ...]` array padded or cut to `h` rows (rows past the history are unused)."""
  return x[:h] if len(x) >= h else np.pad(x, [(0, h - len(x))] + [(0, 0)] * (x.ndim - 1))
