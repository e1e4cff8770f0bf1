"""Streaming surface experts (`job="expert_stream"`): they tail the TAE store written by the
logging tier and train on every new window once, in a process of their own that never runs
the FM (its knowledge arrives as data: store rows and frozen tables from published snapshots).

Per surface, one expert per entry of `stream.follow` ("newest", or a pinned FM version) on
that follower's TAEs plus the frozen FM item-id table of the same FM version, and the expert
alone (no FM input), all in one jitted step. Before training on a window every model scores it
(progressive validation, `workdir/progressive`), next to the FM's own predictions for the same
rows. The store position (window, batch, rows) is checkpointed with the state.

With `stream.update_every` R, the experts train on windows in groups of R and score every
window of a group before training on any (later updates, for the freshness study);
`workdir/trained.jsonl` has the wall time they first trained on each window. `stream.align`
aligns TAEs of a new FM version to the moments the experts trained on (see `StoreSource`).

Its inputs come from `fmx.hypercast.store_source`. Frozen tables are restored in a background
thread (only the tables of a snapshot, never its dense part) as soon as the next version is
published, and swapped in at the step boundary where rows of that version start; a version
change is appended to `workdir/version_changes.jsonl` with its publish-to-expert delay. Rows or a table of another FM
dimension than the expert was built for are refused.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmx.data import load as data_load
from fmx.data.items import item_table
from fmx.hypercast import progressive, snapshots
from fmx.hypercast.store_source import StoreSource, TableLoader
from fmx.models.embeddings import padded_vocab
from fmx.models.expert import example_batch, from_config
from fmx.runtime import checkpoint
from fmx.train import losses, metrics, reporting
from fmx.train.loop import require_finite, train_loop
from fmx.train.state import gradient_step, init_state, make_optimizer


def slots(follow) -> dict[str, str | None]:
  """{model key: the FM version it follows}: "alone" (no FM input) and one slot per `follow`
  entry, named by position, so a pinned slot can move to another version and keep its weights."""
  return {"alone": None, **{f"follow_{i}": str(f) for i, f in enumerate(follow)}}


def build_models(c, data, follow, fm_dim: int, fm_vocab: int):
  """{surface: {key: Expert}}, the item tables, and an init function for all their params."""
  spec = data.spec
  vocab = padded_vocab(data.num_items, c.mesh.model)
  items = item_table(data, vocab)
  models = {name: {k: from_config(c, vocab, int(spec.valid[s].sum()),
                                  "none" if k == "alone" else None)
                   for k in slots(follow)} for s, name in enumerate(spec.surfaces)}
  dummy = example_batch(2, c.input.short_len, fm_dim)
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
  c = config
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
    return gradient_step(state, tx, loss_fn, batch, rng, c.model.compute_dtype)

  predict = jax.jit(lambda p, b: jax.tree.map(jax.nn.sigmoid,  # the heads' probabilities
                                              apply_all(models, items, follow, p, b)))
  source = StoreSource(c, data, loader, follow, fm_vocab)
  records = os.path.join(workdir, "progressive")
  timing = {"loading": [], "idle": []}
  changes_path = os.path.join(workdir, "version_changes.jsonl")
  trained_path = os.path.join(workdir, "trained.jsonl")
  last = {"t": None, "versions": recorded_versions(changes_path), "seen": []}

  def evaluate_window(params, w, meta, batches):
    cols = {k: [] for k in ("labels", "valid", "surfaces")}
    probs = {}
    for batch in batches:
      out = predict(params, batch)
      for s, name in enumerate(spec.surfaces):
        b, tasks = batch["surfaces"][name], np.flatnonzero(spec.valid[s])
        real = np.asarray(b["real"])
        full = lambda x: metrics.widen(np.asarray(x)[real], tasks, spec.num_tasks)
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
    times = [np.asarray(b["surfaces"][n]["request_time"])[np.asarray(b["surfaces"][n]["real"])]
             for b in batches for n in spec.surfaces]
    info = {"wall": time.time(), "rows": int(len(arrays["labels"])),
            "t_mean": float(np.concatenate(times).mean()),
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
    if position["batch"] == 1:  # score every window of the group not scored yet, then train
      for gw, gmeta, gbatches in source.group:
        if gw >= w and not progressive.done(records, gw):
          evaluate_window(state.params, gw, gmeta, gbatches)
      with open(trained_path, "a") as out:  # when the experts first train on the window
        out.write(json.dumps({"window": w, "step": step, "wall": time.time()}) + "\n")
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
  return {ch["follow"]: ch["fm_version"] for ch in reporting.json_lines(path)
          if isinstance(ch, dict) and {"follow", "fm_version"} <= ch.keys()}
