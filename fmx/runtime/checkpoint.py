"""Verified Orbax checkpoints: named pytrees plus JSON metadata, one step directory each.

Every step holds the items given to `save` (e.g. `params`, `train`) and `meta`, a JSON object
that records, besides what the caller puts there, a checksum of every item's arrays
(`fingerprint`) and their shapes. Orbax commits a step by renaming its temporary directory, so a
step killed mid-write is never listed; `restore` also checks every item it reads against the
recorded checksum, so flipped or truncated bytes are caught. A damaged step is named in a
warning and skipped (a writer moves it aside to `damaged-<step>`), and the next older step is
tried.

The checksum is computed where the shards live: each device hashes its own elements with their
global positions and XLA sums the hashes over the mesh, so no process gathers another's shards
(a 1B-row table is never copied to a host to be checked), and the same values restored onto
another mesh or process count have the same checksum. Steps written before it (a sha256 under
`sha256`) are still verified the old way.
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fmx import distributed
from fmx.hashing import mix32


class CheckpointError(RuntimeError):
  """No intact checkpoint can be had; the message names the directory and what to do."""


class Damaged(Exception):
  pass


def digest(tree) -> str:
  """sha256 over the dtype, shape and bytes of every leaf, in tree order, whatever mesh or
  processes hold it (the same value restored onto another mesh has the same digest)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(distributed.host_copy(tree)):
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # two independent 32-bit lanes: a 64-bit checksum


def _words(x):
  """The bits of every element of `x` as uint32 words, on a trailing axis (1 word, 2 for 64-bit)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)[..., None]
  bits = x.dtype.itemsize * 8
  if bits < 32:
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)[..., None]
  words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return words[..., None] if bits == 32 else words


@jax.jit
def _lane_sums(leaves):
  """Per leaf, per lane: the wrapping sum over elements of a hash of (position, bits)."""
  out = []
  for x in leaves:
    w = _words(x)
    lanes = []
    for seed in _SEEDS:
      h = jnp.full(w.shape, seed, jnp.uint32)
      for axis in range(w.ndim):
        h = mix32(h ^ jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis))
      lanes.append(jnp.sum(mix32(h ^ w), dtype=jnp.uint32))
    out.append(jnp.stack(lanes))
  return out


def fingerprint(tree) -> str:
  """A 64-bit checksum of the dtype, shape, positions and bits of every leaf of `tree`, in tree
  order, computed on the devices that hold each shard (see the module docstring)."""
  leaves = [x if isinstance(x, jax.Array) else np.asarray(x) for x in jax.tree.leaves(tree)]
  on_host = [not isinstance(x, jax.Array) for x in leaves]
  device_sums = iter(_lane_sums([x for x, host in zip(leaves, on_host) if not host]))
  with jax.default_device(jax.devices("cpu")[0]):  # host arrays are hashed where they are
    # 64-bit words as pairs of 32-bit ones: jax without x64 would truncate them
    host_sums = iter(_lane_sums([x[..., None].view(np.uint32) if x.dtype.itemsize == 8 else x
                                 for x, host in zip(leaves, on_host) if host]))
  sums = [next(host_sums if host else device_sums) for host in on_host]
  h = hashlib.sha256()
  for x, s in zip(leaves, sums):
    lanes = np.asarray(s.addressable_data(0))
    h.update(f"{np.dtype(x.dtype)}{tuple(x.shape)}{int(lanes[0]):08x}{int(lanes[1]):08x}".encode())
  return "fp64:" + h.hexdigest()[:16]


def checksums(meta: dict) -> dict[str, str]:
  """The per-item checksums a step's meta records (`sha256` in steps written before them)."""
  found = meta.get("checksums", meta.get("sha256"))
  if not isinstance(found, dict):
    raise Damaged("metadata without checksums")
  return found


def _verify(tree, want) -> bool:
  return (fingerprint(tree) if str(want).startswith("fp64:") else digest(tree)) == want


