"""Surface-expert trainer (`job="expert"`): one expert per surface on frozen, materialised FM
knowledge (arXiv 2508.02929).

`train_and_evaluate(config, workdir)` reads the TAE store rows of one FM version
(`config.tae`), materialising them first through the logging tier if the store lacks that
version and `tae.fm_workdir` names the FM. It then trains the expert of every surface in
`workdir/<surface>` (checkpointed, resumable) on that surface's tasks, the FM-unseen one
included. The loss is the MTML BCE, plus `kd_weight` times the BCE against the FM's predictions
as soft targets (real-time knowledge distillation, on the tasks the FM knows). The epoch is
picked on the held-out users' mean NE. `results.json` holds `ne/`, `auc/`, `calibration/` per
surface and task for the expert, and `fm/...`: the FM itself, one-stage, on the same test rows.
The expert never calls the FM: its inputs are arrays.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fmx.data import expert_examples, tae_store
from fmx.models.expert import Expert
from fmx.train import fm as fm_train, losses, metrics, reporting
from fmx.train.loop import TrainState, make_optimizer, padded_vocab, train_loop


def fm_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The config of the FM run in `c.tae.fm_workdir` (None if unset), checked to be on the
  expert's data."""
  if not c.tae.fm_workdir:
    return None
  if not os.path.isfile(os.path.join(c.tae.fm_workdir, "results.json")):
    raise tae_store.StoreError(f"{c.tae.fm_workdir}/results.json is missing: that FM has not "
                               "finished training (python -m fmx.main --config=fmx/configs/ml1m_fm.py ...)")
  fm = ml_collections.ConfigDict(reporting.read_results(c.tae.fm_workdir)["config"])
  same = fm.input.dataset == c.input.dataset and (
      c.input.dataset != "synthetic" or fm.input.synthetic.to_dict() == c.input.synthetic.to_dict())
  if not same:
    raise ValueError(f"the FM in {c.tae.fm_workdir} was trained on {fm.input.dataset} "
                     f"{fm.input.synthetic.to_dict()}, the expert reads {c.input.dataset} "
                     f"{c.input.synthetic.to_dict()}: set --config.input.* to match the FM")
  return fm


def ensure_taes(c: ml_collections.ConfigDict, load_data) -> None:
  """Materialises `c.tae.fm_version` from `c.tae.fm_workdir` if the store does not hold it;
  fails before `load_data()` is called if neither can provide it."""
  t = c.tae
  fm = fm_config(c)
  if t.fm_version in tae_store.versions(t.store):
    return
  if fm is None:
    raise tae_store.StoreError(
        f"{t.store}: no TAEs of FM version {t.fm_version!r}; set --config.tae.fm_workdir to a "
        "trained FM's workdir to materialise them, or point tae.store at a materialised store")
  from fmx.hypercast import logging_tier  # the logging tier, not the expert, runs the FM
  logging_tier.materialise(fm, t.fm_workdir, t.store, t.fm_version, load_data(),
                           splits=("valid", "test"))


def _full(values: np.ndarray, tasks: np.ndarray, num_tasks: int) -> np.ndarray:
  out = np.zeros((len(values), num_tasks), values.dtype)
  out[:, tasks] = values
  return out


