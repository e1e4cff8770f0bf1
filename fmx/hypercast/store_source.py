"""What the streaming experts read: the TAE store's windows in order, as batches per surface,
with the frozen FM tables of the same FM versions restored in the background.

`store_windows` tails a streaming store (`fmx.data.tae_store`: a version per window) without
gaps; `StoreSource` is the loop's source over it (position: window, batch, rows trained);
`TableLoader` restores the item-id table of a published FM version (only the tables subtree of
its snapshot) in a background thread.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time

import numpy as np

from fmx.data import expert_examples, tae_store
from fmx.hypercast import drift, snapshots
from fmx.train.loop import RunError

INPUTS = ("ids", "actions", "timestamps", "lengths", "cand", "request_time", "labels",
          "label_valid")


class TableLoader:
  """Restores FM item-id tables of published versions in a background thread."""

  def __init__(self, snaps: snapshots.Snapshots, dim: int):
    self.snaps, self.dim = snaps, dim
    self.pool = concurrent.futures.ThreadPoolExecutor(1)
    self.futures, self.tables, self.waits = {}, {}, []  # waits: seconds blocked per version
    self.loads: list[list[float]] = []  # [start, end] wall times of the background loads

  def _load(self, version: int) -> np.ndarray:
    span = [time.time(), float("inf")]
    self.loads.append(span)
    try:
      table = np.asarray(self.snaps.tables(version)["item"]["embedding"])
    finally:
      span[1] = time.time()
    if table.shape[1] != self.dim:
      raise snapshots.SnapshotError(
          f"{self.snaps.root}: FM version {version}'s item table has dimension {table.shape[1]}, "
          f"these experts were built for {self.dim}: pin an FM version of dimension {self.dim} "
          "(--config.stream.follow) or start the experts in a fresh workdir")
    return table

  def prefetch(self, version: int) -> None:
    if version not in self.tables and version not in self.futures:
      self.futures[version] = self.pool.submit(self._load, version)

  def loaded_during(self, start: float, end: float) -> bool:
    """Whether a background load ran at some time between `start` and `end`."""
    return any(a < end and b > start for a, b in self.loads)

  def get(self, version: int) -> np.ndarray:
    if version not in self.tables:
      self.prefetch(version)
      t0 = time.time()
      self.tables[version] = self.futures.pop(version).result()
      self.waits.append(time.time() - t0)
    self.tables[version] = self.tables.pop(version)  # most recently used last
    for old in list(self.tables)[:-3]:
      del self.tables[old]
    return self.tables[version]


def store_windows(store: str, after: int, poll: float, timeout: float | None):
  """Yields (window, meta, shards) of the store's windows after `after`, in order and without
  gaps (a missing window, e.g. a damaged one deleted for the logging tier to redo, is waited
  for), tailing the store until the logging tier has closed it."""
  waited, warned = 0.0, False
  while True:
    present = tae_store.windows(store)
    later = [w for w in present if w > after]
    nxt = after + 1 if after >= 0 else (later[0] if later else None)
    if nxt is not None and nxt in present:
      key = tae_store.window_version(nxt)
      yield nxt, tae_store.version_meta(store, key), [a for _, a in tae_store.read(store, key)]
      after, waited = nxt, 0.0
      continue
    if later and not warned:
      print(f"fmx: warning: {store}: window {nxt} is missing while later ones are there; "
            "waiting for the logging tier to log it", file=sys.stderr)
      warned = True
    if not later and os.path.exists(os.path.join(store, tae_store.CLOSED)):
      return
    if timeout is not None and waited >= timeout:
      return
    time.sleep(poll)
    waited += poll


class StoreSource:
  """A `fmx.data.source.Source` of expert batches from the store's windows.

  `stream.update_every` R > 1 delays the experts' updates: windows come in groups (window w is
  in group w // R), a group is read whole before its first batch, and `group` lists its windows
  so that every one of them is scored before the experts train on any (the freshness study's
  later updates). `stream.align` maps each follower's TAEs, per surface and dimension, onto the
  first and second moments of every TAE given to the experts before, as given (aligned), which
  keeps them in the frame of the first FM version they met (`fmx.hypercast.drift.align`): the
  current FM version's moments are running statistics over its windows so far (TAEs only, no
  labels, so a window's own rows count before it is scored). The moments are a function of the
  store's windows, rebuilt on resume by reading them again."""

  steps_per_epoch = None
  total_steps = None
  rows = None  # every process reads whole batches

  def __init__(self, c, data, loader: TableLoader, follow: tuple[str, ...], fm_vocab: int):
    self.c, self.data, self.loader, self.follow, self.fm_vocab = c, data, loader, follow, fm_vocab
    self.current = None  # (window, meta, batches) of the window being trained
    self.group = []  # (window, meta, batches) of every window of the current group
    self.update_every = int(c.stream.get("update_every", 1))
    self.align = bool(c.stream.get("align", False))
    self.moments = {}  # (follow, surface) -> {"version", "ref", "cur"} when aligning

  def start(self) -> dict:
    return {"window": -1, "batch": 0, "rows": 0}

  def iterate(self, position: dict):
    rows, c, R = position["rows"], self.c.stream, self.update_every
    after = position["window"] - (1 if position["batch"] else 0)

    def groups():
      pending = []
      for w, meta, shards in store_windows(c.store, -1 if self.align else after, c.poll_seconds,
                                           c.idle_seconds or None):
        if w <= after:  # read again only to rebuild the alignment's moments
          self.window_batches(w, meta, shards, moments_only=True)
          continue
        if pending and pending[-1][0] // R != w // R:
          yield pending
          pending = []
        pending.append((w, meta, shards))
        if (w + 1) % R == 0:
          yield pending
          pending = []
      if pending:
        yield pending

    for group in groups():
      self.group = [(w, meta, self.window_batches(w, meta, shards)) for w, meta, shards in group]
      for self.current in self.group:
        w, _, batches = self.current
        for b, batch in enumerate(batches):
          if w == position["window"] and b < position["batch"]:
            continue
          rows += int(sum(s["real"].sum() for s in batch["surfaces"].values()))
          yield batch, {"window": w, "batch": b + 1, "rows": rows}

  def aligned(self, f: str, version: int, surfaces: np.ndarray, tae: np.ndarray) -> np.ndarray:
    """`tae` (rows of follower `f`, FM `version`) aligned per surface; updates the moments."""
    out = tae.copy()
    for s in np.unique(surfaces):
      at = surfaces == s
      st = self.moments.get((f, int(s)))
      if st is None or st["version"] != version:  # a new FM version: its own moments from now
        ref = st["ref"] if st else drift.init_moments(tae.shape[1])
        st = self.moments[(f, int(s))] = {"version": version, "ref": ref,
                                           "cur": drift.init_moments(tae.shape[1])}
      st["cur"] = drift.update_moments(st["cur"], tae[at])
      out[at] = drift.align(tae[at], st["cur"], st["ref"])
      st["ref"] = drift.update_moments(st["ref"], out[at])
    return out

  def window_batches(self, w: int, meta: dict, shards: list[dict],
                     moments_only: bool = False) -> list[dict]:
    """Batches of `batch_size` rows per surface (padded rows are not `real`)."""
    present = {f["follow"]: (f, {k: np.concatenate([shards[i][k] for i in f["shards"]])
                                 for k in shards[f["shards"][0]]})
               for f in meta.get("followers", [])}
    if not present or not len(next(iter(present.values()))[1]["user"]):
      return []
    # an entry may be absent only while its pinned version is newer than the window's FM
    newest = max(f["fm_version"] for f, _ in present.values())
    missing = [f for f in self.follow if f not in present and (f == "newest" or int(f) <= newest)]
    if missing:
      raise RunError(f"{self.c.stream.store} window {w}: the logging tier logs follow="
                     f"{sorted(present)}, not {missing}: set --config.stream.follow to versions "
                     "it logs, or add them to the logging tier's stream.follow")
    dim = self.loader.dim
    tables, rows_of = {}, {}
    for f in self.follow:
      if f in present:
        info, rows = present[f]
        if info["dim"] != dim:
          raise RunError(f"{self.c.stream.store} window {w}: TAEs of FM version "
                         f"{info['fm_version']} have dimension {info['dim']}, these experts were "
                         f"built for {dim}: pin an FM version of dimension {dim} or start the "
                         "experts in a fresh workdir")
        if self.align:
          rows = {**rows, "tae": self.aligned(f, info["fm_version"], rows["surface"], rows["tae"])}
        rows_of[f] = rows
        if not moments_only:
          tables[f] = self.loader.get(info["fm_version"])  # swapped in at this step boundary
      else:
        tables[f] = np.zeros((self.fm_vocab, dim), np.float32)
    if moments_only:
      return []
    base = next(iter(present.values()))[1]  # the rows (and inputs) every shard shares
    B, spec = self.c.input.batch_size, self.data.spec
    per_surface = {}
    for s, name in enumerate(spec.surfaces):
      ex = expert_examples.surface_examples(self.data, base, s, self.c.input.short_len)
      keep = np.flatnonzero(base["surface"] == s)
      tasks = np.flatnonzero(spec.valid[s])
      ex["tae"] = {f: (rows_of[f]["tae"][keep] if f in rows_of else
                       np.zeros((len(keep), dim), np.float32)) for f in self.follow}
      ex["fm_probs"] = {f: rows_of[f]["fm_probs"][keep][:, tasks].astype(np.float32)
                        for f in rows_of}
      ex["has"] = {f: np.full(len(keep), f in rows_of) for f in self.follow}
      per_surface[name] = ex
    steps = max(-(-len(e["cand"]) // B) for e in per_surface.values())
    batches = []
    for i in range(steps):
      batch = {"surfaces": {}, "tables": tables}
      for name, ex in per_surface.items():
        n = len(ex["cand"])
        idx = np.arange(i * B, (i + 1) * B)
        real, take = idx < n, np.minimum(idx, max(n - 1, 0))
        pick = (lambda a: a[take]) if n else (lambda a: np.zeros((B,) + a.shape[1:], a.dtype))
        b = {k: pick(ex[k]) for k in INPUTS}
        b["label_valid"] = b["label_valid"] & real[:, None]
        b.update(real=real, tae={f: pick(v) for f, v in ex["tae"].items()},
                 has={f: pick(v) & real for f, v in ex["has"].items()},
                 fm_probs={f: pick(v) for f, v in ex["fm_probs"].items()})
        batch["surfaces"][name] = b
      batches.append(batch)
    return batches
