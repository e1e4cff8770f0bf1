"""Foundation-model trainer: MTML ranking on the cross-surface view, with target-aware
embeddings, and the per-surface non-sequential baseline trained on the same windows.

`train_and_evaluate(config, workdir)` runs for `job="fm"`: it trains the FM (checkpoints in
`workdir`), then, if `config.baseline.train`, the baseline (in `workdir/baseline`), and writes
`results.json` with `ne/`, `auc/`, `calibration/` per surface and task for both, and `rel_ne/`:
the FM's NE relative to the baseline's, in percent (negative is better).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fmx.data import cross_surface, ranking, synthetic_surfaces
from fmx.models.baselines import NonSequential
from fmx.models.foundation import FoundationModel
from fmx.train import losses, metrics, reporting
from fmx.train.loop import TrainState, make_optimizer, padded_vocab, train_loop


def load_data(c: ml_collections.ConfigDict) -> cross_surface.CrossSurfaceData:
  if c.dataset == "ml-1m":
    return cross_surface.load_ml1m(c.data_dir, c.manual_dir)
  if c.dataset == "synthetic":
    return synthetic_surfaces.generate(**c.synthetic.to_dict())
  raise ValueError(f"input.dataset={c.dataset!r}: expected 'ml-1m' or 'synthetic'")


def item_table(data: cross_surface.CrossSurfaceData, vocab: int) -> dict:
  pad = lambda a: np.concatenate([a, np.zeros((vocab - len(a),) + a.shape[1:], a.dtype)])
  return {"genres": jnp.asarray(pad(data.item_genres), jnp.float32),
          "year": jnp.asarray(pad(data.item_year)), "content": jnp.asarray(pad(data.item_content))}


def build_model(c, data, vocab):
  spec = data.spec
  if c.model.kind == "fm":
    return FoundationModel(c.model, vocab, len(spec.surfaces), spec.num_tasks)
  if c.model.kind == "nonseq":
    return NonSequential(c.model, vocab, len(spec.surfaces), spec.num_tasks, data.num_users)
  raise ValueError(f"model.kind={c.model.kind!r}: expected 'fm' or 'nonseq'")


def setup(c, data) -> tuple:
  """(model, items): the `c.model.kind` model and the padded item table it reads."""
  vocab = padded_vocab(data.num_items, c.mesh.model)
  return build_model(c, data, vocab), item_table(data, vocab)


def make_steps(c, model, items, spec, task_mask):
  """(init, train_step, predict) as pure functions for `model`; `task_mask` selects the tasks
  the loss sees (the FM's tasks: never the held-out one)."""
  tx = make_optimizer(c.optimizer)
  weights = jnp.asarray(spec.weights * task_mask, jnp.float32)
  n, t = c.input.max_history + c.input.num_candidates, c.input.num_candidates

  def init(rng):
    dummy = {k: jnp.zeros((1, n), jnp.int32) for k in ("ids", "surfaces", "actions", "positions")}
    dummy.update(timestamps=jnp.zeros((1, n), jnp.int32), query_times=jnp.zeros((1, n), jnp.int32),
                 lengths=jnp.ones((1,), jnp.int32), num_targets=jnp.ones((1,), jnp.int32),
                 cand_index=jnp.zeros((1, t), jnp.int32), request_time=jnp.zeros((1,), jnp.int32),
                 user=jnp.zeros((1,), jnp.int32))
    params = model.init(rng, dummy, items)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  def loss_fn(params, batch, rng):
    _, logits = model.apply({"params": params}, batch, items, train=True, rngs={"dropout": rng})
    return losses.mtml_bce(logits, batch["labels"], batch["label_valid"], weights)

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    scalars = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    scalars.update({f"bce/{name}": per_task[i] for i, name in enumerate(spec.tasks)})
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), scalars

  def predict(params, batch):
    return jax.nn.sigmoid(model.apply({"params": params}, batch, items)[1])

  return init, train_step, jax.jit(predict)


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
  model, items = setup(c, data)
  init, train_step, predict = make_steps(c, model, items, data.spec, task_mask)
  H, T = c.input.max_history, c.input.num_candidates
  batches, steps = ranking.train_batches(data, H, T, c.input.batch_size, c.seed, c.num_epochs,
                                         c.input.windows_per_user)

  def evaluate(params, epoch):
    out = {}
    for split in ("valid", "test"):
      col = collect(predict, params, ranking.eval_batches(data, split, H, T, c.evals.batch_size))
      m = metrics.surface_task_metrics(col["probs"], col["labels"], col["valid"], col["surfaces"],
                                       data.spec, task_mask)
      ne = [v for k, v in m.items() if k.startswith("ne/")]
      m["ne_mean"] = float(np.mean(ne))
      out.update({(k if split == "test" else f"valid/{k}"): v for k, v in m.items()})
    return out

  state, final, report = train_loop(c, workdir, init=init, train_step=train_step, batches=batches,
                                    steps_per_epoch=steps, evaluate=evaluate,
                                    select=("valid/ne_mean", "min"), desc=f"{data.name} {c.model.kind}")
  report.close()
  return final, state.params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c = config
  data = load_data(c.input)
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
