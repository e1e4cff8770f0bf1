"""The offline FM logging tier: materialise a trained FM checkpoint's TAEs into the TAE store.

Run (after the FM: python -m fmx.main --config=fmx/configs/ml1m_fm.py --workdir=/tmp/ml1m_fm):
  python -m fmx.main --config=fmx/configs/logging_tier.py:ml-1m --workdir=/tmp/ml1m_logging
Variants: ml-1m (FM in /tmp/ml1m_fm) or synthetic (FM in /tmp/synthetic_fm). The FM's own
config, dataset included, comes from its checkpoint. A version is written once: rerunning for
a committed version is a no-op. Then train the experts on it (fmx/configs/ml1m_expert.py).
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, ("ml-1m", "synthetic"), "ml-1m")
  if len(words) > 1:
    raise common.ConfigError(f"pick one dataset, got {sorted(words)}")
  dataset = words.pop()
  fm_workdir = {"ml-1m": "/tmp/ml1m_fm", "synthetic": "/tmp/synthetic_fm"}[dataset]
  c = ml_collections.ConfigDict()
  c.job = "logging"
  c.fm_workdir = fm_workdir  # a trained FM's workdir
  c.fm_step = 0  # which of its checkpoints (0: the latest intact one)
  c.store = f"{fm_workdir}/taes"  # the TAE store to write
  c.fm_version = "v1"  # the version tag of the rows (a safe file name)
  c.splits = ("valid", "test")  # which windows to log (train: the FM's first-epoch windows)
  c.batch_size = 128  # windows per forward pass (split over the mesh's data axis)
  c.mesh = common.mesh()  # where the FM's parameters and the windows live while logging
  c.input = ml_collections.ConfigDict()  # where the FM's data lives on this machine
  c.input.data_dir = common.DEFAULT_DATA_DIR
  c.input.manual_dir = common.DEFAULT_MANUAL_DIR
  c.input.fetch_wheel = True
  return c
