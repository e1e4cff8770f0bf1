"""Streaming surface experts (`job="expert_stream"`): they tail the TAE store written by the
logging tier and train on every new window once, in a process of their own that never runs
the FM (its knowledge arrives as data: store rows and frozen tables from published snapshots).

Per surface, one expert per entry of `stream.follow` ("newest", or a pinned FM version) on
that follower's TAEs plus the frozen FM item-id table of the same FM version, and the expert
alone (no FM input), all in one jitted step. Before training on a window every model scores it
(progressive validation, `workdir/progressive`), next to the FM's own predictions for the same
rows. The store position (window, batch, rows) is checkpointed with the state.

Frozen tables are restored in a background thread (`TableLoader`: only the tables of a
snapshot, never its dense part) as soon as a version is published, and swapped in at the step
boundary where rows of that version start; a version change is appended to
`workdir/version_changes.jsonl` with its publish-to-expert delay. Rows or a table of another FM
dimension than the expert was built for are refused.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmx.data import expert_examples, load as data_load, tae_store
from fmx.data.items import item_table
from fmx.hypercast import progressive, snapshots
from fmx.models.embeddings import padded_vocab
from fmx.runtime import checkpoint
from fmx.models.expert import Expert
from fmx.models.hstu import HSTUConfig
from fmx.train import losses, reporting
from fmx.train.loop import RunError, require_finite, train_loop
from fmx.train.state import gradient_step, init_state, make_optimizer

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
  """A `fmx.data.source.Source` of expert batches from the store's windows."""

  steps_per_epoch = None
  total_steps = None

  def __init__(self, c, data, loader: TableLoader, follow: tuple[str, ...], fm_vocab: int):
    self.c, self.data, self.loader, self.follow, self.fm_vocab = c, data, loader, follow, fm_vocab
    self.current = None  # (window, meta, batches) of the newest window

  def start(self) -> dict:
    return {"window": -1, "batch": 0, "rows": 0}

  def iterate(self, position: dict):
    rows = position["rows"]
    after = position["window"] - (1 if position["batch"] else 0)
    for w, meta, shards in store_windows(self.c.stream.store, after, self.c.stream.poll_seconds,
                                         self.c.stream.idle_seconds or None):
      self.current = (w, meta, self.window_batches(w, meta, shards))
      for b, batch in enumerate(self.current[2]):
        if w == position["window"] and b < position["batch"]:
          continue
        rows += int(sum(s["real"].sum() for s in batch["surfaces"].values()))
        yield batch, {"window": w, "batch": b + 1, "rows": rows}

  def window_batches(self, w: int, meta: dict, shards: list[dict]) -> list[dict]:
    """Batches of `batch_size` rows per surface (padded rows are not `real`)."""
    present = {f["follow"]: (f, shards[i]) for i, f in enumerate(meta.get("followers", []))}
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
        tables[f] = self.loader.get(info["fm_version"])  # swapped in at this step boundary
        rows_of[f] = rows
      else:
        tables[f] = np.zeros((self.fm_vocab, dim), np.float32)
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


def slots(follow) -> dict[str, str | None]:
  """{model key: the FM version it follows}: "alone" (no FM input) and one slot per `follow`
  entry, named by position, so a pinned slot can move to another version and keep its weights."""
  return {"alone": None, **{f"follow_{i}": str(f) for i, f in enumerate(follow)}}


def build_models(c, data, follow, fm_dim: int, fm_vocab: int):
  """{surface: {key: Expert}}, the item tables, and an init function for all their params."""
  spec = data.spec
  vocab = padded_vocab(data.num_items, c.mesh.model)
  items = item_table(data, vocab)
  hstu = HSTUConfig.from_model_config(c.model, max_len=c.input.short_len + 1)
  models = {name: {k: Expert(hstu, vocab, int(spec.valid[s].sum()),
                             "none" if k == "alone" else c.model.carrier)
                   for k in slots(follow)} for s, name in enumerate(spec.surfaces)}
  B, T = 2, c.input.short_len
  dummy = {"ids": jnp.zeros((B, T), jnp.int32), "actions": jnp.zeros((B, T), jnp.int32),
           "timestamps": jnp.zeros((B, T), jnp.int32), "lengths": jnp.zeros((B,), jnp.int32),
           "cand": jnp.ones((B,), jnp.int32), "request_time": jnp.zeros((B,), jnp.int32),
           "tae": jnp.zeros((B, fm_dim)), "ue": jnp.zeros((B, fm_dim))}
  table = jnp.zeros((fm_vocab, fm_dim))

  def init_params(rng):
    out = {}
    for i, (name, ms) in enumerate(models.items()):
      out[name] = {k: m.init(jax.random.fold_in(rng, 97 * i + j), dummy, items,
                             fm_table=None if k == "alone" else table)["params"]
                   for j, (k, m) in enumerate(ms.items())}
    return out

  return models, items, init_params


