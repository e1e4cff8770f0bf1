"""Seeded synthetic sequences with known structure, for tests and benchmarks.

Items form `num_clusters` clusters laid out in a ring. Each user starts in a random cluster and
mostly moves to the next item of the ring within the cluster (a learnable sequential signal),
sometimes jumps to the neighbouring cluster (interest drift), and sometimes picks a random
item (noise). Timestamps increase by exponential gaps; ratings are 1..5.
"""

from __future__ import annotations

import numpy as np

from fmx.data.raw import GENRES
from fmx.data.sequences import UserSequences


def generate(num_users: int = 200, num_items: int = 300, min_len: int = 8, max_len: int = 60,
             num_clusters: int = 10, p_next: float = 0.7, p_drift: float = 0.1,
             seed: int = 0) -> UserSequences:
  rng = np.random.default_rng(seed)
  per = num_items // num_clusters
  if per < 2:
    raise ValueError("synthetic: need at least 2 items per cluster")
  item_ids, ratings, timestamps = [], [], []
  for _ in range(num_users):
    n = int(rng.integers(min_len, max_len + 1))
    c, j = int(rng.integers(num_clusters)), int(rng.integers(per))
    seq = np.empty(n, np.int32)
    for t in range(n):
      r = rng.random()
      if r < p_next:
        j = (j + 1) % per
      elif r < p_next + p_drift:
        c, j = (c + 1) % num_clusters, int(rng.integers(per))
      else:
        j = int(rng.integers(per))
      seq[t] = 1 + c * per + j
    item_ids.append(seq)
    ratings.append(rng.integers(1, 6, n).astype(np.int8))
    timestamps.append(1_000_000_000 + np.cumsum(rng.exponential(3600.0, n)).astype(np.int64))
  total = num_clusters * per
  genres = np.zeros((total + 1, len(GENRES)), bool)
  genres[1:, 1:][np.arange(total), (np.arange(total) // per) % (len(GENRES) - 1)] = True
  return UserSequences("synthetic", item_ids, ratings, timestamps,
                       [""] + [f"item {i}" for i in range(1, total + 1)],
                       np.zeros(total + 1, np.int32), genres)
