"""The logging tier in the loop (`job="logging_stream"`): for every new window of the event log,
the TAEs, user embeddings and FM predictions of its impressions, computed with FM versions
published *before* that window, appended to the TAE store.

FM version n is the FM trained on the windows before n * K (K = the FM's
`stream.publish_every`), so window w is logged with version w // K ("newest"): never a version
that trained on w or later. Windows before K have no FM and are not logged. Each entry of
`stream.follow` is a group of shards: "newest", or a pinned version number p (logged only once
p <= w // K), so experts that follow either find their rows; a group has a shard per
`batches_per_shard` ranking batches. A window is one store version `w<window:06d>`
(`fmx.data.tae_store`), committed all-or-nothing: the unit of exactly-once; a restarted tier
continues at the first window from K on that the store lacks (so a deleted window is redone).
Meta: window, t_start, t_end, events, impressions and `followers` [{follow, fm_version, dim,
shards}]. `fmx.hypercast.logging_beam` writes the same versions with Apache Beam, through the
same functions.

A damaged snapshot is named and the tier rolls back to the newest intact older version for that
window (recorded as its `fm_version`); it waits for versions the FM has not published yet.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from fmx import files
from fmx.data import load as data_load, tae_store
from fmx.hypercast import drift, logging_tier, snapshots
from fmx.hypercast.window_source import WindowSource
from fmx.runtime import fm as fm_runtime
from fmx.train import reporting


class Versions:
  """Restored FM parameters by version, on one compiled FM (a version only swaps parameters)."""

  def __init__(self, snaps: snapshots.Snapshots, data, keep: int = 3):
    self.snaps, self.data, self.fm, self.cache, self.keep = snaps, data, None, {}, keep

  def get(self, version: int) -> tuple[int, dict]:
    """(the version used, its params): `version`, or the newest intact one before it."""
    for v in range(version, 0, -1):
      if v in self.cache:
        return v, self.cache[v]
      try:
        entry = self.snaps.entry(v)
        params = jax.tree.map(np.asarray, self.snaps.params(v))
      except snapshots.SnapshotError as e:
        print(f"fmx: warning: {e}; logging with an older version", file=sys.stderr)
        continue
      if self.fm is None:
        c = ml_collections.ConfigDict(entry["config"])
        model, items = fm_runtime.build(c, self.data)
        self.fm = fm_runtime.PinnedFM(c, model, items, params, entry["fm_step"], self.data,
                                      str(self.snaps.root))
      kept = list(self.cache.items())[max(0, len(self.cache) + 1 - self.keep):]
      self.cache = {**dict(kept), v: params}
      return v, params
    raise snapshots.SnapshotError(f"{self.snaps.root}: no intact FM version up to {version}; "
                                  "restart the FM trainer to publish again")

  def rows(self, version: int, batches: list[dict]) -> tuple[int, dict[str, np.ndarray]]:
    """(the version used, the store rows of `batches` under FM `version`): the per-batch
    function both the in-process and the Beam logging tiers run."""
    v, params = self.get(version)
    self.fm.params = params
    parts = [logging_tier.window_rows(self.fm, b, "train") for b in batches]
    return v, {k: np.concatenate([p[k] for p in parts]) for k in logging_tier.COLUMNS}


def wanted(window: int, K: int, follow) -> list[tuple[str, int]]:
  """(follow entry, FM version) of each shard group of `window`: version window // K for
  "newest", a pinned version once it is published before the window."""
  newest = window // K
  out = [(str(f), newest if str(f) == "newest" else int(f)) for f in follow]
  return [(f, v) for f, v in out if v <= newest]


def parts(batches: list, per_shard: int) -> list[list]:
  """A window's batches cut into shards of `per_shard` batches ([] for no batches)."""
  return [batches[i:i + per_shard] for i in range(0, len(batches), per_shard)]


def shard_info(follow: str, used: int, dim: int, part: int, parts: int) -> dict:
  return {"follow": follow, "fm_version": used, "dim": dim, "part": part, "parts": parts}


def window_meta(window: int, log_entry: dict, dataset: str, tags: list[dict]) -> dict:
  """A logged window's meta: its log entry's times and events, and per follower the FM version
  used and its shards (shard index = follower * parts + part)."""
  followers, pieces = {}, {}
  for t in tags:
    i = t["info"]
    if i:
      f = followers.setdefault(i["follow"], {"follow": i["follow"], "fm_version": i["fm_version"],
                                             "dim": i["dim"], "shards": []})
      if (i["fm_version"], i["dim"]) != (f["fm_version"], f["dim"]):
        raise tae_store.StoreError(f"window {window}: the shards of follower {i['follow']!r} "
                                   "come from different FM versions; log the window again")
      f["shards"].append(t["index"])
      pieces.setdefault(i["follow"], []).append((i["part"], i["parts"]))
  for follow, got in pieces.items():
    if sorted(got) != [(p, got[0][1]) for p in range(got[0][1])]:
      raise tae_store.StoreError(f"window {window}: follower {follow!r} has parts "
                                 f"{sorted(p for p, _ in got)} of {got[0][1]}; log it again")
  first = next(iter(followers.values()), {"shards": []})["shards"]
  return {"window": window, "t_start": log_entry["t_start"], "t_end": log_entry["t_end"],
          "events": log_entry["events"], "dataset": dataset, "followers": list(followers.values()),
          "impressions": sum(tags[i]["rows"] for i in first)}