def train_surface(c, workdir, data, parts, surface, items, vocab) -> dict:
  """Trains the expert of `surface` and returns its metrics at the selected epoch."""
  spec = data.spec
  tasks = np.flatnonzero(spec.valid[surface])
  model = Expert(c.model, vocab, len(tasks))
  tx = make_optimizer(c.optimizer)
  weights = jnp.asarray(spec.weights[tasks], jnp.float32)
  kd_mask = jnp.asarray(spec.fm_tasks[tasks])
  dummy = {k: v[:1] for k, v in parts["fit"].items() if k in expert_examples.MODEL_KEYS}

  def init(rng):
    params = model.init(rng, dummy, items)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      logits = model.apply({"params": params}, batch, items, train=True, rngs={"dropout": rng})
      loss, per_task, kd = losses.distilled_bce(logits, batch["labels"], batch["label_valid"],
                                                weights, batch["fm_probs"], kd_mask, c.kd_weight)
      return loss, (per_task, kd)

    (loss, (per_task, kd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    scalars = {"loss": loss, "kd": kd, "grad_norm": optax.tree.norm(grads)}
    scalars.update({f"bce/{spec.tasks[t]}": per_task[i] for i, t in enumerate(tasks)})
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), scalars

  predict = jax.jit(lambda p, b: jax.nn.sigmoid(model.apply({"params": p}, b, items)))

  def evaluate(params, epoch):
    out = {}
    for split, prefix in (("select", "valid/"), ("test", "")):
      ex = parts[split]
      probs = np.concatenate([np.asarray(predict(params, b))
                              for b in expert_examples.eval_batches(ex, c.evals.batch_size)])[:len(ex["cand"])]
      m = metrics.surface_task_metrics(
          _full(probs, tasks, spec.num_tasks), _full(ex["labels"], tasks, spec.num_tasks),
          _full(ex["label_valid"], tasks, spec.num_tasks), np.full(len(probs), surface), spec)
      m["ne_mean"] = float(np.mean([v for k, v in m.items() if k.startswith("ne/")]))
      out.update({prefix + k: v for k, v in m.items()})
    return out

  batches, steps = expert_examples.train_batches(parts["fit"], c.input.batch_size, c.seed,
                                                 c.num_epochs)
  _, final, report = train_loop(c, workdir, init=init, train_step=train_step, batches=batches,
                                steps_per_epoch=steps, evaluate=evaluate,
                                select=("valid/ne_mean", "min"),
                                desc=f"{data.name} expert {spec.surfaces[surface]} {c.model.carrier}")
  report.close()
  return final


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c, t0 = config, time.time()
  load_data = functools.cache(lambda: fm_train.load_data(c.input))
  ensure_taes(c, load_data)  # fails fast, before the data are read, if no TAEs can be had
  data = load_data()
  spec = data.spec
  rows = expert_examples.load_rows(c.tae.store, c.tae.fm_version)
  vocab = padded_vocab(data.num_items, c.mesh.model)
  items = fm_train.item_table(data, vocab)
  names = list(c.surfaces) or list(spec.surfaces)
  unknown = set(names) - set(spec.surfaces)
  if unknown:
    raise ValueError(f"surfaces {sorted(unknown)} are not in {data.name}: expected {spec.surfaces}")
  results, steps = {}, 0
  for name in names:
    s = spec.surfaces.index(name)
    ex = expert_examples.surface_examples(data, rows, s, c.input.short_len)
    parts = expert_examples.partition(ex, c.input.select_fraction)
    final = train_surface(c, os.path.join(workdir, name), data, parts, s, items, vocab)
    results.update({k: v for k, v in final.items() if k.startswith(("ne/", "auc/", "calibration/",
                                                                     "count/"))})
    results[f"epoch/{name}"], steps = final["epoch"], steps + final["steps"]
  test = rows["split"] == tae_store.SPLIT_IDS["test"]
  one_stage = metrics.surface_task_metrics(rows["fm_probs"][test], rows["labels"][test],
                                           rows["label_valid"][test], rows["surface"][test], spec,
                                           spec.fm_tasks)
  results.update({f"fm/{k}": v for k, v in one_stage.items()
                  if k.split("/")[1] in names})
  results["ne_mean"] = float(np.mean([v for k, v in results.items() if k.startswith("ne/")]))
  results.update(dataset=data.name, carrier=c.model.carrier, kd_weight=c.kd_weight,
                 fm_version=c.tae.fm_version, surfaces=names, tasks=list(spec.tasks),
                 fm_tasks=[t for t, m in zip(spec.tasks, spec.fm_tasks) if m],
                 selected_by="valid/ne_mean on held-out users (best epoch)",
                 wall_s=round(time.time() - t0, 2), steps=steps, config=c.to_dict())
  reporting.write_results(workdir, results)
  return results
