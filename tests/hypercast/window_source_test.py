"""The streaming FM trainer's source: each window's impressions ranked against the user's events
strictly before them, and exactly-once training across a restart on a growing log."""

import json

import jax
import numpy as np
import pytest

from fmx.configs import foundation as fm_configs
from fmx.data import ranking, synthetic_surfaces
from fmx.hypercast import event_log
from fmx.hypercast.window_source import WindowSource
from fmx.runtime import checkpoint, fm as fm_runtime
from fmx.train import fm as fm_train
from fmx.train.loop import train_loop

DAY = 86_400
H, T = 8, 3


@pytest.fixture(scope="module")
def data():
  return synthetic_surfaces.generate(num_users=12, num_items=60, seed=5, min_len=20, max_len=30)


def test_impressions_see_only_the_past(tmp_path, data):
  event_log.produce(data, tmp_path, window_seconds=DAY)
  source = WindowSource(str(tmp_path), data, H, T, batch_size=4, timeout=0)
  got = {}
  for batch, position in source.iterate(source.start()):
    got.setdefault(position["window"], []).extend(
        {k: v[i] for k, v in batch.items()} for i in range(4) if batch["num_targets"][i] > 0)
  seen = {u: 0 for u in range(data.num_users)}  # events of each user in earlier windows
  for w, events in event_log.EventLog(tmp_path).follow(timeout=0):
    want = []
    for u in sorted(set(events["user"].tolist())):
      end = seen[u] + int((events["user"] == u).sum())
      for cut in range(max(seen[u], 1), end, T):  # the log keeps each user's own order
        want.append(ranking.example(data, u, cut, end, H, T))
      seen[u] = end
    assert len(got.get(w, [])) == len(want)
    for g, x in zip(got.get(w, []), want):
      for k in x:
        np.testing.assert_array_equal(g[k], x[k], err_msg=k)
      assert (g["timestamps"][:g["lengths"] - g["num_targets"]] <= g["request_time"]).all()
  assert position["events"] == sum(len(s) for s in data.item_ids) - data.num_users


def fm_run(workdir, log_dir, data):
  c = fm_configs.get_config("synthetic", "runlocal")
  c.progress, c.log_every_steps, c.checkpoint_every_steps = False, 1, 2
  c.input.max_history, c.input.num_candidates, c.model.max_len = H, T, H + T
  c.model.dim, c.model.dqk, c.model.dv, c.model.head_dim = 16, 8, 8, 16
  model, items = fm_runtime.build(c, data)
  init, step, _ = fm_train.make_steps(c, model, items, data.spec, data.spec.fm_tasks)
  source = WindowSource(str(log_dir), data, H, T, batch_size=8, timeout=0)
  state, final, report = train_loop(c, str(workdir), init=init, train_step=step, source=source,
                                    evaluate=lambda p, e: {}, select=None, desc="stream")
  report.close()
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), read_only=True)
  position = ckpt.read_meta(ckpt.steps()[0])["position"]
  ckpt.close()
  return state, position


def test_every_event_is_trained_exactly_once_across_a_restart(tmp_path, data):
  event_log.produce(data, tmp_path / "log_once", window_seconds=DAY)
  whole, position = fm_run(tmp_path / "once", tmp_path / "log_once", data)
  trainable = sum(len(s) for s in data.item_ids) - data.num_users  # first events: history only
  assert position["events"] == trainable
  event_log.produce(data, tmp_path / "log", window_seconds=DAY)
  index = json.loads((tmp_path / "log" / "index.json").read_text())
  index.update(closed=False, windows=index["windows"][:4])  # as a producer 4 windows in
  (tmp_path / "log" / "index.json").write_text(json.dumps(index))
  _, early = fm_run(tmp_path / "parts", tmp_path / "log", data)  # the producer is behind
  assert 0 < early["events"] < trainable and early["window"] == 3  # the 4th window, done
  event_log.produce(data, tmp_path / "log", window_seconds=DAY)  # ... and catches up
  parts, position = fm_run(tmp_path / "parts", tmp_path / "log", data)
  assert position["events"] == trainable and int(parts.step) == int(whole.step)
  for a, b in zip(jax.tree.leaves(parts.params), jax.tree.leaves(whole.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
