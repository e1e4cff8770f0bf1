"""The FM and expert versions a service serves, where they come from, and their hot reload.

FM versions come from a HyperCast snapshot directory (a version is a published snapshot) or
from an FM workdir (a version is a checkpoint step). Experts come from an `expert_stream`
workdir (one checkpoint holds every surface's experts; its step is their version) or from an
`expert` workdir (`<surface>/checkpoints`, each surface at its own step). Every version is
restored off the request path, checked against the compiled models, and swapped in as a whole:
a request holds the `Served` it started with, so the old versions finish what they began.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmx.hypercast import expert_stream, snapshots
from fmx.models.embeddings import padded_vocab
from fmx.data.items import item_table
from fmx.models.expert import Expert, example_batch, from_config
from fmx.runtime import checkpoint, fm as fm_runtime


class VersionError(ValueError):
  """A source with nothing to serve, or a version that does not fit the served models."""


@dataclasses.dataclass(frozen=True)
class FMVersion:
  version: int
  params: dict
  config: ml_collections.ConfigDict

  @property
  def table(self) -> np.ndarray:
    """The frozen FM item-id table an expert of this FM version reads."""
    return self.params["item"]["embedding"]


@dataclasses.dataclass(frozen=True)
class ExpertVersion:
  version: int
  model: Expert
  params: dict
  short_len: int
  uses_table: bool  # an expert_stream follower: the FM item table is one of its inputs


@dataclasses.dataclass(frozen=True)
class Served:
  """What one request is served with: an FM version and every surface's expert."""

  fm: FMVersion
  experts: dict[str, ExpertVersion]


def _device_tree(tree):
  return jax.tree.map(jnp.asarray, tree)


class FMSource:
  """FM versions of a snapshot directory (`manifest.json`) or of an FM workdir (`checkpoints/`)."""

  def __init__(self, path: str, data):
    self.path, self.data = os.path.abspath(path), data
    self.snaps = (snapshots.Snapshots(path, read_only=True)
                  if os.path.exists(os.path.join(path, "manifest.json")) else None)
    if self.snaps is None and not os.path.isdir(os.path.join(path, "checkpoints")):
      raise VersionError(f"serve.fm={path}: neither a snapshot directory (manifest.json) nor an "
                         "FM workdir (checkpoints/); point it at DIR/snapshots of a HyperCast run "
                         "or at the workdir of a job=fm run")

  def newest(self) -> int | None:
    if self.snaps is not None:
      latest = self.snaps.latest()
      return latest["version"] if latest else None
    return newest_step(os.path.join(self.path, "checkpoints"))

  def load(self, version: int) -> FMVersion:
    if self.snaps is not None:
      entry = self.snaps.entry(version)
      params = self.snaps.params(version)
      return FMVersion(version, _device_tree(params), ml_collections.ConfigDict(entry["config"]))
    pinned = fm_runtime.restore(self.path, step=version, load_data=lambda _: self.data)
    return FMVersion(pinned.step, pinned.params, pinned.config)


def newest_step(directory: str) -> int | None:
  """The newest finished checkpoint step in `directory` (Orbax renames a step's directory to
  its number once it is complete); cheap enough to poll."""
  try:
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  except FileNotFoundError:
    return None
  return max(steps) if steps else None


def _restore_params(directory: str, step: int | None, abstract_of: Callable):
  """(step, params, config) of a training workdir's checkpoint; `abstract_of(config)` gives the
  params (boxed with their logical names or not) whose shapes the checkpoint holds."""
  ckpt = checkpoint.Checkpointer(directory, read_only=True)
  seen = {}

  def abstract(s, meta):
    seen["config"] = ml_collections.ConfigDict(meta.get("config", {}))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(abstract_of(seen["config"])))
    return {"params": checkpoint.on_one_device(shapes)}
  try:
    restored = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  if restored is None:
    raise VersionError(f"{directory}: no checkpoint yet")
  s, items, _ = restored
  return s, items["params"], seen["config"]


