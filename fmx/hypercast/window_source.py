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
  rows = None  # every process reads whole batches

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
      for u, rows in by_user(events):
        for key, field in FIELDS:
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
    for u, rows in by_user(events):
      seq = {k: np.concatenate(history[k][u] + [rows[f]]) for k, f in FIELDS}
      examples += user_examples(self.items, u, seq, len(rows), self.H, self.T)
    return batch_examples(examples, self.batch_size, self.H, self.T, self.items.spec.num_tasks)


FIELDS = (("item_ids", "item"), ("timestamps", "timestamp"), ("actions", "action"),
          ("labels", "labels"))  # (sequence key, event field)


def user_examples(items: CrossSurfaceData, user: int, seq: dict, new: int, max_history: int,
                  num_candidates: int) -> list[dict]:
  """The ranking examples of a user's `new` last events of `seq` (the user's events up to the
  end of a window, by `FIELDS` key), in time order: groups of up to `num_candidates`."""
  view = dataclasses.replace(items, item_ids={user: seq["item_ids"]},
                             timestamps={user: seq["timestamps"]},
                             actions={user: seq["actions"]}, labels={user: seq["labels"]})
  end = len(seq["item_ids"])
  return [ranking.example(view, user, cut, end, max_history, num_candidates)  # a first-ever
          for cut in range(max(end - new, 1), end, num_candidates)]  # event is history only


def batch_examples(examples: list[dict], batch_size: int, max_history: int, num_candidates: int,
                   num_tasks: int) -> list[dict]:
  """Batches of `batch_size` examples in order, the last padded with empty ones."""
  empty = ranking.empty_example(max_history, num_candidates, num_tasks)
  examples = examples + [empty] * (-len(examples) % batch_size)
  return [ranking.stack(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def by_user(events: np.ndarray):
  """(user, that user's events in time order) for every user of a window."""
  order = np.argsort(events["user"], kind="stable")
  users, starts = np.unique(events["user"][order], return_index=True)
  for u, rows in zip(users, np.split(order, starts[1:])):
    yield int(u), events[rows]
