"""The event log: every event once, in time order, in windows of simulated time; a producer that
resumes; consumers that tail a growing log and never see a partial or damaged window."""

import json
import threading

import numpy as np
import pytest

from fmx import files
from fmx.data import synthetic_surfaces
from fmx.hypercast import event_log

DAY = 86_400


@pytest.fixture(scope="module")
def data():
  return synthetic_surfaces.generate(num_users=30, num_items=100, seed=3, min_len=20, max_len=40)


def all_events(root):
  log = event_log.EventLog(root)
  return [log.read_window(i) for i in range(len(log.index()["windows"]))]


def test_windows_hold_every_event_once_in_time_order(tmp_path, data):
  n = event_log.produce(data, tmp_path, window_seconds=DAY)
  index = event_log.EventLog(tmp_path).index()
  assert index["closed"] and n == len(index["windows"]) > 3
  windows = all_events(tmp_path)
  events = np.concatenate(windows)
  assert len(events) == sum(len(s) for s in data.item_ids)
  np.testing.assert_array_equal(events["offset"], np.arange(len(events)))  # global offsets
  assert np.all(np.diff(events["timestamp"]) >= 0)
  for w, entry in zip(windows, index["windows"]):
    assert entry["t_start"] <= w["timestamp"].min() and w["timestamp"].max() < entry["t_end"]
    assert entry["t_end"] - entry["t_start"] == DAY
  for u in range(data.num_users):  # each user's events, in the user's own order, with labels
    mine = events[events["user"] == u]
    np.testing.assert_array_equal(mine["item"], data.item_ids[u])
    np.testing.assert_array_equal(mine["labels"], data.labels[u])
    np.testing.assert_array_equal(mine["surface"], data.item_surface[data.item_ids[u]])


def test_a_resumed_producer_writes_the_same_log(tmp_path, data):
  event_log.produce(data, tmp_path / "once", window_seconds=DAY)
  event_log.produce(data, tmp_path / "parts", window_seconds=DAY)
  index = json.loads((tmp_path / "parts" / "index.json").read_text())
  index.update(closed=False, windows=index["windows"][:3])  # as a producer killed after window 3
  (tmp_path / "parts" / "index.json").write_text(json.dumps(index))
  (tmp_path / "parts" / ".window-000003.array_record.tmp").write_bytes(b"killed mid-write")
  event_log.produce(data, tmp_path / "parts", window_seconds=DAY)
  once, parts = (event_log.EventLog(tmp_path / d).index() for d in ("once", "parts"))
  for index in (once, parts):
    for w in index["windows"]:
      w.pop("appended_at")
  assert once == parts  # same windows, same checksums
  with pytest.raises(event_log.LogError, match="use another log directory"):
    event_log.produce(data, tmp_path / "parts", window_seconds=3600)


def test_a_closed_log_is_never_extended_and_users_can_be_sampled(tmp_path, data):
  assert event_log.produce(data, tmp_path / "first3", window_seconds=DAY, max_windows=3) == 3
  assert event_log.EventLog(tmp_path / "first3").index()["closed"]
  with pytest.raises(event_log.LogError, match="closed after 3 windows"):
    event_log.produce(data, tmp_path / "first3", window_seconds=DAY)
  event_log.produce(data, tmp_path / "half", window_seconds=DAY, user_fraction=0.5)
  users = np.unique(np.concatenate(all_events(tmp_path / "half"))["user"])
  keep = np.random.default_rng(0).random(data.num_users) < 0.5
  np.testing.assert_array_equal(users, np.flatnonzero(keep))  # every event of the sampled users
  assert sum(len(e) for e in all_events(tmp_path / "half")) == sum(
      len(s) for s, k in zip(data.item_ids, keep) if k)


def test_a_consumer_tails_the_growing_log(tmp_path, data):
  seen = []
  consumer = threading.Thread(target=lambda: seen.extend(
      i for i, _ in event_log.EventLog(tmp_path).follow(poll_seconds=0.01, timeout=30)))
  consumer.start()
  n = event_log.produce(data, tmp_path, window_seconds=DAY, speed=DAY * 200)  # 5 ms per window
  consumer.join()
  assert seen == list(range(n))


def test_damage_is_named_and_one_producer_at_a_time(tmp_path, data):
  event_log.produce(data, tmp_path, window_seconds=DAY, max_windows=2)
  path = tmp_path / "window-000001.array_record"
  path.write_bytes(path.read_bytes()[:-7])
  with pytest.raises(event_log.LogError, match="window-000001.array_record: checksum mismatch"):
    list(event_log.EventLog(tmp_path).follow(timeout=0))
  (tmp_path / "index.json").write_text("{")
  with pytest.raises(event_log.LogError, match="corrupt index"):
    event_log.EventLog(tmp_path).index()
  with files.exclusive(tmp_path / ".producer.lock", "test"):
    with pytest.raises(files.LockedError, match="in use by process"):
      event_log.produce(data, tmp_path, window_seconds=DAY)