def commit_window(writer: tae_store.VersionWriter, window: int, log_entry: dict, dataset: str,
                  followers: list[tuple[str, int]], dim: int) -> None:
  """Completes a staged window version's meta from its shards' tags. A window without
  impressions gets an empty shard per follower (or one untagged: a version needs a shard)."""
  if not writer.tags():
    empty = {k: np.zeros((0,), np.float32) for k in logging_tier.COLUMNS}
    for follow, want in followers:
      writer.write_shard(empty, shard_info(follow, want, dim, 0, 1))
    if not followers:
      writer.write_shard({"user": np.zeros(0, np.int32)})
  writer.meta.update(window_meta(window, log_entry, dataset, writer.tags()))


def monitor_drift(c, versions: Versions, window: int, version: int, batches: list[dict],
                  logged: dict | None, surfaces: list[str], path: str) -> None:
  """Appends, per surface, the MMD test between the TAEs of FM `version` and `version - 1` on
  the same impressions (`window`'s) to `path`. `logged` ({part: rows}) holds the window's rows
  under `version` when the tier logged them already."""
  if logged:
    new, a = version, {k: np.concatenate([logged[p][k] for p in sorted(logged)])
                       for k in logging_tier.COLUMNS}
  else:
    new, a = versions.rows(version, batches)
  old, b = versions.rows(version - 1, batches)
  with open(path, "a") as out:
    for s, name in enumerate(surfaces):
      at = a["surface"] == s
      if at.sum() >= 2:
        test = drift.mmd_test(b["tae"][at], a["tae"][at], permutations=c.permutations,
                              max_rows=c.rows, seed=window, paired=True)
        out.write(json.dumps({"window": window, "from": old, "to": new, "surface": name,
                              **test}) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c, t0 = config, time.time()
  data = data_load.load(c.input, "surfaces")
  snaps = snapshots.Snapshots(c.stream.snapshots, read_only=True)
  timeout = c.stream.idle_seconds or None
  pinned = [str(f) for f in c.stream.follow if str(f) != "newest"]
  snaps.prune_pins("logging-", {f"logging-{f}" for f in pinned})
  for f in pinned:  # pinned followers' versions must outlive retention
    snaps.pin(f"logging-{f}", int(f))
  snaps.wait(1, c.stream.poll_seconds, timeout)
  fm_config = ml_collections.ConfigDict(snaps.latest()["config"])  # K and the FM's windows
  K, fi, dim = fm_config.stream.publish_every, fm_config.input, int(fm_config.model.dim)
  first = max(K, c.stream.get("start_window", 0))  # no FM before window K
  done = set(tae_store.windows(c.stream.store))
  start = min(set(range(first, max(done | {first}) + 2)) - done)  # the first not committed
  source = WindowSource(c.stream.log_dir, data, fi.max_history, fi.num_candidates,
                        c.batch_size, c.stream.poll_seconds, timeout)
  versions = Versions(snaps, data)
  for w, events, batches in source.windows(start):
    if w in done:
      continue
    snaps.pin("logging", w // K, and_newer=True)  # this window's version and every later one
    snaps.wait(w // K, c.stream.poll_seconds, timeout)
    chunks = parts(batches, c.batches_per_shard)
    followers, logged = wanted(w, K, c.stream.follow), {}  # logged: version -> its rows
    with tae_store.write_version(c.stream.store, tae_store.window_version(w)) as writer:
      for follow, want in followers:
        for p, chunk in enumerate(chunks):
          used, arrays = versions.rows(want, chunk)
          writer.write_shard(arrays, shard_info(follow, used, dim, p, len(chunks)))
          logged.setdefault(used, {})[p] = arrays
      commit_window(writer, w, source.log.index()["windows"][w], data.name, followers, dim)
    if c.drift.enabled and w % K == 0 and w // K >= 2 and batches:
      monitor_drift(c.drift, versions, w, w // K, batches, logged.get(w // K),
                    data.spec.surfaces, os.path.join(workdir, "drift.jsonl"))
  if source.log.index()["closed"]:  # tell the experts the store is complete
    files.atomic_write(os.path.join(c.stream.store, tae_store.CLOSED),
                       json.dumps({"windows": len(tae_store.windows(c.stream.store))}))
  logged = tae_store.windows(c.stream.store)  # totals over every run of this stage
  results = {"windows": len(logged), "steps": 0, "wall_s": round(time.time() - t0, 2),
             "rows": sum(tae_store.version_meta(c.stream.store, tae_store.window_version(w))
                         .get("impressions", 0) for w in logged), "config": c.to_dict()}
  reporting.write_results(workdir, results)
  return results
