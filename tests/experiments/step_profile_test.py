"""`step_profile.py --ops`: a traced function's time, by kind of compiled operation."""

import re

import jax
import jax.numpy as jnp

from experiments.bench import step_profile


def fn(a, i, g):
  looped = jax.lax.fori_loop(0, 2, lambda _, x: jnp.tanh(x @ a), a)
  return looped.sum() + jnp.take(a, i, axis=0).sum(), jnp.zeros(64).at[i].add(g)


ARGS = (jnp.ones((64, 64)) / 64, jnp.arange(32) % 64, jnp.ones(32))


def test_every_operation_gets_its_kind_and_loops_are_timed_inside():
  hlo = jax.jit(fn).lower(*ARGS).compile().as_text()
  kinds = step_profile.hlo_kinds(hlo)
  loops = re.findall(r"%([\w.]+) = .* while\(", hlo)
  by_kind = {}
  for kind, _, source in kinds.values():
    by_kind.setdefault(kind, []).append(source)
  assert any("dot_general" in s for s in by_kind["matmul (+ fused)"])
  assert any("scatter" in s for s in by_kind["scatter"])
  assert any("_take" in s for s in by_kind["gather"])
  assert any("broadcast_in_dim" in s for s in by_kind["copy, slice, transpose"])
  assert loops and not set(loops) & set(kinds)  # a loop is timed by what runs inside it


def test_the_breakdown_splits_the_traced_wall_time():
  wall, per_kind, top = step_profile.op_breakdown(fn, ARGS, reps=2, top=3)
  assert wall > 0 and per_kind["matmul (+ fused)"] > 0 and per_kind["scatter"] > 0
  assert len(top) == 3 and top[0][0] >= top[1][0] >= top[2][0] > 0
  assert sum(per_kind.values()) <= wall  # concurrent operations share the wall time
