"""The HyperCast event log: a dataset's events replayed in time order as windows of simulated
time, appended by one producer while consumers tail it.

Layout of a log directory:
  window-<i:06d>.array_record  one record per event: a packed row of `event_dtype(num_tasks)`
                               (offset, user, item, surface, timestamp, action, labels)
  index.json                   {"format", "dataset", "window_seconds", "num_tasks", "closed",
                                "windows": [{"file", "first_offset", "events", "t_start",
                                             "t_end", "sha256", "appended_at"}, ...]}
A window file is written under a temporary name, fsynced and renamed; only then is the index
rewritten (atomically) with one more window, so a consumer that follows the index never sees a
partial window. Every event has a global offset: window i holds offsets
[first_offset, first_offset + events). Windows are cut at multiples of `window_seconds` from
the first event's time; empty windows are skipped. `closed` says the producer has written all.
`appended_at` is the wall time a window became visible (for the pipeline's delays).
`user_fraction` < 1 replays a seeded sample of the users (all their events), for quick runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Iterator

import numpy as np
from array_record.python import array_record_module

from fmx import files
from fmx.data import load as data_load
from fmx.data.cross_surface import CrossSurfaceData
from fmx.train import reporting

INDEX = "index.json"
FORMAT = 1


class LogError(ValueError):
  """A damaged or mismatched event log; the message names the file and what to do."""


def event_dtype(num_tasks: int) -> np.dtype:
  return np.dtype([("offset", "<i8"), ("user", "<i4"), ("item", "<i4"), ("surface", "<i4"),
                   ("timestamp", "<i8"), ("action", "<i4"), ("labels", "i1", (num_tasks,))])


def events_of(data: CrossSurfaceData) -> np.ndarray:
  """Every event of `data` in time order (ties: by user, then the user's own order), numbered."""
  users = np.concatenate([np.full(len(s), u, np.int32) for u, s in enumerate(data.item_ids)])
  rank = np.concatenate([np.arange(len(s)) for s in data.item_ids])
  ts = np.concatenate(data.timestamps).astype(np.int64)
  order = np.lexsort((rank, users, ts))
  out = np.zeros(len(order), event_dtype(data.spec.num_tasks))
  items = np.concatenate(data.item_ids).astype(np.int32)[order]
  out["offset"] = np.arange(len(order))
  out["user"], out["item"], out["timestamp"] = users[order], items, ts[order]
  out["surface"] = data.item_surface[items]
  out["action"] = np.concatenate(data.actions)[order]
  out["labels"] = np.concatenate(data.labels)[order]
  return out


def window_bounds(timestamps: np.ndarray, window_seconds: int) -> list[tuple[int, int, int]]:
  """(start row, end row, window number) of every non-empty window of sorted `timestamps`."""
  number = (timestamps - timestamps[0]) // window_seconds
  cuts = np.flatnonzero(np.diff(number)) + 1
  starts, ends = np.r_[0, cuts], np.r_[cuts, len(timestamps)]
  return [(int(s), int(e), int(number[s])) for s, e in zip(starts, ends)]


class EventLog:
  """Reads (and, through `produce`, writes) the log in `root`."""

  def __init__(self, root: os.PathLike | str):
    self.root = pathlib.Path(root)

  def index(self) -> dict:
    path = self.root / INDEX
    if not path.is_file():
      return {"windows": [], "closed": False}
    try:
      index = json.loads(path.read_text())
    except ValueError:
      index = None
    if not isinstance(index, dict) or not isinstance(index.get("windows"), list):
      raise LogError(f"{path}: corrupt index; stop the producer, delete {self.root} and replay "
                     "the log again")
    return index

  def read_window(self, i: int, index: dict | None = None) -> np.ndarray:
    """The events of window `i`, checked against the index's checksum."""
    index = index or self.index()
    entry = index["windows"][i]
    path = self.root / entry["file"]
    try:
      data = path.read_bytes()
    except FileNotFoundError:
      raise LogError(f"{path}: listed in {self.root / INDEX} but missing") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
      raise LogError(f"{path}: checksum mismatch (a corrupt or truncated window); replay it "
                     "with the producer")
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
      rows = b"".join(reader.read_all())
    finally:
      reader.close()
    events = np.frombuffer(rows, event_dtype(index["num_tasks"]))
    offsets = entry["first_offset"] + np.arange(entry["events"])
    if len(events) != entry["events"] or not np.array_equal(events["offset"], offsets):
      raise LogError(f"{path}: holds other events than its index entry says")
    return events

  def follow(self, start: int = 0, poll_seconds: float = 0.2,
             timeout: float | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (window, events) from window `start` on, waiting for new windows, until the
    producer has closed the log and every window was yielded (or `timeout` seconds pass
    without a new window)."""
    i, waited = start, 0.0
    while True:
      index = self.index()
      if i < len(index["windows"]):
        yield i, self.read_window(i, index)
        i, waited = i + 1, 0.0
      elif index["closed"] or (timeout is not None and waited >= timeout):
        return
      else:
        time.sleep(poll_seconds)
        waited += poll_seconds


def sample_users(data: CrossSurfaceData, fraction: float, seed: int = 0) -> CrossSurfaceData:
  """`data` with only a seeded `fraction` of its users' events (the others get none)."""
  if fraction >= 1.0:
    return data
  keep = np.random.default_rng(seed).random(data.num_users) < fraction
  empty = lambda seqs: [s if k else s[:0] for s, k in zip(seqs, keep)]
  return dataclasses.replace(data, item_ids=empty(data.item_ids),
                             timestamps=empty(data.timestamps), actions=empty(data.actions),
                             labels=empty(data.labels))


def produce(data: CrossSurfaceData, root: os.PathLike | str, window_seconds: int,
            speed: float = float("inf"), max_windows: int | None = None,
            user_fraction: float = 1.0) -> int:
  """Appends the windows of `data` that `root` lacks, in order, at `speed` simulated seconds
  per wall second (inf: as fast as possible), and closes the log when all are in (or when
  `max_windows` are). Resumes a log another producer left (windows are a pure function of the
  data, `window_seconds` and `user_fraction`).
  Returns the number of windows the log holds. One producer at a time holds the log."""
  root = pathlib.Path(root)
  with files.exclusive(root / ".producer.lock", f"event log {root}"):
    log = EventLog(root)
    events = events_of(sample_users(data, user_fraction))
    bounds = window_bounds(events["timestamp"], window_seconds)
    index = log.index()
    header = {"format": FORMAT, "dataset": data.name, "window_seconds": int(window_seconds),
              "num_tasks": int(data.spec.num_tasks), "user_fraction": float(user_fraction)}
    if index["windows"] and any(index.get(k) != v for k, v in header.items()):
      raise LogError(f"{root / INDEX} holds a log of {({k: index.get(k) for k in header})}, not "
                     f"{header}: use another log directory")
    stop = len(bounds) if max_windows is None else min(len(bounds), max_windows)
    if index["closed"] and len(index["windows"]) != stop:
      raise LogError(f"{root / INDEX}: the log was closed after {len(index['windows'])} windows "
                     f"and consumers may have finished with it; replay {stop} windows into "
                     "another log directory")
    index = {**header, "closed": index["closed"], "windows": index["windows"]}
    t0 = int(events["timestamp"][0]) if len(events) else 0
    for s, e, number in bounds[len(index["windows"]):stop]:
      entry = {"file": f"window-{len(index['windows']):06d}.array_record",
               "first_offset": s, "events": e - s, "t_start": t0 + number * window_seconds,
               "t_end": t0 + (number + 1) * window_seconds}
      entry["sha256"] = _write_window(root / entry["file"], events[s:e])
      entry["appended_at"] = time.time()
      index["windows"].append(entry)
      index["closed"] = len(index["windows"]) == stop
      files.atomic_write(root / INDEX, json.dumps(index, indent=1))
      if speed != float("inf"):
        time.sleep(window_seconds / speed)
    if len(index["windows"]) >= stop and not index["closed"]:
      index["closed"] = True
      files.atomic_write(root / INDEX, json.dumps(index, indent=1))
    return len(index["windows"])


def _write_window(path: pathlib.Path, events: np.ndarray) -> str:
  """Writes one record per event under a temporary name, fsyncs, renames; returns the sha256."""
  tmp = path.with_name(f".{path.name}.tmp")
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:256")
  for row in events:
    writer.write(row.tobytes())
  writer.close()
  with open(tmp, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  files.fsync_dir(path.parent)
  return digest


def train_and_evaluate(config, workdir: str) -> dict:
  """`job="event_log"`: replays `config.input`'s dataset into the log in `workdir`."""
  t0 = time.time()
  data = data_load.load(config.input, "surfaces")
  windows = produce(data, workdir, config.window_seconds, config.speed or float("inf"),
                    config.max_windows or None, config.get("user_fraction", 1.0))
  index = EventLog(workdir).index()
  results = {"windows": windows, "events": sum(w["events"] for w in index["windows"]),
             "closed": index["closed"], "dataset": data.name, "steps": 0,
             "wall_s": round(time.time() - t0, 2), "config": config.to_dict()}
  reporting.write_results(workdir, results)
  return results
