"""The HyperCast event log: replay a cross-surface dataset in time order into windows.

Run:
  python -m fmx.main --config=fmx/configs/event_log.py:synthetic --workdir=/tmp/synthetic_log
Variants: ml-1m (a day per window: 1038 windows, median 115 events) or synthetic. The workdir
is the log. A killed producer resumes; `speed` replays at that many simulated seconds per
wall second (0: as fast as possible), so consumers can tail a growing log.
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common, foundation


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, ("ml-1m", "synthetic"), "ml-1m")
  if len(words) > 1:
    raise common.ConfigError(f"pick one dataset, got {sorted(words)}")
  c = ml_collections.ConfigDict()
  c.job = "event_log"
  c.input = foundation.get_config(words.pop(), "runlocal").input  # the dataset to replay
  c.window_seconds = 86_400  # simulated time per window
  c.speed = 0.0  # simulated seconds per wall second (0: as fast as possible)
  c.max_windows = 0  # replay only the first N windows, then close the log (0: all)
  c.user_fraction = 1.0  # replay a seeded sample of the users (1: all)
  return c
