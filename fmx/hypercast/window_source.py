"""The streaming FM trainer's source: ranking batches from the windows of the event log.

Every event of a window is an impression to rank. A user's impressions in a window are cut into
groups of up to `num_candidates` in time order; a group's history is the user's `max_history`
most recent events strictly before the group, from every surface and every earlier window (so
nothing after an impression leaks into its history). A user's first-ever event has no history:
it is only history for later impressions. Groups are batched in (user, time) order,
the last batch of a window padded with empty examples.

The position `{"window", "batch", "events"}` says where the next batch starts and how many
events (real candidates) have been trained on; saved in the same checkpoint as the model, it
makes a restarted trainer take every event exactly once. User histories are rebuilt on resume
by re-reading the windows before the position (a pure function of the log).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fmx.data import ranking
from fmx.data.cross_surface import CrossSurfaceData
from fmx.hypercast.event_log import EventLog


class WindowSource:
  """A `fmx.data.source.Source` over the event log in `log_dir`; `items` is the dataset whose
  item side tables and task spec the events refer to (its events are not read)."""

  steps_per_epoch = None
  total_steps = None

  def __init__(self, log_dir: str, items: CrossSurfaceData, max_history: int,
               num_candidates: int, batch_size: int, poll_seconds: float = 0.2,
               timeout: float | None = None):
    self.log, self.items = EventLog(log_dir), items
    self.H, self.T, self.batch_size = max_history, num_candidates, batch_size
    self.poll_seconds, self.timeout = poll_seconds, timeout
    self.current = None  # (window, events, batches) of the newest window read

  def start(self) -> dict:
    return {"window": 0, "batch": 0, "events": 0}

  def windows(self, start: int = 0):
    """Yields (window, events, batches) from window `start` on, as the log grows; histories of
    the windows before `start` are rebuilt from the log. The newest is kept in `self.current`."""
    history = {k: [[] for _ in range(self.items.num_users)]
               for k in ("item_ids", "timestamps", "actions", "labels")}
    for w, events in self.log.follow(poll_seconds=self.poll_seconds, timeout=self.timeout):
      if w >= start:
        self.current = (w, events, self.window_batches(history, events))
        yield self.current
      for u, rows in _by_user(events):
        for key, field in (("item_ids", "item"), ("timestamps", "timestamp"),
                           ("actions", "action"), ("labels", "labels")):
          history[key][u].append(rows[field])

  def iterate(self, position: dict):
    done = position["events"]
    for w, _, batches in self.windows(position["window"]):
      for b, batch in enumerate(batches):
        if w == position["window"] and b < position["batch"]:
          continue  # trained before the restart
        done += int(batch["num_targets"].sum())
        yield batch, {"window": w, "batch": b + 1, "events": done}

  def window_batches(self, history: dict, events: np.ndarray) -> list[dict]:
    """The ranking batches of one window, given the users' events of earlier windows."""
    examples = []
    for u, rows in _by_user(events):
      seq = {k: np.concatenate(history[k][u] + [rows[f]]) for k, f in
             (("item_ids", "item"), ("timestamps", "timestamp"), ("actions", "action"),
              ("labels", "labels"))}
      view = dataclasses.replace(self.items, item_ids={u: seq["item_ids"]},
                                 timestamps={u: seq["timestamps"]}, actions={u: seq["actions"]},
                                 labels={u: seq["labels"]})
      end = len(seq["item_ids"])
      for cut in range(max(end - len(rows), 1), end, self.T):  # a first-ever event: history only
        examples.append(ranking.example(view, u, cut, end, self.H, self.T))
    empty = ranking.empty_example(self.H, self.T, self.items.spec.num_tasks)
    examples += [empty] * (-len(examples) % self.batch_size)
    return [ranking.stack(examples[i:i + self.batch_size])
            for i in range(0, len(examples), self.batch_size)]


def _by_user(events: np.ndarray):
  """(user, that user's events in time order) for every user of a window."""
  order = np.argsort(events["user"], kind="stable")
  users, starts = np.unique(events["user"][order], return_index=True)
  for u, rows in zip(users, np.split(order, starts[1:])):
    yield int(u), events[rows]
