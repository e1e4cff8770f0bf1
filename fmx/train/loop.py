"""The training loop every job shares, over a seekable source (`fmx.data.source`).

It jits the train step over the mesh with donation, checkpoints the state together with the
source position and the run's config in one verified Orbax checkpoint (at every epoch end,
every `checkpoint_every_steps`, on SIGINT/SIGTERM and at the end), evaluates every
`evals.every_epochs` epochs and/or `evals.every_steps` steps, keeps the best evaluation, and
reports progress with an ETA, metrics.jsonl and TensorBoard. A run never lies: a non-finite
loss or score stops it before anything is saved; a resumed run checks the config and data
that produced its checkpoint and rewinds metrics.jsonl to the restored step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from fmx import distributed, files
from fmx.configs import common
from fmx.runtime import checkpoint
from fmx.train import reporting, sharding
from fmx.train.state import TrainState


class RunError(RuntimeError):
  """A run that must stop; the message says why and what to do (exit 2, no traceback)."""


class NonFiniteError(RunError):
  pass


class Stopped(RunError):
  """SIGINT/SIGTERM: the state was checkpointed; the message says where to resume."""


def require_finite(values, what: str) -> None:
  """Raises `NonFiniteError` if `values` (an array or scalar) holds NaN or inf."""
  bad = ~np.isfinite(np.asarray(values, np.float64))
  if bad.any():
    raise NonFiniteError(f"{int(bad.sum())} non-finite {what}")


def fault_point(name: str, step: int) -> None:
  """Test hook: `FMX_FAULT=name:step[:SIGNAL]` sends this process SIGNAL (default SIGKILL) at
  that moment: "compile" (before the first step), "step" (after a step), "after_eval" (between
  an evaluation and its checkpoint), "checkpoint" (while a checkpoint is being written)."""
  fault = os.environ.get("FMX_FAULT", "").split(":")
  if fault[:2] == [name, str(step)]:
    os.kill(os.getpid(), getattr(signal, fault[2] if len(fault) > 2 else "SIGKILL"))


@contextlib.contextmanager
def stop_requests():
  """Turns the first SIGINT/SIGTERM into a request (a list that gets the signal's name) that
  the loop honours after the current step; a second one interrupts at once."""
  requested: list[str] = []
  previous = {}

  def handler(signum, frame):
    if requested:
      signal.signal(signum, previous[signum])
      raise KeyboardInterrupt
    requested.append(signal.Signals(signum).name)

  for sig in (signal.SIGINT, signal.SIGTERM):
    previous[sig] = signal.signal(sig, handler)
  try:
    yield requested
  finally:
    for sig, h in previous.items():
      signal.signal(sig, h)


def _plain(c: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(c.to_dict()))


def check_resume(c, workdir: str, step: int, meta: dict, abstract: dict, fingerprint: str) -> dict:
  """Compares the checkpoint's config, shapes and data with this run's. Returns the changes
  accepted by `resume_anyway`; raises `RunError` naming the keys otherwise."""
  old, new = common.flatten(meta.get("config", {})), common.flatten(_plain(c))
  changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)}
  listing = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items()) or "none"
  saved_shapes = meta.get("shapes", {})
  for item, tree in abstract.items():
    now = checkpoint.shapes(tree)
    if saved_shapes.get(item) != now:
      path = next((p for p in now if saved_shapes.get(item, {}).get(p) != now[p]), item)
      raise RunError(f"{workdir}: its checkpoint (step {step}) has other shapes than this config "
                     f"({item}{path}: {saved_shapes.get(item, {}).get(path)} vs {now.get(path)}); "
                     f"changed config: {listing}. Use a fresh --workdir for a new model.")
  blocking = {k: v for k, v in changed.items() if not k.startswith(common.RESUMABLE_CHANGES)}
  if meta.get("fingerprint", fingerprint) != fingerprint:
    blocking["data"] = (meta["fingerprint"][:12], fingerprint[:12])
  if blocking and not c.get("resume_anyway", False):
    what = ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in blocking.items())
    raise RunError(f"{workdir} was trained (to step {step}) with {what}: rerun with the same "
                   "values, use a fresh --workdir, or add --config.resume_anyway=True")
  return blocking


def train_loop(c: ml_collections.ConfigDict, workdir: str, **kwargs):
  """Trains over `source` (resuming from `workdir`) and returns (state, final, reporter).

  `init(rng) -> TrainState`; `train_step(state, batch, rng) -> (state, scalars)` with a
  `loss`; `evaluate(params, epoch) -> {name: value}`; `select = (metric, "max" | "min")` picks
  the reported evaluation (None: the last). `final` is that evaluation plus `epoch`, `wall_s`,
  `steps`, the source `position` and `config_changes` (what `resume_anyway` let change). `fingerprint` identifies
  the training data. `on_batch(state, batch, position)`, if given, sees the state before each
  step (streaming jobs evaluate and publish there). One loop at a time holds `workdir` (an OS lock).
  """
  with distributed.primary_only(files.exclusive(os.path.join(workdir, ".loop.lock"),
                                                f"workdir {workdir}")):
    return _train_loop(c, workdir, **kwargs)


def _train_loop(c: ml_collections.ConfigDict, workdir: str, *, init: Callable,
                train_step: Callable, source, evaluate: Callable,
                select: tuple[str, str] | None, desc: str, fingerprint: str = "",
                on_batch: Callable | None = None):
  t0 = time.time()
  per_epoch = source.steps_per_epoch
  total = source.total_steps if source.total_steps is not None else sys.maxsize
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(c.seed))
  abstract, state_sh, init_fn, step_fn = sharding.compile_train(
      init, train_step, sharding.Layout.of(c.mesh), init_rng)
  wanted = checkpoint_items(checkpoint_abstract(abstract, state_sh))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  accepted = {}

  def check(step, meta):
    accepted.update(check_resume(c, workdir, step, meta, wanted, fingerprint))
    return wanted

  restored = ckpt.restore(check)
  if restored is None:
    state = init_fn(init_rng)
    meta = {"best": None, "latest": None, "position": source.start(), "config_changes": []}
  else:
    step, items, meta = restored
    state = TrainState(items["train"]["step"], items["params"], items["train"]["opt_state"])
    if accepted:
      meta["config_changes"].append({"step": step, "changed": accepted})
      checkpoint.warn(f"resuming despite changes: {accepted}")
    print(f"fmx: resumed from step {step} in {workdir}", file=sys.stderr)
  step = int(state.step)
  if step > total:
    raise RunError(f"{workdir} holds a checkpoint at step {step}, past this config's {total} steps: "
                   "raise --config.num_epochs, or use a fresh --workdir")
  report = reporting.RunReporter(workdir, resume_step=step)
  rows = getattr(source, "rows", None)  # optional: a source without it yields whole batches
  if jax.process_count() > 1 and rows is not None:
    print(f"fmx: process {jax.process_index()} of {jax.process_count()} builds rows "
          f"{rows.start}:{rows.stop} of each batch", file=sys.stderr)
  params_finite = jax.jit(lambda p: jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))
  epoch_of = (lambda s: s // per_epoch) if per_epoch else (lambda s: 0)
  pending: list[tuple[int, jax.Array]] = []  # (step, loss) not yet checked

  def check_losses():
    if pending:
      losses = np.asarray(jnp.stack([l for _, l in pending]))
      bad = np.flatnonzero(~np.isfinite(losses))
      if bad.size:
        raise NonFiniteError(
            f"non-finite training loss ({losses[bad[0]]}) at step {pending[bad[0]][0]}; the run "
            f"stopped without saving it (newest checkpoint: {(ckpt.steps() or ['none'])[0]}). Lower "
            "--config.optimizer.lr or fix the loss settings, then rerun")
      pending.clear()

  def run_eval():
    check_losses()
    try:
      out = evaluate(state.params, epoch_of(step))
    except NonFiniteError as e:
      raise NonFiniteError(f"evaluation at step {step}: {e}; the run stopped without saving "
                           "this state. Lower --config.optimizer.lr or fix the loss settings") from None
    report.evaluation(step, epoch_of(step), time.time() - t0, out)
    meta["latest"] = {"step": step, "epoch": epoch_of(step), **out}
    if select is not None:
      key, mode = select
      best = meta["best"]
      if best is None or (out[key] > best[key] if mode == "max" else out[key] < best[key]):
        meta["best"] = dict(meta["latest"])
    return out

  def save():
    check_losses()
    if not bool(params_finite(state.params)):
      raise NonFiniteError(f"non-finite parameters after step {step}; the run stopped without "
                           f"saving them (newest checkpoint: {(ckpt.steps() or ['none'])[0]}). "
                           "Lower --config.optimizer.lr or fix the loss settings, then rerun")
    ckpt.save(step, checkpoint_items(state), {**meta, "config": _plain(c),
                                               "fingerprint": fingerprint})
    fault_point("checkpoint", step)

  bar = tqdm.tqdm(total=None if total == sys.maxsize else total, initial=step, desc=desc,
                  unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=2.0,
                  disable=not c.progress or not distributed.is_primary())
  epoch_t, first = time.time(), True
  with stop_requests() as stop, contextlib.closing(ckpt):
    for batch, position in (source.iterate(meta["position"]) if step < total else ()):
      fault_point("compile" if first else "step", step)
      first = False
      if on_batch is not None:
        on_batch(state, batch, position)
      state, scalars = step_fn(state, batch, train_rng, rows is not None)
      step, meta["position"] = step + 1, position
      pending.append((step, scalars["loss"]))
      bar.update(1)
      if step % c.log_every_steps == 0:
        check_losses()
        values = {k: float(v) for k, v in scalars.items()}
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        report.scalars(step, {f"train/{k}": v for k, v in values.items()})
      epoch_end = bool(per_epoch) and step % per_epoch == 0
      if epoch_end:
        report.scalars(step, {"train/epoch_seconds": time.time() - epoch_t})
        epoch_t = time.time()
      if ((epoch_end and (epoch_of(step) % c.evals.every_epochs == 0 or step == total))
          or (c.evals.get("every_steps", 0) and step % c.evals.every_steps == 0)):
        out = run_eval()
        bar.write(f"step {step} (epoch {epoch_of(step)}): "
                  + " ".join(f"{k}={out[k]:.4f}" for k in out if k in c.evals.show))
        fault_point("after_eval", step)
      every = c.get("checkpoint_every_steps", 0)
      if epoch_end or (every and step % every == 0) or step == total or stop:
        save()
      if stop or step >= total:
        break
    bar.close()
    check_losses()
    if stop:
      raise Stopped(f"stopped by {stop[0]} at step {step}; checkpoint saved in "
                    f"{workdir}/checkpoints: rerun the same command to resume")
    if meta["latest"] is None or meta["latest"]["step"] != step:  # no evaluation of this state
      run_eval()
      save()
  final = dict(meta["best"] if select is not None and meta["best"] else meta["latest"])
  final.pop("step", None)
  final.update(wall_s=round(time.time() - t0, 2), steps=step, position=meta["position"],
               config_changes=meta["config_changes"])
  return state, final, report


def checkpoint_items(state: TrainState) -> dict:
  """The checkpoint items of a state: `params` alone (what a pinned FM restores) and `train`."""
  return {"params": state.params, "train": {"step": state.step, "opt_state": state.opt_state}}


def checkpoint_abstract(abstract: TrainState, shardings: TrainState) -> TrainState:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
