"""User sequences in memory, leave-one-out splits, and fixed-shape batches via grain.

Protocols (`input.protocol`):
  * "official": the last item of every user is the test target; training uses every earlier
    item; there is no validation split (the official HSTU protocol: report the last epoch).
  * "validation": the second-to-last item is a validation target, the last the test target;
    training uses the items before the validation item; the best epoch is chosen on validation.
Held-out items never enter a training input or target.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

PROTOCOLS = ("official", "validation")
TIME_KEYS = ("ids", "timestamps", "query_times", "targets")  # arrays with a padded time axis


@dataclasses.dataclass
class UserSequences:
  """Chronological per-user sequences (list index = user id - 1) and item side features."""

  name: str
  item_ids: list[np.ndarray]
  ratings: list[np.ndarray]
  timestamps: list[np.ndarray]
  titles: list[str]  # [num_items + 1]; index 0 is padding
  years: np.ndarray  # [num_items + 1]
  genres: np.ndarray  # [num_items + 1, num_genres]

  @property
  def num_items(self) -> int:
    return len(self.titles) - 1

  @property
  def num_users(self) -> int:
    return len(self.item_ids)


def num_held_out(protocol: str) -> int:
  if protocol not in PROTOCOLS:
    raise ValueError(f"input.protocol={protocol!r}: expected one of {PROTOCOLS}")
  return 1 if protocol == "official" else 2


def train_cut(data: UserSequences, protocol: str) -> np.ndarray:
  """Per user, the number of leading items that training may see."""
  return np.array([len(s) for s in data.item_ids]) - num_held_out(protocol)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  out = np.zeros((n,), x.dtype)
  out[: len(x)] = x
  return out


def train_example(data: UserSequences, user: int, cut: int, max_len: int) -> dict[str, np.ndarray]:
  """The most recent `max_len + 1` training items of `user`: inputs predict their successors."""
  ids = data.item_ids[user][:cut][-(max_len + 1):]
  ts = data.timestamps[user][:cut][-(max_len + 1):]
  n = max(len(ids) - 1, 0)
  return {"ids": _pad(ids[:-1], max_len), "timestamps": _pad(ts[:-1], max_len),
          "query_times": _pad(ts[1:], max_len), "targets": _pad(ids[1:], max_len),
          "lengths": np.int32(n)}


def empty_train_example(max_len: int) -> dict[str, np.ndarray]:
  z = np.zeros((max_len,), np.int32)
  return {"ids": z, "timestamps": z.astype(np.int64), "query_times": z.astype(np.int64),
          "targets": z, "lengths": np.int32(0)}


def bucket_length(longest: int, buckets: tuple[int, ...], max_len: int) -> int:
  """The smallest bucket that holds `longest` items (or `max_len`)."""
  return min([b for b in buckets if b >= longest] + [max_len])


def trim(batch: dict[str, np.ndarray], buckets: tuple[int, ...], max_len: int,
         longest: int | None = None) -> dict[str, np.ndarray]:
  """Cuts the padded time axis of a batch to its length bucket (a handful of static shapes):
  the bucket of its longest row, or of `longest` (a whole batch's, when this is a part of it)."""
  if not buckets:
    return batch
  n = bucket_length(int(batch["lengths"].max()) if longest is None else longest, buckets, max_len)
  return {k: (v[:, :n] if k in TIME_KEYS and v.ndim == 2 else v) for k, v in batch.items()}


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                sort_chunk: int) -> np.ndarray:
  """`[steps, batch_size]` slot indices of one epoch: a seeded permutation; with `sort_chunk > 0`,
  every run of `sort_chunk` batches is sorted by length and the batches are shuffled again, so a
  batch holds sequences of similar length (less padding) while every epoch stays random."""
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(len(lengths))
  if sort_chunk > 0:
    size = sort_chunk * batch_size
    perm = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                           for c in np.split(perm, range(size, len(perm), size))])
  batches = perm.reshape(-1, batch_size)
  return batches[rng.permutation(len(batches))] if sort_chunk > 0 else batches


