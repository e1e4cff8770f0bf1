"""The training loop every job shares: mesh and shardings, jitted train step with donation,
Orbax checkpoints with the stream position, periodic evaluation, best-epoch selection, progress
with ETA on stderr, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

import flax
import grain
import jax
import ml_collections
import optax
import tqdm

from fmx.train import checkpoint, reporting, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def padded_vocab(num_items: int, shards: int = 1) -> int:
  """Item table rows: padding row 0 + items, rounded up to a multiple of 8 that `shards`
  (the mesh's `model` axis, over which the rows are split) divides evenly."""
  multiple = math.lcm(8, shards)
  return -(-(num_items + 1) // multiple) * multiple


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW from the `optimizer` sub-config, with an optional linear warm-up."""
  schedule = optax.warmup_constant_schedule(0.0, c.lr, c.warmup_steps) if c.warmup_steps else c.lr
  return optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)


def train_loop(c: ml_collections.ConfigDict, workdir: str, *, init: Callable, train_step: Callable,
               batches: grain.MapDataset, steps_per_epoch: int, evaluate: Callable,
               select: tuple[str, str] | None, desc: str):
  """Trains `c.num_epochs` epochs (resuming from `workdir`) and returns (state, final, reporter).

  `init(rng) -> TrainState`; `train_step(state, batch, rng) -> (state, scalars)`;
  `evaluate(params, epoch) -> {name: value}` runs every `c.evals.every_epochs` and at the end;
  `select = (metric, "max" | "min")` picks the reported epoch (None: the last one). `final` is
  that evaluation plus its `epoch`.
  """
  t0 = time.time()
  total_steps = steps_per_epoch * c.num_epochs
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(c.seed))
  abstract = jax.eval_shape(init, init_rng)
  state_sh = sharding.tree_shardings(abstract, mesh, c.mesh.rules)
  step_fn = jax.jit(train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh),
                                              sharding.replicated(mesh)),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  ckpt = checkpoint.Checkpointer(workdir)
  restored = ckpt.restore(checkpoint.abstract_like(abstract, state_sh))
  if restored is None:
    state, meta = jax.jit(init, out_shardings=state_sh)(init_rng), {"best": None}
  else:
    state, meta = restored
    print(f"fmx: resumed from step {int(state.step)} in {workdir}", file=sys.stderr)
  report = reporting.RunReporter(workdir)

  def run_eval(epoch: int) -> dict:
    out = evaluate(state.params, epoch)
    report.evaluation(int(state.step), epoch, time.time() - t0, out)
    if select is not None:
      key, mode = select
      best = meta["best"]
      if best is None or (out[key] > best[key] if mode == "max" else out[key] < best[key]):
        meta["best"] = {"epoch": epoch, **out}
    return out

  start = int(state.step)
  stream = batches[start:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  bar = tqdm.tqdm(total=total_steps, initial=start, desc=desc, unit="step", file=sys.stderr,
                  dynamic_ncols=True, mininterval=2.0, disable=not c.progress)
  latest, epoch_t = None, time.time()
  for step, batch in zip(range(start, total_steps), stream):
    state, scalars = step_fn(state, batch, train_rng)
    bar.update(1)
    if (step + 1) % c.log_every_steps == 0:
      scalars = {k: float(v) for k, v in scalars.items()}
      bar.set_postfix(loss=f"{scalars['loss']:.4f}")
      report.scalars(step + 1, {f"train/{k}": v for k, v in scalars.items()})
    if (step + 1) % steps_per_epoch == 0:
      epoch = (step + 1) // steps_per_epoch
      report.scalars(step + 1, {"train/epoch_seconds": time.time() - epoch_t})
      if epoch % c.evals.every_epochs == 0 or epoch == c.num_epochs:
        latest = run_eval(epoch)
        shown = [k for k in latest if k in c.evals.show]
        bar.write(f"epoch {epoch}: " + " ".join(f"{k}={latest[k]:.4f}" for k in shown))
      ckpt.save(step + 1, state, meta)
      epoch_t = time.time()
  bar.close()
  ckpt.close()
  if latest is None:  # resumed after the last step: evaluate the restored state once
    latest = run_eval(int(state.step) // steps_per_epoch)
  if select is not None and meta["best"]:
    final = meta["best"]
  else:
    final = {"epoch": int(state.step) // steps_per_epoch, **latest}
  final = {**final, "wall_s": round(time.time() - t0, 2), "steps": int(state.step)}
  return state, final, report
