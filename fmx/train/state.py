"""The train state, the optimizer, and the one gradient step every job takes."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fmx.configs.common import COMPUTE_DTYPES


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


def cast_floats(params, dtype: str):
  """`params` with every floating-point leaf in `dtype` (a name from COMPUTE_DTYPES)."""
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"model.compute_dtype={dtype!r}: expected one of {COMPUTE_DTYPES}")
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                      params)


def gradient_step(state: TrainState, tx: optax.GradientTransformation, loss_fn: Callable,
                  batch, rng: jax.Array, compute_dtype: str = "float32") -> tuple[TrainState, dict]:
  """One AdamW step on `loss_fn(params, batch, rng) -> (loss, {name: scalar})`; the dropout
  and sampling key is `rng` folded with the step, so a resumed run draws the same keys.
  `compute_dtype="bfloat16"` runs the model on a bfloat16 copy of the parameters (activations
  and matmuls in bfloat16; the losses take their inputs in float32), while the gradients, the
  optimizer and the master weights stay float32.
  Returns the new state and the scalars (loss, grad_norm and the loss's own)."""
  rng = jax.random.fold_in(rng, state.step)
  compute = lambda p, b, r: loss_fn(cast_floats(p, compute_dtype), b, r)
  (loss, aux), grads = jax.value_and_grad(compute, has_aux=True)(state.params, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), {
      "loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
