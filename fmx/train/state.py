"""The train state, the optimizer, and the one gradient step every job takes."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW from the `optimizer` sub-config, with an optional linear warm-up."""
  schedule = optax.warmup_constant_schedule(0.0, c.lr, c.warmup_steps) if c.warmup_steps else c.lr
  return optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(jax.numpy.zeros((), jax.numpy.int32), params, tx.init(params))


def gradient_step(state: TrainState, tx: optax.GradientTransformation, loss_fn: Callable,
                  batch, rng: jax.Array) -> tuple[TrainState, dict]:
  """One AdamW step on `loss_fn(params, batch, rng) -> (loss, {name: scalar})`; the dropout
  and sampling key is `rng` folded with the step, so a resumed run draws the same keys.
  Returns the new state and the scalars (loss, grad_norm and the loss's own)."""
  rng = jax.random.fold_in(rng, state.step)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), {
      "loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
