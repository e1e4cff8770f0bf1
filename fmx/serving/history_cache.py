"""The per-user cache of encoded histories (the FM's per-layer keys and values), LRU by bytes.

An entry belongs to one FM version: looking it up under another version drops it. `match`
says how a request can use an entry: `hit` (same events, same request time: the encoding is
reused as it is), `append` (the cached events are a prefix of the request's, and the rows from
`start` on are recomputed), or `miss`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

FIELDS = ("ids", "surfaces", "actions", "timestamps")


@dataclasses.dataclass
class Entry:
  fm_version: int
  events: dict[str, np.ndarray]  # FIELDS, unpadded
  request_time: int
  kv: list  # per layer (k, v), numpy [H, heads, d]
  ue: np.ndarray  # the output at the last history position

  @property
  def nbytes(self) -> int:
    return (sum(k.nbytes + v.nbytes for k, v in self.kv) + self.ue.nbytes
            + sum(a.nbytes for a in self.events.values()))


class HistoryCache:
  """{user: Entry}, at most `capacity` bytes (0: off). Thread-safe."""

  def __init__(self, capacity: int):
    self.capacity, self.bytes = capacity, 0
    self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._entries)

  def get(self, user: str | None, fm_version: int) -> Entry | None:
    if user is None or not self.capacity:
      return None
    with self._lock:
      e = self._entries.get(user)
      if e is None:
        return None
      if e.fm_version != fm_version:  # encoded by another FM version: never reused
        self._drop(user)
        return None
      self._entries.move_to_end(user)
      return e

  def put(self, user: str | None, entry: Entry) -> None:
    if user is None or not self.capacity or entry.nbytes > self.capacity:
      return
    with self._lock:
      if user in self._entries:
        self._drop(user)
      self._entries[user] = entry
      self.bytes += entry.nbytes
      while self.bytes > self.capacity:
        self._drop(next(iter(self._entries)))

  def _drop(self, user: str) -> None:
    self.bytes -= self._entries.pop(user).nbytes


def common_prefix(entry: Entry, events: dict[str, np.ndarray]) -> int:
  """How many leading events of `events` equal the cached entry's (all fields)."""
  n = min(len(entry.events["ids"]), len(events["ids"]))
  same = np.ones(n, bool)
  for f in FIELDS:
    same &= entry.events[f][:n] == events[f][:n]
  return int(n if same.all() else np.argmin(same))
