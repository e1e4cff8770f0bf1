"""One device mesh with named axes (`data`, `model`) and path-regex partition rules.

Rules are `(regex, spec)` pairs matched (first hit wins) against a leaf's key path, so the same
table shards parameters and their optimizer moments; unmatched leaves are replicated. Batches
are split over `data`. A single device is a 1x1 mesh.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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


def tree_shardings(tree, mesh: Mesh, rules) -> object:
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) from the regex rules."""
  compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]

  def leaf_sharding(path, leaf):
    name = jax.tree_util.keystr(path)
    for pattern, spec in compiled:
      if pattern.search(name) and len(spec) == len(getattr(leaf, "shape", ())):
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
