"""The offline FM logging tier: materialises the TAEs of a pinned FM checkpoint into the store
(`fmx.data.tae_store`) that expert trainers read.

One row per candidate impression, tagged with the FM version (its store version), holding: user,
split (0 train, 1 valid, 2 test), request_time, history_end (the index in the user's events
where the history stops), cand (item id), surface, tae `[d]`, ue `[d]` (the user embedding of
the same history), fm_probs `[num_tasks]`, labels and label_valid. Every row's history is made
only of events before its impression (`fmx.data.ranking`). A version is written all-or-nothing
by one writer at a time; materialising a committed version again is a no-op.

Over several processes (`jax.distributed`), every process runs every batch's forward pass (the
FM is sharded over all of them) and writes only its own shards: process p of P writes shard
`s * P + p` of split s, holding the rows of its contiguous block of the split's batches, so the
shards in index order hold the rows of a one-process run in the same order. The primary alone
holds the version's lock and commits the version once every process has staged its shards.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from fmx import distributed
from fmx.data import load as data_load, ranking, tae_store
from fmx.runtime import fm as fm_runtime
from fmx.train import reporting, sharding

COLUMNS = ("user", "split", "request_time", "history_end", "cand", "surface", "tae", "ue",
           "fm_probs", "labels", "label_valid")


def window_rows(fm: fm_runtime.PinnedFM, batch: dict, split: str) -> dict[str, np.ndarray]:
  """The store rows of one batch of ranking windows: one per real candidate."""
  tae, probs, ue = (np.asarray(x) for x in fm.forward(batch))
  real = np.arange(batch["cand_index"].shape[1])[None, :] < batch["num_targets"][:, None]
  bi, _ = np.nonzero(real)
  return {"user": batch["user"][bi], "split": np.full(len(bi), tae_store.SPLIT_IDS[split], np.int8),
          "request_time": batch["request_time"][bi], "history_end": batch["history_end"][bi],
          "cand": np.take_along_axis(batch["ids"], batch["cand_index"], axis=1)[real],
          "surface": np.take_along_axis(batch["surfaces"], batch["cand_index"], axis=1)[real],
          "tae": tae[real], "ue": ue[bi], "fm_probs": probs[real], "labels": batch["labels"][real],
          "label_valid": batch["label_valid"][real]}


def materialise(fm: fm_runtime.PinnedFM, store: str, fm_version: str,
                splits=("train", "valid", "test"), batch_size: int = 128) -> int:
  """Writes `fm_version` and returns its rows; 0 if the store already holds that version.
  Training windows are the FM pipeline's own (seeded) windows of its first epoch.

  Over several processes (sharing the store's filesystem) every process writes its block of
  each split's batches as shard `split * processes + process`, and the primary alone takes the
  version's lock and commits it; a failure anywhere fails every process and commits nothing."""
  if fm_version in tae_store.versions(store):
    return 0
  c, data = fm.config, fm.data
  H, T = c.input.max_history, c.input.num_candidates
  meta = {"fm_workdir": fm.workdir, "fm_step": fm.step, "dataset": c.input.dataset,
          "synthetic": c.input.synthetic.to_dict() if c.input.dataset == "synthetic" else None}
  procs, me = jax.process_count(), jax.process_index()

  def write_mine():
    staging = tae_store.staging_dir(store, fm_version)
    for s, split in enumerate(splits):
      if split == "train":
        ds, steps = ranking.train_batches(data, H, T, c.input.batch_size, c.seed, 1,
                                          c.input.windows_per_user)
        batches = (ds[i] for i in range(steps))
      else:
        batches = ranking.eval_batches(data, split, H, T, batch_size)
      parts = [window_rows(fm, b, split) for b in batches]  # every process runs every batch
      mine = parts[me * len(parts) // procs:(me + 1) * len(parts) // procs] or [
          {k: v[:0] for k, v in parts[0].items()}]
      tae_store.write_shard(staging, fm_version, s * procs + me,
                            {k: np.concatenate([p[k] for p in mine]) for k in COLUMNS})

  name = f"fmx logging {fm_version}"
  with contextlib.ExitStack() as stack:
    open_version = lambda: stack.enter_context(tae_store.write_version(store, fm_version, meta))
    distributed.all_or_none(f"{name}: open", open_version if distributed.is_primary() else int)
    distributed.all_or_none(f"{name}: stage", write_mine)  # on failure, the stack commits nothing
    commit = stack.pop_all()
  distributed.all_or_none(f"{name}: commit", commit.close)
  return tae_store.version_meta(store, fm_version)["rows"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`job="logging"`: materialise `config.fm_workdir`'s checkpoint as `config.fm_version`."""
  c, t0 = config, time.time()
  tae_store.version_dir(c.store, c.fm_version)  # a safe name, checked before the FM loads
  unknown = set(c.splits) - set(tae_store.SPLIT_IDS)
  if unknown or not c.splits:
    raise ValueError(f"--config.splits={tuple(c.splits)}: expected some of {tuple(tae_store.SPLIT_IDS)}")
  results = {"fm_version": c.fm_version, "store": c.store, "config": c.to_dict(), "steps": 0}
  if c.fm_version in tae_store.versions(c.store):
    meta = tae_store.version_meta(c.store, c.fm_version)
    if meta.get("fm_workdir") != os.path.abspath(c.fm_workdir) or (
        c.fm_step and meta.get("fm_step") != c.fm_step):
      raise tae_store.StoreError(
          f"{c.store}: version {c.fm_version!r} holds the TAEs of {meta.get('fm_workdir')} step "
          f"{meta.get('fm_step')}; versions never change: pick another --config.fm_version")
    print(f"fmx: {c.store} already holds FM version {c.fm_version!r}; nothing to do",
          file=sys.stderr)
    results.update(rows=0, wall_s=round(time.time() - t0, 2))
    reporting.write_results(workdir, results)
    return results

  def load_data(fm_config):
    fm_config.input.update(c.input.to_dict())  # this machine's data locations
    return data_load.load(fm_config.input, "surfaces")

  fm = fm_runtime.restore(c.fm_workdir, step=c.fm_step or None, load_data=load_data,
                          layout=sharding.Layout.of(c.mesh))
  rows = materialise(fm, c.store, c.fm_version, tuple(c.splits), c.batch_size)
  results.update(rows=rows, fm_step=fm.step, wall_s=round(time.time() - t0, 2))
  reporting.write_results(workdir, results)
  return results
