"""Surface-expert trainer (`job="expert"`): one expert per surface on frozen, materialised FM
knowledge (arXiv 2508.02929).

`train_and_evaluate(config, workdir)` reads the TAE store rows of one FM version
(`config.tae`), written beforehand by the logging tier (`fmx/configs/logging_tier.py`). It
then trains the expert of every surface in
`workdir/<surface>` (checkpointed, resumable) on that surface's tasks, the FM-unseen one
included. The loss is the MTML BCE, plus `kd_weight` times the BCE against the FM's predictions
as soft targets (real-time knowledge distillation, on the tasks the FM knows). The epoch is
picked on the held-out users' mean NE. `results.json` holds `ne/`, `auc/`, `calibration/` per
surface and task for the expert, and `fm/...`: the FM itself, one-stage, on the same test rows.
The expert never calls the FM: its inputs are arrays.
"""

from __future__ import annotations

import json
import os
import time

import jax.numpy as jnp
import ml_collections
import numpy as np

from fmx.data import expert_examples, load as data_load, tae_store
from fmx.data.items import item_table
from fmx.data.source import EpochSource
from fmx.models.embeddings import padded_vocab
from fmx.models import expert as expert_model
from fmx.models.foundation import probabilities
from fmx.train import losses, metrics, reporting, sharding
from fmx.train.loop import require_finite, train_loop
from fmx.train.state import gradient_step, init_state, make_optimizer


def check_store(c: ml_collections.ConfigDict) -> dict:
  """The store metadata of `c.tae.fm_version`, checked to come from the expert's dataset;
  fails before any data is read if the version is missing."""
  t = c.tae
  if t.fm_version not in tae_store.versions(t.store):
    raise tae_store.StoreError(
        f"{t.store}: no TAEs of FM version {t.fm_version!r} (versions present: "
        f"{tae_store.versions(t.store)}); materialise them with the logging tier first: "
        "python -m fmx.main --config=fmx/configs/logging_tier.py:<dataset> "
        f"--config.fm_workdir=<FM workdir> --config.store={t.store} "
        f"--config.fm_version={t.fm_version} --workdir=<dir>")
  meta = tae_store.version_meta(t.store, t.fm_version)
  want = {"dataset": c.input.dataset,
          "synthetic": c.input.synthetic.to_dict() if c.input.dataset == "synthetic" else None}
  have = {k: meta.get(k) for k in want}
  if json.loads(json.dumps(have)) != json.loads(json.dumps(want)):
    raise tae_store.StoreError(f"{t.store}: FM version {t.fm_version!r} was materialised from "
                               f"{have}, the expert reads {want}: set --config.input.* to match")
  return meta



def make_steps(c, spec, surface, vocab, items, example_batch):
  """(tasks, init, train_step, predict) of the expert of `surface`, pure functions, predict
  jitted on the config's mesh; `example_batch` gives the input shapes."""
  tasks = np.flatnonzero(spec.valid[surface])
  model = expert_model.from_config(c, vocab, len(tasks))
  tx = make_optimizer(c.optimizer)
  weights = jnp.asarray(spec.weights[tasks], jnp.float32)
  kd_mask = jnp.asarray(spec.fm_tasks[tasks])

  def init(rng):
    return init_state(model.init(rng, example_batch, items)["params"], tx)

  def loss_fn(params, batch, rng):
    logits = model.apply({"params": params}, batch, items, train=True, rngs={"dropout": rng})
    loss, per_task, kd = losses.distilled_bce(logits, batch["labels"], batch["label_valid"],
                                              weights, batch["fm_probs"], kd_mask, c.kd_weight)
    return loss, {"kd": kd, **{f"bce/{spec.tasks[t]}": per_task[i] for i, t in enumerate(tasks)}}

  def train_step(state, batch, rng):
    return gradient_step(state, tx, loss_fn, batch, rng, c.model.compute_dtype)

  layout = sharding.Layout.of(c.mesh)
  predict = layout.jit_eval(lambda p, b: probabilities(model.apply({"params": p}, b, items)),
                            layout.params(init))
  return tasks, init, train_step, predict


