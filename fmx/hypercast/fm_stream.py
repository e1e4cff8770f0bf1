"""The streaming FM trainer (`job="fm_stream"`): the FM trained incrementally on the windows of
the event log, through the shared loop over a `WindowSource`.

Before it trains on a window it scores the window's impressions (progressive validation,
`fmx.hypercast.progressive`, in `workdir/progressive`). If `stream.snapshots` is set, it
publishes FM version n (`fmx.hypercast.snapshots`) when it reaches window
n * `stream.publish_every`: the parameters trained on the windows before it, a full snapshot
every `stream.full_every` versions and partial ones (changed table rows, all dense tensors) in
between, and garbage-collects all but the newest `stream.keep_versions` and the pinned ones.

`results.json` holds `events` (impressions trained on, from the checkpointed position), the
`position` in the log, and `params_sha256`, a digest of the trained parameters: two runs that
trained the same events in the same order, killed or not, have the same digest.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from fmx.data import load as data_load
from fmx.hypercast import progressive, snapshots
from fmx.hypercast.window_source import WindowSource
from fmx.runtime import checkpoint, fm as fm_runtime
from fmx.train import fm as fm_train, metrics, reporting
from fmx.train.loop import require_finite, train_loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c = config
  data = data_load.load(c.input, "surfaces")  # the item tables and task spec the log refers to
  model, items = fm_runtime.build(c, data)
  init, train_step, predict = fm_train.make_steps(c, model, items, data.spec, data.spec.fm_tasks)
  source = WindowSource(c.stream.log_dir, data, c.input.max_history, c.input.num_candidates,
                        c.input.batch_size, c.stream.poll_seconds, c.stream.idle_seconds or None)
  log = source.log.index()
  while not log["windows"] and not log.get("closed"):  # the header comes with the first window
    time.sleep(c.stream.poll_seconds)
    log = source.log.index()
  fingerprint = data_load.fingerprint(
      data, {k: log.get(k) for k in ("dataset", "window_seconds", "num_tasks", "user_fraction")})
  snaps = snapshots.Snapshots(c.stream.snapshots) if c.stream.get("snapshots") else None
  records = os.path.join(workdir, "progressive")

  def publish(params, window: int, step: int) -> list[int]:
    """Publishes every version due by `window` that is missing; returns them."""
    latest = snaps.latest()
    have = latest["version"] if latest else 0
    t_start = source.log.index()["windows"][window]["t_start"]
    new = list(range(have + 1, window // c.stream.publish_every + 1))
    for v in new:
      info = {"window": window, "fm_step": step, "sim_time": t_start,
              "dataset": data.name, "fingerprint": fingerprint,
              "config": json.loads(json.dumps(c.to_dict()))}
      entry = snaps.publish(v, params, info, full=(v - 1) % c.stream.full_every == 0)
      with open(os.path.join(workdir, "publish.jsonl"), "a") as f:  # bytes per version, kept
        f.write(json.dumps({k: entry.get(k) for k in ("version", "kind", "bytes", "full_bytes",
                                                     "table_rows", "window")}) + "\n")
    if new:
      snaps.collect(c.stream.keep_versions)
    return new

  def on_batch(state, batch, position):
    if position["batch"] != 1:  # only before a window's first batch
      return
    w, events, batches = source.current
    if snaps:
      publish(state.params, w, int(state.step))
    if not progressive.done(records, w):
      col = fm_train.collect(predict, state.params, batches)
      require_finite(col["probs"], "predictions")
      m = metrics.surface_task_metrics(col["probs"], col["labels"], col["valid"], col["surfaces"],
                                       data.spec, data.spec.fm_tasks)
      info = {"wall": time.time(), "events": int(len(events)), "step": int(state.step),
              "ne_mean": metrics.ne_mean(m) if m else None}
      progressive.write(records, w, {"probs/fm": col["probs"], "labels": col["labels"],
                                     "valid": col["valid"], "surfaces": col["surfaces"]}, info)
    if snaps:  # each version published here gets its evaluation on this window (once)
      for e in snaps.versions():
        if e.get("window") == w and "eval" not in e:
          snaps.update(e["version"], eval={"window": w, **progressive.info(records, w)})

  state, final, report = train_loop(c, workdir, init=init, train_step=train_step, source=source,
                                    evaluate=lambda params, epoch: {}, select=None,
                                    desc=f"{data.name} stream", fingerprint=fingerprint,
                                    on_batch=on_batch)
  report.close()
  if snaps:  # versions due at windows without impressions: the state did not change since
    windows = source.log.index()["windows"]
    if windows:
      publish(state.params, len(windows) - 1, final["steps"])
  results = {**final, "events": final["position"]["events"], "dataset": data.name,
             "params_sha256": checkpoint.digest(state.params), "config": c.to_dict()}
  if snaps:
    results["versions"] = [v["version"] for v in snaps.versions()]
  reporting.write_results(workdir, results)
  return results