def train_batches(data: UserSequences, protocol: str, max_len: int, batch_size: int,
                  seed: int, num_epochs: int, length_buckets: tuple[int, ...] = (),
                  sort_chunk: int = 0, row_groups: int = 1,
                  process_rows: slice | None = None) -> tuple[grain.MapDataset, int]:
  """Indexable dataset of training batches over `num_epochs` and the number of steps per epoch.

  Every epoch holds every user once in a fresh seeded order, padded with empty (zero-weight)
  examples to a whole number of batches, so batch `s` is a pure function of (seed, s): a
  resumed run continues at the exact stream position. With `length_buckets`, each batch's time
  axis is cut to the smallest bucket that fits it (see `epoch_order` for `sort_chunk`). With
  `row_groups > 1`, a batch is `{"groups": [...]}`: its rows sorted by length and split into
  that many equal groups, each cut to its own bucket, so the short half of a uniform batch
  does not pay for the long half's padding; `rows` holds each row's place in the batch (same
  users, same loss; see `RetrievalTask.loss`).

  `process_rows` builds only those rows of each batch (of each group): one process's share in a
  multi-process run (`distributed.process_rows`). The bucket is still the whole batch's (group's),
  so every process cuts to the same length.
  """
  cuts = train_cut(data, protocol)
  users = [u for u in range(data.num_users) if cuts[u] >= 2]
  steps = -(-len(users) // batch_size)
  slots = np.array(users + [-1] * (steps * batch_size - len(users)))
  lengths = np.where(slots >= 0, np.minimum(cuts[slots] - 1, max_len), 0)  # each slot's "lengths"

  @functools.lru_cache(maxsize=2)
  def order(epoch: int) -> np.ndarray:  # computed once per epoch, not once per batch
    return epoch_order(lengths, batch_size, seed, epoch, sort_chunk)

  def part(batch: np.ndarray, group: np.ndarray) -> dict[str, np.ndarray]:
    mine = group[process_rows or slice(None)]
    rows = [empty_train_example(max_len) if u < 0 else train_example(data, u, cuts[u], max_len)
            for u in slots[batch[mine]]]
    out = trim({k: np.stack([r[k] for r in rows]) for k in rows[0]}, tuple(length_buckets),
               max_len, int(lengths[batch[group]].max()))
    return out if row_groups == 1 else {**out, "rows": mine.astype(np.int32)}

  def make(index: int) -> dict:
    epoch, step = divmod(index, steps)
    batch = order(epoch)[step]
    if row_groups == 1:
      return part(batch, np.arange(batch_size))
    groups = np.split(np.argsort(lengths[batch], kind="stable"), row_groups)
    return {"groups": [part(batch, g) for g in groups]}

  return grain.MapDataset.range(num_epochs * steps).map(make), steps


def row_groups(batch: dict) -> list[dict]:
  """The row groups of a training batch (see `train_batches`): itself if it has none."""
  return batch.get("groups", [batch])


def eval_arrays(data: UserSequences, protocol: str, split: str, max_len: int) -> dict[str, np.ndarray]:
  """Every user's last `max_len` items before the `split` target ("test" | "valid"), the target,
  and the full pre-target history (`seen`, for excluding already-consumed items)."""
  held = num_held_out(protocol)
  if split == "valid" and held < 2:
    raise ValueError("split='valid' needs input.protocol='validation'")
  offset = 1 if split == "test" else 2
  cuts = np.array([len(s) for s in data.item_ids]) - offset
  longest = int(cuts.max())
  out = {k: [] for k in ("ids", "timestamps", "query_times", "lengths", "targets", "seen")}
  for u, cut in enumerate(cuts):
    ids, ts = data.item_ids[u], data.timestamps[u]
    hist, hts = ids[:cut][-max_len:], ts[:cut][-max_len:]
    out["ids"].append(_pad(hist, max_len))
    out["timestamps"].append(_pad(hts, max_len))
    out["query_times"].append(_pad(np.append(hts[1:], ts[cut]), max_len))
    out["lengths"].append(len(hist))
    out["targets"].append(ids[cut])
    out["seen"].append(_pad(ids[:cut], longest))
  return {k: np.asarray(v) for k, v in out.items()}


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, buckets=(), max_len: int = 0):
  """Yields (rows, batch) over every row of `eval_arrays` output. Rows are visited sorted by
  length so a batch can be cut to its length bucket; the tail batch repeats its last row."""
  order = np.argsort(arrays["lengths"], kind="stable")
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
    yield rows, trim({k: v[padded] for k, v in arrays.items()}, tuple(buckets), max_len)


def train_item_counts(data: UserSequences, protocol: str) -> np.ndarray:
  """`[num_items + 1]` interaction counts over the training part (for the popularity baseline)."""
  cuts = train_cut(data, protocol)
  seen = np.concatenate([s[:c] for s, c in zip(data.item_ids, cuts)])
  return np.bincount(seen, minlength=data.num_items + 1)
