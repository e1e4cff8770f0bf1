"""Seekable batch sources for the training loop.

A source yields `(batch, position)` pairs from a saved position on; `position` is a JSON
object saying where the stream stands after that batch, stored in the same checkpoint as the
model, so a resumed run continues with the next unseen batch. `steps_per_epoch` is None for
a stream without epochs, `total_steps` None for one that ends when its producer stops. `rows`
(optional) is the slice of every batch's rows that this process builds in a multi-process run
(the rows on its devices, `distributed.process_rows`); a source without it, or with None, yields
whole batches.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import grain


class Source(Protocol):
  steps_per_epoch: int | None
  total_steps: int | None
  rows: slice | None

  def start(self) -> dict: ...

  def iterate(self, position: dict) -> Iterator[tuple[dict, dict]]: ...


class EpochSource:
  """Epochs of an indexable dataset whose batch `i` is a pure function of (seed, i): the
  position is the index of the next batch. `rows`: the batches hold only those rows."""

  def __init__(self, batches: grain.MapDataset, steps_per_epoch: int, prefetch: int = 4,
               rows: slice | None = None):
    self.batches, self.steps_per_epoch, self.prefetch = batches, steps_per_epoch, prefetch
    self.total_steps, self.rows = len(batches), rows

  def start(self) -> dict:
    return {"batch": 0}

  def iterate(self, position: dict):
    start = int(position["batch"])
    it = self.batches[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch))
    for i, batch in enumerate(it, start + 1):
      yield batch, {"batch": i}
