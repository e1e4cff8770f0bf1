"""The offline logging tier on Apache Beam: log a range of a HyperCast run's event-log windows
into a TAE store, with the FM versions that run published.

Run (after python -m fmx.main --config=fmx/configs/hypercast_ml1m.py:runlocal
--workdir=/tmp/hypercast):
  python -m fmx.main --config=fmx/configs/logging_beam.py:ml-1m --workdir=/tmp/logging_beam
Variants: ml-1m or synthetic (the dataset whose log it is). The defaults read /tmp/hypercast and
write a second store beside the run's own (/tmp/hypercast/store_beam); point
`stream.store` at the run's store to backfill it. `runner` and `pipeline_options` go to Beam
unchanged (e.g. --config.runner=DataflowRunner --config.pipeline_options='("--project=...",)').
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common, hypercast_ml1m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, ("ml-1m", "synthetic"), "ml-1m")
  if len(words) > 1:
    raise common.ConfigError(f"pick one dataset, got {sorted(words)}")
  pipeline = hypercast_ml1m.get_config("synthetic" if "synthetic" in words else "runlocal")
  c = ml_collections.ConfigDict()
  c.job = "logging_beam"
  c.input = pipeline.logging.input  # the dataset the log replays (its item side tables)
  c.batch_size = pipeline.logging.batch_size  # ranking windows per FM forward
  c.batches_per_shard = pipeline.logging.batches_per_shard  # the shards, as the in-process tier
  c.start_window = 0  # log windows [start_window, end_window) (from K on: earlier have no FM)
  c.end_window = 0  # 0: to the newest window of the log
  c.stream = ml_collections.ConfigDict(dict(
      log_dir="/tmp/hypercast/log", snapshots="/tmp/hypercast/snapshots",
      store="/tmp/hypercast/store_beam", follow=tuple(pipeline.follow)))
  c.runner = "DirectRunner"
  c.pipeline_options = ("--direct_running_mode=multi_processing", "--direct_num_workers=2",
                        "--default_sdk_harness_log_level=ERROR")
  return c
