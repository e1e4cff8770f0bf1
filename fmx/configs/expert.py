"""Shared builder for the surface-expert configs (ml1m_expert.py, synthetic_expert.py).

Variants (comma-separated): the knowledge carrier, one of `none` (the expert alone), `tae`,
`ue` (the FM's user embedding), `tae+ue`, `kd` (the expert alone, distilled from the FM's
predictions); and `runlocal` (a minute on a 2-core CPU). `tae` is the default.

`tae.store` is the materialised TAE store and `tae.fm_version` the FM version to read from it;
if the store lacks that version, `tae.fm_workdir` (a finished FM run's workdir) is materialised
into it first by the logging tier.
"""

from __future__ import annotations

import ml_collections

from fmx.configs import foundation
from fmx.models.expert import CARRIERS

VARIANTS = CARRIERS + ("kd", "runlocal")


def get_config(dataset: str, arg: str | None, fm_workdir: str) -> ml_collections.ConfigDict:
  words = {w.strip() for w in (arg or "tae").split(",") if w.strip()}
  unknown = words - set(VARIANTS)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; expected {VARIANTS}")
  carriers = words - {"runlocal"}
  if len(carriers) > 1:
    raise ValueError(f"pick one knowledge carrier, got {sorted(carriers)}")
  carrier = carriers.pop() if carriers else "tae"

  c = ml_collections.ConfigDict()
  c.job = "expert"
  c.seed = 0
  c.num_epochs = 10
  c.log_every_steps = 50
  c.progress = True
  c.surfaces = ()  # () = an expert for every surface
  c.kd_weight = 1.0 if carrier == "kd" else 0.0  # weight of the distillation BCE

  c.tae = ml_collections.ConfigDict()
  c.tae.fm_workdir = fm_workdir  # the FM run whose latest checkpoint is materialised if needed
  c.tae.store = f"{fm_workdir}/taes"  # the materialised TAE store
  c.tae.fm_version = "v1"  # which FM version of the store to train on

  fm = foundation.get_config(dataset, "runlocal" if "runlocal" in words else None)
  c.input = ml_collections.ConfigDict()
  c.input.dataset = dataset
  c.input.data_dir = fm.input.data_dir
  c.input.manual_dir = fm.input.manual_dir
  c.input.synthetic = fm.input.synthetic  # must match the FM's (runlocal: the FM's runlocal)
  c.input.short_len = 16  # T: the surface's most recent events the short-term HSTU reads
  c.input.batch_size = 128
  c.input.select_fraction = 0.1  # users of the expert's training windows held out to pick the epoch

  # d=24, 1 layer, T=16: 5.7% of the base FM's FLOPs per candidate
  # (python experiments/bench/expert_cost.py, whose expert defaults are these)
  c.model = ml_collections.ConfigDict(dict(carrier="none" if carrier == "kd" else carrier,
                                           dim=24, num_layers=1, num_heads=1, dqk=24, dv=24,
                                           dropout=0.2))
  c.optimizer = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.98, weight_decay=0.0,
                                               warmup_steps=0))
  c.evals = ml_collections.ConfigDict(dict(every_epochs=1, batch_size=1024,
                                           show=("ne_mean", "valid/ne_mean")))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1, rules=fm.mesh.rules))

  if "runlocal" in words:
    c.num_epochs = 3
    c.log_every_steps = 10
  return c
