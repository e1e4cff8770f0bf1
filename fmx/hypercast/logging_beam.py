"""The offline logging tier on Apache Beam (`job="logging_beam"`): logs a range of event-log
windows into the streaming TAE store, the same versions the in-process tier
(`fmx.hypercast.logging_stream`) writes, row for row and shard for shard.

The pipeline:
  window indices -> read each window, key its events by user      (the history starts at window 0)
  -> GroupByKey(user) -> each impression of a window in range with the user's events before it
     (`window_source.user_examples`: ranking examples, up to `num_candidates` per group)
  -> GroupByKey(window) -> the window's batches in (user, time) order, cut into shards of
     `batches_per_shard` batches
  -> Reshuffle -> per shard and follower, the TAEs, user embeddings and FM predictions
     (`logging_stream.Versions.rows`, the in-process tier's own function), written by the worker
     into the window's staging directory (`tae_store.write_shard`).
Every FM version the range needs is restored once per worker, in `DoFn.setup`. This process is
the one writer of each window version: it holds the versions' locks while the workers write and
commits each window (all-or-nothing) once the pipeline has finished; a failed pipeline commits
nothing, and a rerun logs only the windows the store lacks.

`runner` and `pipeline_options` go to Beam unchanged: DirectRunner with
`--direct_running_mode=multi_processing --direct_num_workers=N` here, or FlinkRunner, SparkRunner
or DataflowRunner with their own options (the log, snapshots and store must then live on a
filesystem every worker and this process can reach).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import ml_collections
import numpy as np

from fmx import files
from fmx.data import load as data_load, tae_store
from fmx.hypercast import logging_stream, snapshots
from fmx.hypercast.event_log import EventLog
from fmx.hypercast.window_source import FIELDS, batch_examples, by_user, user_examples
from fmx.train import reporting
from fmx.train.loop import RunError

with contextlib.ExitStack() as _quiet:  # Beam warns on import about cloud clients it lacks
  _root = logging.getLogger()
  _quiet.callback(_root.setLevel, _root.level)
  _root.setLevel(logging.ERROR)
  import apache_beam as beam
  from apache_beam.metrics import Metrics, MetricsFilter
  from apache_beam.options.pipeline_options import PipelineOptions


class ReadWindow(beam.DoFn):
  """window -> (user, (window, that user's events in it))."""

  def __init__(self, log_dir: str):
    self.log_dir = log_dir

  def setup(self):
    self.log = EventLog(self.log_dir)

  def process(self, window: int):
    for user, rows in by_user(self.log.read_window(window)):
      yield user, (window, rows)


class UserExamples(beam.DoFn):
  """(user, [(window, events)]) -> (window, (user, i, ranking example)) for the windows in
  `todo`: each impression with the user's events before it."""

  def __init__(self, input_config: dict, todo: list[int], max_history: int, num_candidates: int):
    self.input_config, self.todo = input_config, set(todo)
    self.H, self.T = max_history, num_candidates

  def setup(self):
    self.data = data_load.load(ml_collections.ConfigDict(self.input_config), "surfaces")

  def process(self, element):
    user, chunks = element
    seq = {k: [] for k, _ in FIELDS}
    for window, rows in sorted(chunks, key=lambda c: c[0]):
      for key, field in FIELDS:
        seq[key].append(rows[field])
      if window in self.todo:
        whole = {k: np.concatenate(v) for k, v in seq.items()}
        for i, ex in enumerate(user_examples(self.data, user, whole, len(rows), self.H, self.T)):
          yield window, (user, i, ex)


def window_shards(element, batch_size: int, per_shard: int, max_history: int,
                  num_candidates: int, num_tasks: int):
  """(window, examples) -> ((window, part, parts), batches) in the in-process tier's order."""
  window, examples = element
  examples = [ex for _, _, ex in sorted(examples, key=lambda e: (e[0], e[1]))]
  batches = batch_examples(examples, batch_size, max_history, num_candidates, num_tasks)
  chunks = logging_stream.parts(batches, per_shard)
  for p, chunk in enumerate(chunks):
    yield (window, p, len(chunks)), chunk


class LogShard(beam.DoFn):
  """((window, part, parts), batches) -> the shards of that part, one per follower, written into
  the window's staging directory; yields the rows written."""

  def __init__(self, input_config: dict, snapshots_dir: str, staging: dict[int, str], K: int,
               follow: list[str], dim: int, needed: list[int]):
    self.input_config, self.snapshots_dir, self.staging = input_config, snapshots_dir, staging
    self.K, self.follow, self.dim, self.needed = K, follow, dim, needed

  def setup(self):
    data = data_load.load(ml_collections.ConfigDict(self.input_config), "surfaces")
    snaps = snapshots.Snapshots(self.snapshots_dir, read_only=True)
    self.versions = logging_stream.Versions(snaps, data, keep=len(self.needed) + 1)
    for v in self.needed:  # once per worker, not per element
      self.versions.get(v)
    self.unreported = len(self.needed)

  def process(self, element):
    (window, part, parts), batches = element
    if self.unreported:  # Beam counts metrics from `process`, not from `setup`
      Metrics.counter("fmx", "fm_restores").inc(self.unreported)
      self.unreported = 0
    for j, (follow, want) in enumerate(logging_stream.wanted(window, self.K, self.follow)):
      used, arrays = self.versions.rows(want, batches)
      tae_store.write_shard(self.staging[window], tae_store.window_version(window), j * parts + part,
                            arrays, logging_stream.shard_info(follow, used, self.dim, part, parts))
      Metrics.counter("fmx", "rows").inc(len(arrays["user"]))
      yield len(arrays["user"])


def build(p, c, index_windows: int, todo: list[int], staging: dict[int, str], K: int, dim: int,
          needed: list[int], fm_input, num_tasks: int):
  """Adds the logging pipeline of windows `todo` to Beam pipeline `p`."""
  inputs = c.input.to_dict()
  return (p
          | "windows" >> beam.Create(list(range(min(index_windows, max(todo) + 1))))
          | "read" >> beam.ParDo(ReadWindow(c.stream.log_dir))
          | "by user" >> beam.GroupByKey()
          | "examples" >> beam.ParDo(UserExamples(inputs, todo, fm_input.max_history,
                                                  fm_input.num_candidates))
          | "by window" >> beam.GroupByKey()
          | "batches" >> beam.FlatMap(window_shards, c.batch_size, c.batches_per_shard,
                                      fm_input.max_history, fm_input.num_candidates, num_tasks)
          | "spread" >> beam.Reshuffle()
          | "log" >> beam.ParDo(LogShard(inputs, c.stream.snapshots, staging, K,
                                         [str(f) for f in c.stream.follow], dim, needed)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c, t0 = config, time.time()
  data = data_load.load(c.input, "surfaces")
  snaps = snapshots.Snapshots(c.stream.snapshots, read_only=True)
  latest = snaps.latest()
  if latest is None:
    raise snapshots.SnapshotError(f"{c.stream.snapshots}: no FM version published; run the FM "
                                  "trainer (fm_stream) first")
  fm_config = ml_collections.ConfigDict(latest["config"])
  K, dim = fm_config.stream.publish_every, int(fm_config.model.dim)
  index = EventLog(c.stream.log_dir).index()
  n = len(index["windows"])
  end = min(c.end_window or n, n)
  done = set(tae_store.windows(c.stream.store))
  todo = [w for w in range(max(c.start_window, K), end) if w not in done]
  needed = sorted({v for w in todo for _, v in logging_stream.wanted(w, K, c.stream.follow)})
  if needed:  # retention keeps what the workers will read (pinned before the check below)
    snaps.pin("logging-beam", needed[0], and_newer=True)
  published = {e["version"] for e in snaps.versions()}
  if needed and not set(needed) <= published:
    snaps.prune_pins("logging-beam", set())
    raise snapshots.SnapshotError(
        f"{c.stream.snapshots}: windows {todo[0]}..{todo[-1]} need FM versions "
        f"{sorted(set(needed) - published)}, which the snapshots lack (not published yet, or "
        "collected: keep them with the FM's stream.keep_versions); log other windows "
        "(--config.start_window, --config.end_window)")
  rows, restores = 0, 0
  if todo:
    with contextlib.ExitStack() as stack:
      writers = {w: stack.enter_context(tae_store.write_version(c.stream.store,
                                                                tae_store.window_version(w)))
                 for w in reversed(todo)}  # the commits run in window order on exit
      options = PipelineOptions([f"--runner={c.runner}", *c.pipeline_options])
      p = beam.Pipeline(options=options)
      build(p, c, n, todo, {w: str(wr.staging) for w, wr in writers.items()}, K, dim, needed,
            fm_config.input, data.spec.num_tasks)
      stack.callback(snaps.prune_pins, "logging-beam", set())  # however the run ends
      result = p.run()
      state = result.wait_until_finish()
      if state != beam.runners.runner.PipelineState.DONE:
        raise RunError(f"the Beam pipeline ended {state}; nothing was committed: rerun it")
      counters = {r.key.metric.name: r.committed
                  for r in result.metrics().query(MetricsFilter().with_namespace("fmx"))["counters"]}
      rows, restores = counters.get("rows", 0), counters.get("fm_restores", 0)
      for w in todo:
        logging_stream.commit_window(writers[w], w, index["windows"][w], data.name,
                                     logging_stream.wanted(w, K, c.stream.follow), dim)
  logged = set(tae_store.windows(c.stream.store))
  if index["closed"] and logged >= set(range(K, n)):  # tell the experts the store is complete
    files.atomic_write(os.path.join(c.stream.store, tae_store.CLOSED),
                       json.dumps({"windows": len(logged)}))
  wall = time.time() - t0
  results = {"windows": len(todo), "rows": int(rows), "steps": 0, "wall_s": round(wall, 2),
             "rows_per_s": round(rows / wall, 1), "fm_restores": int(restores),
             "fm_versions": needed, "runner": c.runner, "config": c.to_dict()}
  reporting.write_results(workdir, results)
  return results