def train_surface(c, workdir, data, parts, surface, items, vocab, fingerprint: str,
                  source) -> dict:
  """Trains the expert of `surface` and returns its metrics at the selected epoch."""
  spec = data.spec
  tasks, init, train_step, predict = make_steps(
      c, spec, surface, vocab, items, next(expert_examples.eval_batches(parts["fit"], 1, source)))

  def evaluate(params, epoch):
    out = {}
    for split, prefix in (("select", "valid/"), ("test", "")):
      ex = parts[split]
      probs = np.concatenate([np.asarray(predict(params, b))
                              for b in expert_examples.eval_batches(ex, c.evals.batch_size, source)])[:len(ex["cand"])]
      require_finite(probs, "predictions")
      wide = lambda x: metrics.widen(x, tasks, spec.num_tasks)
      m = metrics.surface_task_metrics(wide(probs), wide(ex["labels"]), wide(ex["label_valid"]),
                                       np.full(len(probs), surface), spec)
      m["ne_mean"] = metrics.ne_mean(m)
      out.update({prefix + k: v for k, v in m.items()})
    return out

  rows = sharding.Layout.of(c.mesh).process_rows(c.input.batch_size)
  batches, steps = expert_examples.train_batches(parts["fit"], c.input.batch_size, c.seed,
                                                 c.num_epochs, source, rows)
  _, final, report = train_loop(c, workdir, init=init, train_step=train_step,
                                source=EpochSource(batches, steps, rows=rows), evaluate=evaluate,
                                select=("valid/ne_mean", "min"),
                                desc=f"{data.name} expert {spec.surfaces[surface]} {c.model.carrier}",
                                fingerprint=fingerprint)
  report.close()
  return final


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c, t0 = config, time.time()
  store_meta = check_store(c)  # fails fast, before the data are read, if no TAEs can be had
  data = data_load.load(c.input, "surfaces")
  spec = data.spec
  rows, source = expert_examples.load_index(c.tae.store, c.tae.fm_version)  # no embeddings
  fingerprint = data_load.fingerprint(data, store_meta)  # the data and the version's content
  vocab = padded_vocab(data.num_items, c.mesh.model)
  items = item_table(data, vocab)
  names = list(c.surfaces) or list(spec.surfaces)
  unknown = set(names) - set(spec.surfaces)
  if unknown:
    raise ValueError(f"surfaces {sorted(unknown)} are not in {data.name}: expected {spec.surfaces}")
  results, steps, changes = {}, 0, []
  for name in names:
    s = spec.surfaces.index(name)
    ex = expert_examples.surface_examples(data, rows, s, c.input.short_len)
    parts = expert_examples.partition(ex, c.input.select_fraction)
    final = train_surface(c, os.path.join(workdir, name), data, parts, s, items, vocab, fingerprint,
                          source)
    results.update({k: v for k, v in final.items() if k.startswith(("ne/", "auc/", "calibration/",
                                                                     "count/"))})
    results[f"epoch/{name}"], steps = final["epoch"], steps + final["steps"]
    changes += [{"surface": name, **ch} for ch in final["config_changes"]]
  test = rows["split"] == tae_store.SPLIT_IDS["test"]
  one_stage = metrics.surface_task_metrics(rows["fm_probs"][test], rows["labels"][test],
                                           rows["label_valid"][test], rows["surface"][test], spec,
                                           spec.fm_tasks)
  results.update({f"fm/{k}": v for k, v in one_stage.items()
                  if k.split("/")[1] in names})
  source.close()
  results["ne_mean"] = metrics.ne_mean(results)
  results.update(dataset=data.name, carrier=c.model.carrier, kd_weight=c.kd_weight,
                 fm_version=c.tae.fm_version, surfaces=names, tasks=list(spec.tasks),
                 fm_tasks=[t for t, m in zip(spec.tasks, spec.fm_tasks) if m],
                 selected_by="valid/ne_mean on held-out users (best epoch)",
                 wall_s=round(time.time() - t0, 2), steps=steps, config=c.to_dict(),
                 config_changes=changes)
  reporting.write_results(workdir, results)
  return results