def shapes(tree) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(p): list(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_failed_read_noise(exc, obj=None) -> bool:
  """Errors that Orbax's pending reads of a damaged checkpoint raise after the restore failed
  (and the damage was named): their coroutines' finalizers and their event loop's callbacks."""
  name = getattr(obj, "__qualname__", "") or ""
  return ("_read_array_index_and_device_put" in name or "Event loop is closed" in str(exc)
          or "Encountered error while reading array index" in str(exc))


def _silence_failed_read_noise() -> None:
  """Keeps that noise off stderr (any time it surfaces); every other error still prints."""
  unraisable, thread = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda u: (None if _is_failed_read_noise(u.exc_value, u.object)
                                  else unraisable(u))
  threading.excepthook = lambda a: None if _is_failed_read_noise(a.exc_value) else thread(a)


def _finalize_quietly() -> None:
  """Collects the objects a failed restore left behind (their errors are silenced above)."""
  gc.collect()


_silence_failed_read_noise()


def warn(message: str) -> None:
  print(f"fmx: warning: {message}", file=sys.stderr)


def on_one_device(shapes):
  """The abstract tree (ShapeDtypeStructs on the first device) to restore `shapes` into, for
  readers of parameters that need no mesh (serving, the logging tier)."""
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), shapes)


class Checkpointer:
  """Saves asynchronously into `directory` (keeping `max_to_keep` steps; None keeps all) and
  restores the newest intact step. `read_only` never writes or moves anything (for readers of
  another run's checkpoints, such as the logging tier)."""

  def __init__(self, directory: str, max_to_keep: int | None = 2, read_only: bool = False):
    self.directory, self.read_only = os.path.abspath(directory), read_only
    self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=not read_only, read_only=read_only,
        create=not read_only))

  def steps(self) -> list[int]:
    """Committed steps, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def save(self, step: int, items: dict, meta: dict) -> None:
    """Saves asynchronously; an existing `step` is replaced (its metadata changed)."""
    if step in self.manager.all_steps():
      self.manager.wait_until_finished()
      self.manager.delete(step)
    meta = {**meta, "checksums": {k: fingerprint(v) for k, v in items.items()},
            "shapes": {k: shapes(v) for k, v in items.items()}}
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args))

  def delete(self, step: int) -> None:
    """Deletes committed `step` (after any save in flight has finished)."""
    self.manager.wait_until_finished()
    self.manager.delete(step)

  def read_meta(self, step: int) -> dict:
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # any unreadable metadata is damage  pylint: disable=broad-except
      raise Damaged(f"unreadable metadata ({type(e).__name__})") from None
    if not isinstance(meta, dict):
      raise Damaged("metadata is not an object")
    checksums(meta)
    return meta

  def read(self, step: int, abstract: dict, meta: dict) -> dict:
    """The items of `abstract` (trees of ShapeDtypeStructs with shardings), verified."""
    try:
      out, error = self.manager.restore(step, args=ocp.args.Composite(
          **{k: ocp.args.StandardRestore(v) for k, v in abstract.items()})), None
    except Exception as e:  # pylint: disable=broad-except
      out, error = None, f"unreadable arrays ({type(e).__name__})"
    if error:
      _finalize_quietly()  # Orbax leaves coroutines whose finalizers would print a traceback
      raise Damaged(error)
    for k in abstract:
      if not _verify(out[k], checksums(meta).get(k)):
        raise Damaged(f"checksum mismatch in '{k}'")
    return {k: out[k] for k in abstract}

  def restore(self, abstract, step: int | None = None):
    """(step, items, meta) of the newest intact step (or exactly `step`); None if there is
    no step at all. `abstract` is a dict of trees of ShapeDtypeStructs, or a function
    `(step, meta) -> dict` called before the arrays are read (it may check the meta and raise)."""
    for name in sorted(os.listdir(self.directory)):
      unfinished = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", name)
      if unfinished:
        warn(f"checkpoint step {unfinished[1]} in {self.directory} was never finished (the run "
             "stopped while saving it); ignored")
    candidates = self.steps() if step is None else [step]
    if step is not None and step not in self.manager.all_steps():
      raise CheckpointError(f"{self.directory}: no checkpoint of step {step} "
                            f"(steps present: {sorted(self.manager.all_steps())})")
    damaged = []
    for s in candidates:
      try:
        meta = self.read_meta(s)
        wanted = abstract(s, meta) if callable(abstract) else abstract
        return s, self.read(s, wanted, meta), meta
      except Damaged as e:
        damaged.append(s)
        warn(f"checkpoint step {s} in {self.directory} is damaged ({e}); "
             + ("trying an older step" if s != candidates[-1] else "no older step"))
        self._set_aside(s)
    if damaged:
      raise CheckpointError(f"{self.directory}: no intact checkpoint (damaged steps: {damaged}); "
                            "move the directory away to start over")
    return None

  def _set_aside(self, step: int) -> None:
    if self.read_only or not distributed.is_primary():
      return
    src = os.path.join(self.directory, str(step))
    os.replace(src, os.path.join(self.directory, f"damaged-{step}-{int(time.time())}"))
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
