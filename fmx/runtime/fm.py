"""Build the FM (or its non-sequential baseline) with its item table, initialise its parameters,
and restore a pinned checkpoint's parameters without an optimizer.

A checkpoint records the config that trained it, so `restore(fm_workdir)` needs nothing else:
it rebuilds the model from that config, reads only the `params` item and verifies it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fmx.data import load as data_load
from fmx.data.items import item_table
from fmx.models.baselines import NonSequential
from fmx.models.embeddings import padded_vocab
from fmx.models.foundation import FoundationModel, probabilities
from fmx.models.hstu import HSTUConfig
from fmx.runtime import checkpoint
from fmx.runtime.mfalcon import MFalcon

KINDS = ("fm", "nonseq")


def build(c: ml_collections.ConfigDict, data) -> tuple:
  """(model, items): the `c.model.kind` model of FM config `c` and the padded item table."""
  m, spec = c.model, data.spec
  vocab = padded_vocab(data.num_items, c.mesh.model)
  if m.kind == "fm":
    model = FoundationModel(HSTUConfig.from_model_config(m), vocab, len(spec.surfaces),
                            spec.num_tasks, m.input_dropout, m.head_dim)
  elif m.kind == "nonseq":
    model = NonSequential(m.dim, vocab, len(spec.surfaces), spec.num_tasks, data.num_users,
                          m.input_dropout, m.head_dim)
  else:
    raise ValueError(f"model.kind={m.kind!r}: expected one of {KINDS}")
  return model, item_table(data, vocab)


def init_params(c: ml_collections.ConfigDict, model, items, rng: jax.Array, *, boxed=False):
  """Parameters of `model` for windows of `c.input.max_history + num_candidates` tokens (with
  their logical axis names if `boxed`, as the train loop takes them)."""
  n, t = c.input.max_history + c.input.num_candidates, c.input.num_candidates
  dummy = {k: jnp.zeros((1, n), jnp.int32) for k in ("ids", "surfaces", "actions", "positions")}
  dummy.update(timestamps=jnp.zeros((1, n), jnp.int32), query_times=jnp.zeros((1, n), jnp.int32),
               lengths=jnp.ones((1,), jnp.int32), num_targets=jnp.ones((1,), jnp.int32),
               cand_index=jnp.zeros((1, t), jnp.int32), request_time=jnp.zeros((1,), jnp.int32),
               user=jnp.zeros((1,), jnp.int32))
  params = model.init(rng, dummy, items)["params"]
  return params if boxed else nn.meta.unbox(params)


@dataclasses.dataclass
class PinnedFM:
  """One restored FM version: its config, model, item table and parameters."""

  config: ml_collections.ConfigDict
  model: FoundationModel
  items: dict
  params: dict
  step: int
  data: object
  workdir: str
  layout: object = None  # a `fmx.train.sharding.Layout` the parameters sit on (None: one device)

  def __post_init__(self):
    fn = lambda p, b: self.model.apply({"params": p}, b, self.items, return_user=True)
    self._forward = (jax.jit(fn) if self.layout is None else
                     self.layout.jit_eval(fn, jax.tree.map(lambda x: x.sharding, self.params)))

  def forward(self, batch: dict):
    """(TAEs `[B, T, d]`, probabilities `[B, T, tasks]`, user embeddings `[B, d]`) of padded
    ranking windows (`fmx.data.ranking`)."""
    tae, logits, ue = self._forward(self.params, batch)
    return tae, probabilities(logits), ue

  def mfalcon(self, micro_batch: int = 256) -> MFalcon:
    return MFalcon(self.model, self.items, micro_batch)


def restore(fm_workdir: str, *, step: int | None = None, load_data: Callable | None = None,
            layout=None) -> PinnedFM:
  """The FM of `fm_workdir` at `step` (None: the newest intact step).

  `load_data(config)` gives the dataset of the FM's config (default: `fmx.data.load` on its
  `input` section). `layout` (a `fmx.train.sharding.Layout`, passed in as data: the runtime
  does not import the trainers) restores the parameters sharded by its logical rules, whatever
  mesh trained them, and runs the forward pass on its mesh; None puts them on one device."""
  directory = os.path.join(fm_workdir, "checkpoints")
  ckpt = checkpoint.Checkpointer(directory, read_only=True) if os.path.isdir(directory) else None
  if ckpt is None or not ckpt.steps():
    raise checkpoint.CheckpointError(
        f"no FM checkpoint in {fm_workdir}/checkpoints: train the FM first "
        "(python -m fmx.main --config=fmx/configs/ml1m_fm.py --workdir=...)")
  built = {}

  def abstract(s, meta):
    c = ml_collections.ConfigDict(meta.get("config", {}))
    if c.get("job") != "fm" or c.model.get("kind") != "fm":
      raise checkpoint.CheckpointError(f"{fm_workdir}: step {s} is not a foundation-model "
                                       "checkpoint (job=fm, model.kind=fm)")
    data = (load_data or (lambda cfg: data_load.load(cfg.input, "surfaces")))(c)
    model, items = build(c, data)
    built.update(config=c, model=model, items=items, data=data)
    boxed = jax.eval_shape(lambda: init_params(c, model, items, jax.random.PRNGKey(0), boxed=True))
    shapes = nn.meta.unbox(boxed)
    if layout is None:
      return {"params": checkpoint.on_one_device(shapes)}
    return {"params": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   shapes, layout.shardings(boxed))}

  s, items, _ = ckpt.restore(abstract, step=step)
  ckpt.close()
  return PinnedFM(built["config"], built["model"], built["items"], items["params"], s,
                  built["data"], os.path.abspath(fm_workdir), layout)
