"""One run over several processes with JAX's distributed runtime (`jax.distributed`): the
hosts of a TPU pod slice, the nodes of a GPU cluster, or (for tests) CPU processes on localhost.

Every process runs the same command. Process 0, the primary, alone holds the workdir's locks and
writes its reports and `results.json`; Orbax writes each process's shards of a checkpoint and
commits it once. Batches are pure functions of (seed, step): every process knows the whole
batch's plan (its users, its length bucket) and builds, reads and transfers only the rows that
sit on its own devices (`process_rows`); no process waits on another's input.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               detect: bool = False) -> bool:
  """Joins the run's processes before any JAX computation; False (nothing done) for a
  single-process run. With `coordinator_address` (host:port of process 0), `num_processes` and
  `process_id` say who is who; with `detect`, JAX reads them from the cluster (TPU VM metadata,
  SLURM, Open MPI)."""
  if not coordinator_address and not detect:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; no-op on TPU/GPU
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id "
                       f"< --num_processes (got {num_processes}, {process_id})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  return True


def is_primary() -> bool:
  return jax.process_index() == 0


class PeerError(RuntimeError):
  """Another process failed at a point all processes must pass together."""


def all_or_none(name: str, fn):
  """`fn()` on every process; its result once every process has reached `name`. If any failed
  to, all raise: their own error where they have one, else a PeerError naming the processes
  that failed. (A process that raised alone would leave the others waiting for it forever.)"""
  error = result = None
  try:
    result = fn()
  except Exception as e:  # pylint: disable=broad-except
    error = e
  failed = []
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
  if error is not None:
    raise error
  if len(failed):
    raise PeerError(f"{name}: process(es) {[int(p) for p in failed]} failed; see their output")
  return result


def primary_only(context):
  """`context` (a lock, say) on the primary; nothing on the other processes."""
  return context if is_primary() else contextlib.nullcontext()


def process_rows(sharding, n: int) -> slice | None:
  """The rows of an `n`-row batch laid out by `sharding` that this process's devices hold, if
  they are one block of some of its rows; None if the process builds whole batches (one
  process, devices holding rows that are not one block, or no devices in the mesh)."""
  spans = sorted({(i.start or 0, n if i.stop is None else i.stop) for i, *_ in
                  sharding.addressable_devices_indices_map((n,)).values()})
  if jax.process_count() == 1 or not spans or any(
      start != stop for (_, stop), (start, _) in zip(spans, spans[1:])):
    return None
  return slice(spans[0][0], spans[-1][1])


def global_batch(tree, sharding, local: bool = False):
  """A host batch as global arrays laid out by `sharding`; each process transfers only its own
  devices' slices. With `local`, every leaf holds only this process's rows (`process_rows`);
  else the whole batch, the same on every process. The batch itself in a one-process run."""
  if jax.process_count() == 1:
    return tree
  if local:
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        tree)
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree)


def host_copy(tree):
  """The whole value of every array of `tree` on this host, also of arrays sharded over
  devices of other processes (gathered from them)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
