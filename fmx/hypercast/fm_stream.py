"""The streaming FM trainer (`job="fm_stream"`): the FM trained incrementally on the windows of
the event log, through the shared loop over a `WindowSource`.

`results.json` holds `events` (impressions trained on, from the checkpointed position), the
`position` in the log, and `params_sha256`, a digest of the trained parameters: two runs that
trained the same events in the same order, killed or not, have the same digest.
"""

from __future__ import annotations

import ml_collections

from fmx.data import load as data_load
from fmx.hypercast.window_source import WindowSource
from fmx.runtime import checkpoint, fm as fm_runtime
from fmx.train import fm as fm_train, reporting
from fmx.train.loop import train_loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c = config
  data = data_load.load(c.input, "surfaces")  # the item tables and task spec the log refers to
  model, items = fm_runtime.build(c, data)
  init, train_step, _ = fm_train.make_steps(c, model, items, data.spec, data.spec.fm_tasks)
  source = WindowSource(c.stream.log_dir, data, c.input.max_history, c.input.num_candidates,
                        c.input.batch_size, c.stream.poll_seconds, c.stream.idle_seconds or None)
  log = source.log.index()
  fingerprint = data_load.fingerprint(
      data, {k: log.get(k) for k in ("dataset", "window_seconds", "num_tasks")})
  state, final, report = train_loop(c, workdir, init=init, train_step=train_step, source=source,
                                    evaluate=lambda params, epoch: {}, select=None,
                                    desc=f"{data.name} stream",
                                    fingerprint=fingerprint)
  report.close()
  results = {**final, "events": final["position"]["events"], "dataset": data.name,
             "params_sha256": checkpoint.digest(state.params), "config": c.to_dict()}
  reporting.write_results(workdir, results)
  return results
