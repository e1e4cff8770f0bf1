"""Shared builder for the surface-expert configs (ml1m_expert.py, synthetic_expert.py).

Variants (comma-separated): the knowledge carrier, one of `none` (the expert alone), `tae`,
`ue` (the FM's user embedding), `tae+ue`, `kd` (the expert alone, distilled from the FM's
predictions); and `runlocal` (a minute on a 2-core CPU). `tae` is the default.

`tae.store` is the materialised TAE store and `tae.fm_version` the FM version to read from it.
The expert never runs the FM: the logging tier (`fmx/configs/logging_tier.py`) materialises a
trained FM's TAEs into the store first.
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common, foundation

VARIANTS = common.CARRIERS + ("kd", "runlocal")


def get_config(dataset: str, arg: str | None, fm_workdir: str) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, VARIANTS, "tae")
  carriers = words - {"runlocal"}
  if len(carriers) > 1:
    raise common.ConfigError(f"pick one knowledge carrier, got {sorted(carriers)}")
  carrier = carriers.pop() if carriers else "tae"

  c = ml_collections.ConfigDict()
  common.add_run_fields(c, job="expert", seed=0, num_epochs=10, log_every_steps=50)
  c.surfaces = ()  # () = an expert for every surface
  c.kd_weight = 1.0 if carrier == "kd" else 0.0  # weight of the distillation BCE

  c.tae = ml_collections.ConfigDict()
  c.tae.store = f"{fm_workdir}/taes"  # the materialised TAE store (written by the logging tier)
  c.tae.fm_version = "v1"  # which FM version of the store to train on

  fm = foundation.get_config(dataset, "runlocal" if "runlocal" in words else None)
  c.input = ml_collections.ConfigDict()
  c.input.dataset = dataset
  c.input.data_dir = fm.input.data_dir
  c.input.manual_dir = fm.input.manual_dir
  c.input.fetch_wheel = fm.input.fetch_wheel
  c.input.synthetic = fm.input.synthetic  # must match the FM's (runlocal: the FM's runlocal)
  c.input.short_len = 16  # T: the surface's most recent events the short-term HSTU reads
  c.input.batch_size = 128
  c.input.select_fraction = 0.1  # users of the expert's training windows held out to pick the epoch

  # d=24, 1 layer, T=16: 5.7% of the base FM's FLOPs per candidate
  # (python experiments/bench/expert_cost.py, whose expert defaults are these)
  c.model = ml_collections.ConfigDict(dict(carrier="none" if carrier == "kd" else carrier,
                                           dim=24, num_layers=1, num_heads=1, dqk=24, dv=24,
                                           dropout=0.2, compute_dtype="float32"))
  c.optimizer = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.98, weight_decay=0.0,
                                               warmup_steps=0))
  c.evals = ml_collections.ConfigDict(dict(every_epochs=1, every_steps=0, batch_size=1024,
                                           show=("ne_mean", "valid/ne_mean")))
  c.mesh = ml_collections.ConfigDict(fm.mesh.to_dict())

  if "runlocal" in words:
    c.num_epochs = 3
    c.log_every_steps = 10
  return c
