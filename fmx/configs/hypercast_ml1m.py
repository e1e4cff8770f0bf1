"""The HyperCast pipeline: producer, streaming FM, logging tier and streaming experts, each in its
own process under one supervisor, over ML-1M replayed in time order.

Run (about 3 minutes on a 2-core CPU):
  python -m fmx.main --config=fmx/configs/hypercast_ml1m.py:runlocal --workdir=/tmp/hypercast
Variants: `runlocal` (the first 150 days of 35% of the users, a day per window), `full`
(every event; hours on a CPU), and `synthetic` (the seeded synthetic surfaces, for tests).
Each section is a complete stage config (`producer`: fmx/configs/event_log.py, `fm`:
fmx/configs/stream_fm.py, `logging` and `experts` below); the supervisor fills in the shared
directories (DIR/log, DIR/snapshots, DIR/store) and writes them to DIR/stages/.
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common, event_log, expert, stream_fm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, ("runlocal", "full", "synthetic"), "runlocal")
  dataset = "synthetic" if "synthetic" in words else "ml-1m"
  c = ml_collections.ConfigDict()
  c.job = "hypercast"
  c.progress = True  # one progress bar per stage (windows done) on stderr
  c.max_restarts = 3  # a stage that dies (other than of bad input) is restarted this often
  c.poll_seconds = 0.25  # how often stages look for new windows, versions and shards
  c.idle_seconds = 0.0  # a stage gives up after this long without input (0: waits for its input to close)
  # FM versions the logging tier logs and the experts follow: "newest" (version w // K for
  # window w) and pinned versions (for the transfer ratio between two FM versions)
  c.follow = ("newest", "1")

  c.producer = event_log.get_config(dataset)
  c.producer.speed = 0.0  # simulated seconds per wall second (0: as fast as possible)

  c.fm = stream_fm.get_config(f"{dataset},runlocal")
  c.fm.stream.publish_every = 10  # windows per FM version
  c.fm.stream.full_every = 4
  c.fm.stream.keep_versions = 3

  c.logging = ml_collections.ConfigDict()
  c.logging.job = "logging_stream"
  c.logging.input = ml_collections.ConfigDict(c.fm.input.to_dict())
  c.logging.batch_size = 128  # ranking windows per FM forward
  c.logging.batches_per_shard = 2  # store shard size (in batches): a window has many shards
  c.logging.stream = ml_collections.ConfigDict(dict(
      log_dir="", snapshots="", store="", poll_seconds=0.25, idle_seconds=0.0, follow=("newest",),
      start_window=0))  # log from this window on (and from K, the first with an FM version)
  # on the first window of every FM version, the MMD between its TAEs and the previous
  # version's on the same impressions, per surface (DIR/logging/drift.jsonl)
  c.logging.drift = ml_collections.ConfigDict(dict(enabled=True, rows=300, permutations=100))

  c.experts = expert.get_config(dataset, "runlocal", "")
  del c.experts["tae"]
  c.experts.job = "expert_stream"
  c.experts.checkpoint_every_steps = 25
  c.experts.log_every_steps = 25
  c.experts.stream = ml_collections.ConfigDict(dict(
      snapshots="", store="", poll_seconds=0.25, idle_seconds=0.0, follow=("newest",),
      update_every=1,  # train on windows in groups of N, scoring all first (later updates)
      align=False))  # keep TAEs in the moments of the first FM version's (see store_source)

  if dataset == "ml-1m" and "full" not in words:
    c.producer.max_windows = 150
    c.producer.user_fraction = 0.35
    c.producer.speed = 2.5 * 86_400  # 2.5 simulated days per wall second: 150 days in a minute
  if dataset == "synthetic":
    c.fm.input.synthetic.num_users = 300
    c.producer.max_windows = 40
    c.fm.stream.publish_every = 8
  return c
