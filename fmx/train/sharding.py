"""One device mesh with named axes (`data`, `model`) and logical axis rules.

Parameters carry logical axis names (`fmx.models.axes`); one table, built from the config's
`mesh` section, maps each name to mesh axes (or None: replicated), as MaxText and flax's lm1b
do. The same table shards the optimizer moments, which `optax` creates with the parameters'
names. A rule that cannot apply (a name without a rule, an unknown mesh axis, a dimension the
mesh axes do not divide, a parameter without names) raises `ShardingError`; nothing is
replicated silently. A single device is a 1x1 mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmx import distributed
from fmx.models import axes

ITEM_TABLE = ("replicated", "rows", "columns")


class ShardingError(ValueError):
  """The mesh rules cannot shard a parameter as asked; the message names it and the rule."""


def make_mesh(data: int = -1, model: int = 1) -> Mesh:
  devices = jax.devices()
  if data == -1:
    if len(devices) % model:
      raise ValueError(f"mesh.model={model} does not divide the {len(devices)} devices")
    data = len(devices) // model
  if data * model > len(devices):
    raise ValueError(f"mesh {data}x{model} needs {data * model} devices; {len(devices)} available "
                     "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N)")
  return Mesh(np.array(devices[: data * model]).reshape(data, model), ("data", "model"))


def logical_rules(mesh_config) -> dict:
  """The logical name -> mesh axes table of a config's `mesh` section: `item_table` places the
  item tables (replicated, rows or columns over `model`), `fsdp` shards the model width of
  dense parameters over `data`, and `rules` (pairs) adds or replaces entries."""
  table = mesh_config.get("item_table", "rows")
  if table not in ITEM_TABLE:
    raise ShardingError(f"mesh.item_table={table!r}: expected one of {ITEM_TABLE}")
  rules = {"batch": "data",
           axes.VOCAB: "model" if table == "rows" else None,
           axes.VOCAB_EMBED: "model" if table == "columns" else None,
           axes.EMBED: "data" if mesh_config.get("fsdp", False) else None,
           axes.MLP: None, axes.CATEGORY: None, axes.TABLE: None}
  for pair in mesh_config.get("rules", ()):
    if len(pair) != 2:
      raise ShardingError(f"mesh.rules entry {pair!r}: expected (logical name, mesh axis or None)")
    rules[pair[0]] = pair[1]
  return rules


def _mesh_axes(rule) -> tuple[str, ...]:
  return () if rule is None else ((rule,) if isinstance(rule, str) else tuple(rule))


def spec(names, shape, mesh: Mesh, rules: dict, what: str) -> P:
  """The PartitionSpec of an array of `shape` whose axes are named `names`."""
  if names and len(names) != len(shape):
    raise ShardingError(f"{what}: {len(names)} logical names {names} for shape {shape}")
  out, used = [], set()
  for dim, name in zip(shape, names):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ShardingError(f"{what}: logical axis {name!r} has no rule; add it to mesh.rules "
                          f"(e.g. ({name!r}, None) to replicate it)")
    mesh_axes = _mesh_axes(rules[name])
    unknown = [a for a in mesh_axes if a not in mesh.shape]
    if unknown:
      raise ShardingError(f"{what}: mesh.rules maps {name!r} to {unknown}, not an axis of the "
                          f"mesh {dict(mesh.shape)}")
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if dim % size:
      raise ShardingError(f"{what} {tuple(shape)}: axis {name!r} of size {dim} cannot be split "
                          f"over {mesh_axes} ({size} devices); change mesh.rules, "
                          "mesh.item_table or the mesh shape")
    if used & set(mesh_axes):
      raise ShardingError(f"{what}: mesh axis {sorted(used & set(mesh_axes))} used twice")
    used |= set(mesh_axes)
    out.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
  return P(*out)


def tree_shardings(boxed, mesh: Mesh, rules: dict):
  """NamedSharding per leaf of `boxed` (a tree of arrays or ShapeDtypeStructs whose parameters
  are boxed with logical names, as `model.init` returns them), for the unboxed tree."""

  def leaf(path, x):
    what = jax.tree_util.keystr(path)
    if isinstance(x, nn.LogicallyPartitioned):
      return NamedSharding(mesh, spec(tuple(x.names), x.value.shape, mesh, rules, what))
    if getattr(x, "ndim", 0):
      raise ShardingError(f"{what} {tuple(x.shape)} has no logical axis names: create it with "
                          "fmx.models.axes (nn.with_logical_partitioning)")
    return NamedSharding(mesh, P())  # scalars: step counters

  return jax.tree_util.tree_map_with_path(
      leaf, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
  """Batches split on their leading axis as the rule of `batch` says."""
  batch_axes = _mesh_axes(rules.get("batch", "data"))
  if not batch_axes:
    return replicated(mesh)
  return NamedSharding(mesh, P(batch_axes[0] if len(batch_axes) == 1 else batch_axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a job's arrays live: the mesh of a config's `mesh` section and its logical rules."""

  mesh: Mesh
  rules: dict

  @classmethod
  def of(cls, mesh_config) -> "Layout":
    return cls(make_mesh(mesh_config.data, mesh_config.model), logical_rules(mesh_config))

  def shardings(self, boxed):
    return tree_shardings(boxed, self.mesh, self.rules)

  @property
  def batch(self) -> NamedSharding:
    return batch_sharding(self.mesh, self.rules)

  @property
  def batch_devices(self) -> int:
    """How many ways a batch's leading axis is split."""
    return int(np.prod([self.mesh.shape[a] for a in _mesh_axes(self.rules.get("batch", "data"))]))

  def process_rows(self, n: int) -> slice | None:
    """The rows of an `n`-row batch that this process builds (None: all of them)."""
    return distributed.process_rows(self.batch, n)

  @property
  def replicated(self) -> NamedSharding:
    return replicated(self.mesh)

  def params(self, init: Callable):
    """The shardings of the parameters of a train state `init(rng)` builds (boxed)."""
    return self.shardings(jax.eval_shape(init, jax.random.PRNGKey(0))).params

  def jit_eval(self, fn: Callable, param_shardings):
    """`fn(params, batch)` jitted with parameters as trained, the batch split like training
    batches and the outputs gathered on every device: reductions over a sharded item table
    (ranks, scores) are merged by XLA's collectives. Host batches become global arrays."""
    jitted = jax.jit(fn, in_shardings=(param_shardings, self.batch), out_shardings=self.replicated)
    return lambda params, batch: jitted(params, distributed.global_batch(batch, self.batch))


def compile_train(init: Callable, train_step: Callable, layout: Layout, rng: jax.Array):
  """(abstract state, its shardings, jitted init, jitted step) of a job on `layout`: the state
  placed by the logical rules, (host) batches split over `data`, the step donating its state.
  `step(state, batch, rng, local)`: with `local`, the batch holds only this process's rows."""
  boxed = jax.eval_shape(init, rng)  # parameters (and their moments) with logical names
  state_sh = layout.shardings(boxed)
  init_fn = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sh)
  jitted = jax.jit(train_step, in_shardings=(state_sh, layout.batch, layout.replicated),
                   out_shardings=(state_sh, layout.replicated), donate_argnums=0)
  step_fn = lambda state, batch, rng, local=False: jitted(
      state, distributed.global_batch(batch, layout.batch, local), rng)
  return nn.meta.unbox(boxed), state_sh, init_fn, step_fn
