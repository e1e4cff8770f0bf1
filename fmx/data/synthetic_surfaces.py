"""Seeded synthetic cross-surface data with known ground truth.

Every surface has its own item pool, task set and base rates. Users and items have latent
vectors; a user's interest drifts as a random walk over their events. An event's surface is
drawn from the user's (fixed) surface mix, its item from that surface's pool by affinity; the
label of task t is Bernoulli(sigmoid(scale * <user_now, item> + bias[surface, t])), so the true
probability of every label is known. Tasks: `click` and `like` on every surface, a private
auxiliary task per surface (`s<k>_share`), and `comment`, which the foundation model never sees.

`generate` builds a `CrossSurfaceData` in memory; `iter_users` yields users one at a time, so
10M+ events stream without being held in memory.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from fmx.data.cross_surface import CONTENT_DIM, CrossSurfaceData, TaskSpec
from fmx.data.raw import GENRES

LATENT = 8


def spec(num_surfaces: int = 4) -> TaskSpec:
  surfaces = tuple(f"s{k}" for k in range(num_surfaces))
  tasks = ("click", "like") + tuple(f"{s}_share" for s in surfaces) + ("comment",)
  valid = np.zeros((num_surfaces, len(tasks)), bool)
  valid[:, [0, 1, len(tasks) - 1]] = True
  valid[np.arange(num_surfaces), 2 + np.arange(num_surfaces)] = True
  fm = np.ones(len(tasks), bool)
  fm[-1] = False
  weights = np.array([1.0, 1.0] + [0.5] * num_surfaces + [1.0])
  return TaskSpec(surfaces, tasks, valid, fm, weights)


class World:
  """Items, biases and the label model; users come from `user(u)`."""

  def __init__(self, num_items: int = 2000, num_surfaces: int = 4, seed: int = 0):
    rng = np.random.default_rng([seed, 0])
    self.spec = spec(num_surfaces)
    self.seed = seed
    self.item_surface = np.concatenate([[0], rng.integers(0, num_surfaces, num_items)]).astype(np.int32)
    self.item_latent = rng.normal(size=(num_items + 1, LATENT)) / np.sqrt(LATENT)
    self.item_latent[0] = 0
    self.pools = [np.flatnonzero(self.item_surface[1:] == s) + 1 for s in range(num_surfaces)]
    # task biases per surface: distinct base rates; invalid tasks never used
    self.bias = rng.normal(-2.0, 0.8, size=(num_surfaces, self.spec.num_tasks))
    self.task_scale = rng.uniform(1.0, 2.5, size=self.spec.num_tasks)
    proj = rng.normal(size=(LATENT, CONTENT_DIM)) / np.sqrt(LATENT)
    content = self.item_latent @ proj + 0.3 * rng.normal(size=(num_items + 1, CONTENT_DIM))
    self.item_content = (content / np.maximum(np.linalg.norm(content, axis=1, keepdims=True), 1e-6)).astype(np.float32)
    self.item_genres = np.zeros((num_items + 1, len(GENRES)), bool)
    self.item_genres[np.arange(num_items + 1), 1 + (np.argmax(self.item_latent, 1) % (len(GENRES) - 1))] = True
    self.item_year = np.where(np.arange(num_items + 1) > 0, rng.integers(1950, 2020, num_items + 1), 0).astype(np.int32)

  def probabilities(self, user_now: np.ndarray, items: np.ndarray) -> np.ndarray:
    """True label probabilities `[len(items), num_tasks]` for latent user states `[len, LATENT]`."""
    aff = np.sum(user_now * self.item_latent[items], axis=-1)
    logits = self.task_scale[None, :] * aff[:, None] * 3.0 + self.bias[self.item_surface[items]]
    return 1.0 / (1.0 + np.exp(-logits))

  def user(self, u: int, min_len: int = 20, max_len: int = 120, drift: float = 0.15):
    """One user's events: (items, timestamps, surfaces, labels, true probabilities)."""
    rng = np.random.default_rng([self.seed, 1, u])
    n = int(rng.integers(min_len, max_len + 1))
    mix = rng.dirichlet(np.ones(len(self.pools)) * 0.7)
    start = rng.normal(size=LATENT) / np.sqrt(LATENT)
    states = start + np.cumsum(drift * rng.normal(size=(n, LATENT)) / np.sqrt(LATENT), axis=0)
    surfaces = rng.choice(len(self.pools), size=n, p=mix)
    cand = np.stack([self.pools[s][rng.integers(0, len(self.pools[s]), 16)] for s in surfaces])
    score = np.einsum("nkd,nd->nk", self.item_latent[cand], states) * 4.0
    pick = np.argmax(score + rng.gumbel(size=score.shape), axis=1)  # softmax sampling
    items = cand[np.arange(n), pick].astype(np.int32)
    probs = self.probabilities(states, items)
    labels = (rng.random(probs.shape) < probs).astype(np.int8)
    labels &= self.spec.valid[self.item_surface[items]].astype(np.int8)
    ts = 1_600_000_000 + np.cumsum(rng.exponential(6 * 3600.0, n)).astype(np.int64)
    return items, ts, self.item_surface[items], labels, probs


def actions_from_labels(labels: np.ndarray) -> np.ndarray:
  return (1 + labels[:, 0] + labels[:, 1]).astype(np.int32)  # click, like


def iter_users(world: World, num_users: int, **kw) -> Iterator[dict]:
  for u in range(num_users):
    items, ts, surf, labels, probs = world.user(u, **kw)
    yield {"user_id": u + 1, "item_ids": items, "timestamps": ts, "surfaces": surf,
           "actions": actions_from_labels(labels), "labels": labels, "probs": probs}


def generate(num_users: int = 500, num_items: int = 2000, num_surfaces: int = 4, seed: int = 0,
             min_len: int = 20, max_len: int = 120) -> CrossSurfaceData:
  world = World(num_items, num_surfaces, seed)
  users = list(iter_users(world, num_users, min_len=min_len, max_len=max_len))
  return CrossSurfaceData(
      "synthetic-cross-surface", world.spec, [r["item_ids"] for r in users],
      [r["timestamps"] for r in users], [r["actions"] for r in users],
      [r["labels"] for r in users], world.item_surface, world.item_genres, world.item_year,
      world.item_content)
