"""Training examples for one surface's expert: materialised FM knowledge (rows of the TAE store,
`fmx.data.tae_store`) joined with the surface's short-term history.

The expert of surface s reads the store rows whose candidate is on s. A row's short-term
history is the user's last `short_len` events on s among the events the FM's history was cut
from (`[0, history_end)`), so it never contains the row's own window. Tasks are the ones valid
on s, the FM-unseen task included; `fm_probs` keep only those columns too.

Protocol: the FM trains on the training region of every user (`fmx.data.ranking`), so its
`valid` windows are impressions it never trained on; they are the experts' training data. A
seeded fraction of users (`select_fraction`, the same for every seed and carrier) is held out
from them to pick the epoch. `test` windows are the experts' test set, as they are the FM's.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from fmx.data import tae_store
from fmx.data.cross_surface import CrossSurfaceData

# arrays the expert model and its loss read; the rest (user, split) only route rows
MODEL_KEYS = ("ids", "actions", "timestamps", "lengths", "cand", "request_time", "tae", "ue",
              "fm_probs", "labels", "label_valid")


EMBEDDINGS = ("tae", "ue")  # the wide columns, read from the store by row when a batch needs them


def load_index(store: str, fm_version: str) -> tuple[dict[str, np.ndarray], tae_store.RowSource]:
  """The store rows of `fm_version` without their embeddings, read one shard at a time, with
  `row` (each row's index in the returned random-access source, which serves the embeddings of
  the rows a batch takes). A `StoreError` if the store lacks that version."""
  parts, n = [], 0
  for _, arrays in tae_store.read(store, fm_version):
    k = len(arrays["user"])
    if k:
      parts.append({**{c: a for c, a in arrays.items() if c not in EMBEDDINGS},
                    "row": np.arange(n, n + k)})
      n += k
  if not parts:
    raise tae_store.StoreError(f"{store}: FM version {fm_version!r} has no rows; materialise it "
                               "again with the logging tier")
  return ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]},
          tae_store.RowSource(store, fm_version))


def with_embeddings(batch: dict, rows, source: tae_store.RowSource | None) -> dict:
  """`batch` plus the TAEs and UEs of store rows `rows` from `source` (none needed if None)."""
  if source is None:
    return batch
  wide = source.rows(rows)
  return {**batch, **{k: wide[k] for k in EMBEDDINGS}}


def surface_examples(data: CrossSurfaceData, rows: dict[str, np.ndarray], surface: int,
                     short_len: int) -> dict[str, np.ndarray]:
  """One example per store row on `surface`: the model inputs of `MODEL_KEYS` plus user, split."""
  keep = np.flatnonzero(rows["surface"] == surface)
  tasks = np.flatnonzero(data.spec.valid[surface])
  n, t = len(keep), short_len
  out = {"ids": np.zeros((n, t), np.int32), "actions": np.zeros((n, t), np.int32),
         "timestamps": np.zeros((n, t), np.int32), "lengths": np.zeros(n, np.int32)}

  @functools.lru_cache(maxsize=None)
  def history(user: int, end: int) -> np.ndarray:
    ids = data.item_ids[user][:end]
    return np.flatnonzero(data.item_surface[ids] == surface)[-t:]

  for i, r in enumerate(keep):
    u = int(rows["user"][r])
    idx = history(u, int(rows["history_end"][r]))
    k = len(idx)
    out["ids"][i, :k] = data.item_ids[u][idx]
    out["actions"][i, :k] = data.actions[u][idx]
    out["timestamps"][i, :k] = data.timestamps[u][idx]
    out["lengths"][i] = k
  out.update({k: rows[k][keep] for k in EMBEDDINGS + ("row",) if k in rows})
  out.update(cand=rows["cand"][keep].astype(np.int32),
             request_time=rows["request_time"][keep].astype(np.int32),
             fm_probs=rows["fm_probs"][keep][:, tasks].astype(np.float32),
             labels=rows["labels"][keep][:, tasks], label_valid=rows["label_valid"][keep][:, tasks],
             user=rows["user"][keep], split=rows["split"][keep])
  return out


def partition(ex: dict[str, np.ndarray], select_fraction: float, seed: int = 0) -> dict[str, dict]:
  """{"fit", "select", "test"}: valid-window rows split by user, and the test-window rows."""
  users = np.unique(ex["user"])
  held = np.random.default_rng(seed).permutation(users)[:max(1, int(round(select_fraction * len(users))))]
  in_select = np.isin(ex["user"], held)
  valid = ex["split"] == tae_store.SPLIT_IDS["valid"]
  masks = {"fit": valid & ~in_select, "select": valid & in_select,
           "test": ex["split"] == tae_store.SPLIT_IDS["test"]}
  for name, m in masks.items():
    if not m.any():
      raise ValueError(f"expert split {name!r} is empty: the store needs valid and test windows "
                       "of this surface (materialise splits=('valid', 'test'))")
  return {name: {k: v[m] for k, v in ex.items()} for name, m in masks.items()}


def train_batches(ex: dict[str, np.ndarray], batch_size: int, seed: int, num_epochs: int,
                  source: tae_store.RowSource | None = None, process_rows: slice | None = None):
  """Shuffled full batches over `num_epochs` (indexable; batch `s` depends only on seed and s)
  and the steps per epoch. Embeddings come from `source` by row when `ex` lacks them.
  `process_rows` builds (and reads the embeddings of) only those rows of each batch: one
  process's share."""
  n = len(ex["cand"])
  steps = max(1, n // batch_size)
  if n < batch_size:
    raise ValueError(f"{n} expert training rows are fewer than batch_size={batch_size}")

  @functools.lru_cache(maxsize=2)
  def order(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)

  def make(index: int):
    epoch, step = divmod(index, steps)
    idx = order(epoch)[step * batch_size:(step + 1) * batch_size][process_rows or slice(None)]
    batch = {k: ex[k][idx] for k in MODEL_KEYS if k in ex}
    return with_embeddings(batch, None if source is None else ex["row"][idx], source)

  return grain.MapDataset.range(num_epochs * steps).map(make), steps


def eval_batches(ex: dict[str, np.ndarray], batch_size: int,
                 source: tae_store.RowSource | None = None):
  """Fixed-size batches in row order; the tail is padded with rows whose labels are invalid."""
  n = len(ex["cand"])
  for i in range(0, n, batch_size):
    idx = np.minimum(np.arange(i, i + batch_size), n - 1)
    b = {k: ex[k][idx] for k in MODEL_KEYS if k in ex}
    b["label_valid"] = b["label_valid"] & (np.arange(i, i + batch_size) < n)[:, None]
    yield with_embeddings(b, None if source is None else ex["row"][idx], source)
