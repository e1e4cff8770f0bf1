"""The streaming FM trainer (a HyperCast stage): trains on an event log's windows as they appear.

Run (after the log: python -m fmx.main --config=fmx/configs/event_log.py:synthetic
--workdir=/tmp/synthetic_log):
  python -m fmx.main --config=fmx/configs/stream_fm.py:synthetic,runlocal --workdir=/tmp/stream_fm
Variants: ml-1m or synthetic, with base, large or runlocal (the FM configs' sizes). Each
window's impressions are ranked against the user's events strictly before them; the position
in the log (window, batch, events trained) is checkpointed with the model, so a killed trainer
resumes and trains every event exactly once. It stops when the producer has closed the log
(or after `stream.idle_seconds` without a new window).
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common, foundation


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, ("ml-1m", "synthetic", "base", "large", "runlocal"), "ml-1m")
  datasets = words & {"ml-1m", "synthetic"} or {"ml-1m"}
  if len(datasets) > 1:
    raise common.ConfigError(f"pick one dataset, got {sorted(datasets)}")
  dataset = datasets.pop()
  c = foundation.get_config(dataset, ",".join(sorted((words - {dataset}) | {"nobaseline"})))
  c.job = "fm_stream"
  c.checkpoint_every_steps = 20
  c.stream = ml_collections.ConfigDict()
  c.stream.log_dir = f"/tmp/{dataset.replace('-', '')}_log"  # the event log to follow
  c.stream.poll_seconds = 0.5  # how often to look for a new window
  c.stream.idle_seconds = 0.0  # stop after this long without a new window (0: wait for close)
  c.stream.snapshots = ""  # publish FM versions into this directory ("": never)
  c.stream.publish_every = 10  # version n = the FM trained on the windows before n * this
  c.stream.full_every = 4  # a full snapshot every N versions, partial (changed rows) between
  c.stream.keep_versions = 3  # retention: the newest N versions (and any pinned one) are kept
  return c