class ExpertSource:
  """Experts of an `expert_stream` workdir or of an `expert` workdir (one per surface)."""

  def __init__(self, path: str, data, slot: str):
    self.path, self.data, self.slot = os.path.abspath(path), data, slot
    self.surfaces = list(data.spec.surfaces)
    self.stream = os.path.isdir(os.path.join(path, "checkpoints"))
    if not self.stream and not any(os.path.isdir(os.path.join(path, s, "checkpoints"))
                                   for s in self.surfaces):
      raise VersionError(f"serve.experts={path}: no expert checkpoints (checkpoints/ of an "
                         "expert_stream run, or <surface>/checkpoints/ of a job=expert run)")

  def _dirs(self) -> dict[str, str]:
    if self.stream:
      return {s: os.path.join(self.path, "checkpoints") for s in self.surfaces}
    return {s: os.path.join(self.path, s, "checkpoints") for s in self.surfaces}

  def newest(self) -> dict[str, int | None]:
    return {s: newest_step(d) for s, d in self._dirs().items()}

  def load(self, steps: dict[str, int], fm: FMVersion) -> dict[str, ExpertVersion]:
    """The experts at `steps`, built for the FM tables of `fm`."""
    vocab, dim = fm.table.shape
    if self.stream:
      return self._load_stream(next(iter(steps.values())), dim, vocab)
    return {s: self._load_surface(s, step, dim) for s, step in steps.items()}

  def _load_stream(self, step: int, fm_dim: int, fm_vocab: int) -> dict[str, ExpertVersion]:
    built = {}

    def abstract_of(c):
      follow = tuple(str(f) for f in c.stream.follow)
      models, _, init = expert_stream.build_models(c, self.data, follow, fm_dim, fm_vocab)
      built.update(models=models, follow=follow)
      return init(jax.random.PRNGKey(0))

    s, params, c = _restore_params(os.path.join(self.path, "checkpoints"), step, abstract_of)
    slots = expert_stream.slots(built["follow"])
    if self.slot not in slots:
      raise VersionError(f"serve.expert_slot={self.slot!r}: the experts in {self.path} are "
                         f"{sorted(slots)}")
    return {name: ExpertVersion(s, built["models"][name][self.slot],
                                _device_tree(params[name][self.slot]), int(c.input.short_len),
                                slots[self.slot] is not None)
            for name in self.surfaces}

  def _load_surface(self, surface: str, step: int, fm_dim: int) -> ExpertVersion:
    spec = self.data.spec
    k = spec.surfaces.index(surface)
    built = {}

    def abstract_of(c):
      vocab = padded_vocab(self.data.num_items, c.mesh.model)
      model = from_config(c, vocab, int(spec.valid[k].sum()))
      built["model"] = model
      return model.init(jax.random.PRNGKey(0), example_batch(1, c.input.short_len, fm_dim),
                        item_table(self.data, vocab))["params"]

    s, params, c = _restore_params(os.path.join(self.path, surface, "checkpoints"), step,
                                   abstract_of)
    return ExpertVersion(s, built["model"], _device_tree(params), int(c.input.short_len), False)


class Registry:
  """The served versions, reloaded in a background thread every `every` seconds.

  `on_new(served)` runs on the new versions before they are swapped in (the tiers warm them
  up); a version that fails to load or to fit is reported and skipped, and the old stay."""

  def __init__(self, fm: FMSource, experts: ExpertSource, on_new: Callable[[Served], None],
               every: float):
    self.fm_source, self.expert_source, self.on_new, self.every = fm, experts, on_new, every
    self.current: Served | None = None
    self.failed: set = set()
    self._stop = threading.Event()
    self._thread = None

  def refresh(self) -> bool:
    """Loads newer versions if any; True if the served versions changed."""
    cur = self.current
    fm_v = self.fm_source.newest()
    ex_v = self.expert_source.newest()
    if fm_v is None or any(v is None for v in ex_v.values()):
      if cur is None:
        missing = "an FM version" if fm_v is None else f"experts for {[s for s, v in ex_v.items() if v is None]}"
        raise VersionError(f"nothing to serve yet: no {missing}; train them first (or wait for "
                           "the HyperCast pipeline to publish)")
      return False
    key = (fm_v, tuple(sorted(ex_v.items())))
    if key in self.failed:
      return False
    fm = cur.fm if cur and cur.fm.version == fm_v else None
    changed = {s: v for s, v in ex_v.items() if not cur or cur.experts[s].version != v}
    if fm is not None and not changed:
      return False
    try:
      fm = fm or self.fm_source.load(fm_v)
      experts = dict(cur.experts) if cur else {}
      experts.update(self.expert_source.load(changed, fm) if changed else {})
      served = Served(fm, experts)
      self.on_new(served)
    except (VersionError, snapshots.SnapshotError, checkpoint.CheckpointError, ValueError,
            KeyError, TypeError) as e:
      if cur is None:
        raise
      self.failed.add(key)
      print(f"fmx: warning: not serving FM v{fm_v} / experts {ex_v}: {e}", file=sys.stderr)
      return False
    self.current = served
    return True

  def start(self) -> None:
    def loop():
      while not self._stop.wait(self.every):
        try:
          self.refresh()
        except Exception as e:  # pylint: disable=broad-except  # keep serving the old versions
          print(f"fmx: warning: version reload failed ({type(e).__name__}: {e})", file=sys.stderr)
    self._thread = threading.Thread(target=loop, name="fmx-reload", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
