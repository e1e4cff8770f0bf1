"""The history cache: LRU by bytes, and an entry of another FM version is never reused."""

import numpy as np

from fmx.serving.history_cache import Entry, HistoryCache, common_prefix


def entry(version, n=10, layers=2):
  events = {f: np.arange(n, dtype=np.int64) for f in ("ids", "surfaces", "actions", "timestamps")}
  kv = [(np.zeros((16, 1, 8), np.float32), np.zeros((16, 1, 8), np.float32))] * layers
  return Entry(version, events, 100, kv, np.zeros(8, np.float32))


def test_lru_by_bytes_and_version_invalidation():
  size = entry(1).nbytes
  cache = HistoryCache(3 * size)
  for u in "abc":
    cache.put(u, entry(1))
  assert cache.get("a", 1) is not None  # a is now the most recently used
  cache.put("d", entry(1))  # evicts b, the least recently used
  assert cache.get("b", 1) is None and len(cache) == 3 and cache.bytes == 3 * size
  assert cache.get("a", 2) is None  # encoded by FM v1: dropped when v2 asks
  assert cache.get("a", 1) is None and cache.bytes == 2 * size
  cache.put("big", entry(1, layers=8))  # larger than the whole cache: not kept
  assert cache.get("big", 1) is None
  assert HistoryCache(0).get("a", 1) is None


def test_common_prefix():
  e = entry(1, n=5)
  same = {f: v.copy() for f, v in e.events.items()}
  assert common_prefix(e, same) == 5
  longer = {f: np.append(v, 9) for f, v in e.events.items()}
  assert common_prefix(e, longer) == 5
  changed = {f: v.copy() for f, v in e.events.items()}
  changed["actions"][2] = 7
  assert common_prefix(e, changed) == 2