def apply_all(models, items, follow, params, batch, *, train=False, rng=None):
  """{surface: {key: logits}} of every model on its surface's rows of `batch`."""
  out, i = {}, 0
  for name, ms in models.items():
    b = dict(batch["surfaces"][name])
    out[name] = {}
    for k, m in ms.items():
      f = slots(follow)[k]
      inputs = {**b, "tae": b["tae"][f]} if f else b
      kw = {"rngs": {"dropout": jax.random.fold_in(rng, i)}} if train else {}
      i += 1
      out[name][k] = m.apply({"params": params[name][k]}, inputs, items, train=train,
                             fm_table=batch["tables"][f] if f else None, **kw)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c, t0 = config, time.time()
  data = data_load.load(c.input, "surfaces")
  spec = data.spec
  follow = tuple(str(f) for f in c.stream.follow)
  snaps = snapshots.Snapshots(c.stream.snapshots, read_only=True)
  snaps.prune_pins("experts-", {f"experts-{f}" for f in follow})
  for f in follow:  # a pinned follower's version outlives retention
    if f != "newest":
      snaps.pin(f"experts-{f}", int(f))
  snaps.wait(1, c.stream.poll_seconds, c.stream.idle_seconds or None)
  latest = snaps.latest()
  fm_dim, fm_vocab = int(latest["dim"]), int(latest["vocab"])
  loader = TableLoader(snaps, fm_dim)
  models, items, init_params = build_models(c, data, follow, fm_dim, fm_vocab)
  tx = make_optimizer(c.optimizer)
  weights = {name: jnp.asarray(spec.weights[spec.valid[s]], jnp.float32)
             for s, name in enumerate(spec.surfaces)}

  def loss_fn(params, batch, rng):
    logits = apply_all(models, items, follow, params, batch, train=True, rng=rng)
    total, aux = 0.0, {}
    for name, per_model in logits.items():
      b = batch["surfaces"][name]
      for k, lg in per_model.items():
        valid = b["label_valid"]
        if k != "alone":  # the rows whose follower's FM version was logged
          valid = valid & b["has"][slots(follow)[k]][:, None]
        loss, _ = losses.mtml_bce(lg, b["labels"], valid, weights[name])
        total, aux[f"bce/{name}/{k}"] = total + loss, loss
    return total, aux

  def train_step(state, batch, rng):
    return gradient_step(state, tx, loss_fn, batch, rng)

  predict = jax.jit(lambda p, b: jax.tree.map(jax.nn.sigmoid,  # the heads' probabilities
                                              apply_all(models, items, follow, p, b)))
  source = StoreSource(c, data, loader, follow, fm_vocab)
  records = os.path.join(workdir, "progressive")
  timing = {"loading": [], "idle": []}
  changes_path = os.path.join(workdir, "version_changes.jsonl")
  last = {"t": None, "versions": recorded_versions(changes_path), "seen": []}

  def evaluate_window(params, w, meta, batches):
    cols = {k: [] for k in ("labels", "valid", "surfaces")}
    probs = {}
    for batch in batches:
      out = predict(params, batch)
      for s, name in enumerate(spec.surfaces):
        b, tasks = batch["surfaces"][name], np.flatnonzero(spec.valid[s])
        real = np.asarray(b["real"])
        full = lambda x: _full(np.asarray(x)[real], tasks, spec.num_tasks)
        cols["labels"].append(full(b["labels"]))
        cols["valid"].append(full(b["label_valid"]))
        cols["surfaces"].append(np.full(real.sum(), s, np.int32))
        for k, p in out[name].items():
          f = slots(follow)[k]
          if f is None or np.asarray(b["has"][f]).any():
            probs.setdefault("expert_alone" if f is None else f"expert_follow_{f}", []).append(full(p))
        for f, fp in b["fm_probs"].items():
          probs.setdefault(f"fm_{f}", []).append(full(fp))
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    for k, v in probs.items():
      if sum(len(x) for x in v) == len(arrays["labels"]):
        arrays[f"probs/{k}"] = np.concatenate(v)
        require_finite(arrays[f"probs/{k}"], "predictions")
    info = {"wall": time.time(), "rows": int(len(arrays["labels"])),
            "fm_versions": {f["follow"]: f["fm_version"] for f in meta["followers"]}}
    progressive.write(records, w, arrays, info)

  def on_batch(state, batch, position):
    jax.block_until_ready(state.params)
    now = time.time()
    if last["t"] is not None:  # the previous step, with the batch that came after it
      timing["loading" if loader.loaded_during(last["t"], now) else "idle"].append(now - last["t"])
    if "newest" in follow:  # load the next version ahead of the rows that will need it
      after = last["versions"].get("newest", 0)
      upcoming = [e["version"] for e in snaps.versions() if e["version"] > after]
      if upcoming:
        loader.prefetch(min(upcoming))
    w, meta, batches = source.current
    step = int(state.step)
    for f in meta["followers"]:
      v = f["fm_version"]
      if f["follow"] == "newest" and (not last["seen"] or last["seen"][-1][1] != v):
        last["seen"].append((step, v))
      if last["versions"].get(f["follow"]) != v:  # a version change, recorded once
        last["versions"][f["follow"]] = v
        with open(changes_path, "a") as out:
          out.write(json.dumps({"follow": f["follow"], "fm_version": v, "window": w,
                                "step": step, "wall": now,
                                "delay_s": now - snaps.entry(v)["published_at"]}) + "\n")
    # The newest follower's pin moves to a version only once a committed checkpoint lies past
    # the step it arrived at (a restart re-reads that window and needs its table).
    every = c.checkpoint_every_steps
    committed = (step // every - 1) * every if every else -1
    safe = [v for s0, v in last["seen"] if s0 <= committed]
    if safe and safe[-1] != last.get("pinned"):
      snaps.pin("experts-newest", safe[-1], and_newer=True)
      last["pinned"] = safe[-1]
    if position["batch"] == 1 and not progressive.done(records, w):
      evaluate_window(state.params, w, meta, batches)
    last["t"] = time.time()

  fingerprint = data_load.fingerprint(data, {"fm_dim": fm_dim})  # follow may change: slots
  state, final, report = train_loop(c, workdir, init=lambda rng: init_state(init_params(rng), tx),
                                    train_step=train_step, source=source,
                                    evaluate=lambda params, epoch: {}, select=None,
                                    desc=f"{data.name} experts", fingerprint=fingerprint,
                                    on_batch=on_batch)
  report.close()
  loader.pool.shutdown()
  ms = lambda xs: round(1000 * float(np.median(xs)), 2) if xs else None
  results = {**final, "rows": final["position"]["rows"],
             "step_ms_while_loading": ms(timing["loading"]),
             "step_ms_idle": ms(timing["idle"]), "steps_while_loading": len(timing["loading"]),
             "table_wait_first_s": round(loader.waits[0], 3) if loader.waits else None,
             "table_wait_later_s": round(sum(loader.waits[1:]), 3), "dataset": data.name, "follow": list(follow),
             "params_sha256": checkpoint.digest(state.params),
             "config": c.to_dict()}
  reporting.write_results(workdir, results)
  return results


def recorded_versions(path: str) -> dict[str, int]:
  """{follow: FM version} of the newest change each follower recorded in `path` (a restarted
  expert does not record again the version it resumes on)."""
  out = {}
  if os.path.exists(path):
    for line in open(path):
      try:
        change = json.loads(line)
        out[change["follow"]] = change["fm_version"]
      except (ValueError, KeyError, TypeError):
        continue  # a line cut by a kill
  return out


def _full(values: np.ndarray, tasks: np.ndarray, num_tasks: int) -> np.ndarray:
  out = np.zeros((len(values), num_tasks), values.dtype)
  out[:, tasks] = values
  return out
