"""Foundation-model trainer: MTML ranking on the cross-surface view, with target-aware
embeddings, and the per-surface non-sequential baseline trained on the same windows.

`train_and_evaluate(config, workdir)` runs for `job="fm"`: it trains the FM (checkpoints in
`workdir`), then, if `config.baseline.train`, the baseline (in `workdir/baseline`), and writes
`results.json` with `ne/`, `auc/`, `calibration/` per surface and task for both, and `rel_ne/`:
the FM's NE relative to the baseline's, in percent (negative is better).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from fmx.data import load as data_load, ranking
from fmx.data.source import EpochSource
from fmx.models.foundation import probabilities
from fmx.runtime import fm as fm_runtime
from fmx.train import losses, metrics, reporting, sharding
from fmx.train.loop import require_finite, train_loop
from fmx.train.state import gradient_step, init_state, make_optimizer


def make_steps(c, model, items, spec, task_mask):
  """(init, train_step, predict) as pure functions for `model`, predict jitted on the config's
  mesh; `task_mask` selects the tasks the loss sees (the FM's tasks: never the held-out one)."""
  tx = make_optimizer(c.optimizer)
  weights = jnp.asarray(spec.weights * task_mask, jnp.float32)

  def init(rng):
    return init_state(fm_runtime.init_params(c, model, items, rng, boxed=True), tx)

  def loss_fn(params, batch, rng):
    _, logits = model.apply({"params": params}, batch, items, train=True, rngs={"dropout": rng})
    loss, per_task = losses.mtml_bce(logits, batch["labels"], batch["label_valid"], weights)
    return loss, {f"bce/{name}": per_task[i] for i, name in enumerate(spec.tasks)}

  def train_step(state, batch, rng):
    return gradient_step(state, tx, loss_fn, batch, rng, c.model.compute_dtype)

  def predict(params, batch):
    return probabilities(model.apply({"params": params}, batch, items)[1])

  layout = sharding.Layout.of(c.mesh)
  return init, train_step, layout.jit_eval(predict, layout.params(init))


def collect(predict, params, batches) -> dict[str, np.ndarray]:
  """Flattened candidate-level predictions, labels, validity and surfaces of an eval split."""
  out = {"probs": [], "labels": [], "valid": [], "surfaces": []}
  for b in batches:
    real = np.arange(b["cand_index"].shape[1])[None, :] < b["num_targets"][:, None]
    out["probs"].append(np.asarray(predict(params, b))[real])
    out["labels"].append(b["labels"][real])
    out["valid"].append(b["label_valid"][real])
    out["surfaces"].append(np.take_along_axis(b["surfaces"], b["cand_index"], axis=1)[real])
  return {k: np.concatenate(v) for k, v in out.items()}


def train_one(c, workdir, data, task_mask):
  """Trains `c.model.kind` and returns (final metrics with the best-validation epoch, params)."""
  model, items = fm_runtime.build(c, data)
  init, train_step, predict = make_steps(c, model, items, data.spec, task_mask)
  H, T = c.input.max_history, c.input.num_candidates
  rows = sharding.Layout.of(c.mesh).process_rows(c.input.batch_size)
  batches, steps = ranking.train_batches(data, H, T, c.input.batch_size, c.seed, c.num_epochs,
                                         c.input.windows_per_user, rows)

  def evaluate(params, epoch):
    out = {}
    for split in ("valid", "test"):
      col = collect(predict, params, ranking.eval_batches(data, split, H, T, c.evals.batch_size))
      require_finite(col["probs"], "predictions")
      m = metrics.surface_task_metrics(col["probs"], col["labels"], col["valid"], col["surfaces"],
                                       data.spec, task_mask)
      m["ne_mean"] = metrics.ne_mean(m)
      out.update({(k if split == "test" else f"valid/{k}"): v for k, v in m.items()})
    return out

  state, final, report = train_loop(
      c, workdir, init=init, train_step=train_step, source=EpochSource(batches, steps, rows=rows),
      evaluate=evaluate, select=("valid/ne_mean", "min"), desc=f"{data.name} {c.model.kind}",
      fingerprint=data_load.fingerprint(data))
  report.close()
  return final, state.params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c = config
  data = data_load.load(c.input, "surfaces")
  fm_tasks = data.spec.fm_tasks.astype(np.float32)
  final, _ = train_one(c, workdir, data, fm_tasks)
  results = {k: v for k, v in final.items() if not k.startswith("valid/")}
  if c.baseline.train:
    b = ml_collections.ConfigDict(c.to_dict())
    b.model.kind, b.num_epochs = "nonseq", c.baseline.num_epochs
    base, _ = train_one(b, os.path.join(workdir, "baseline"), data, fm_tasks)
    for k, v in base.items():
      if k.startswith(("ne/", "auc/", "calibration/")):
        results[f"baseline/{k}"] = v
        if k.startswith("ne/"):
          results[f"rel_ne/{k[3:]}"] = 100.0 * (results[k] / v - 1.0)
    results["baseline/epoch"] = base["epoch"]
  results.update(dataset=data.name, surfaces=list(data.spec.surfaces), tasks=list(data.spec.tasks),
                 fm_tasks=[t for t, m in zip(data.spec.tasks, data.spec.fm_tasks) if m],
                 selected_by="valid/ne_mean (best epoch)", config=c.to_dict())
  reporting.write_results(workdir, results)
  return results
