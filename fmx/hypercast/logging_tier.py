"""The offline FM logging tier: materialises the TAEs of a pinned FM checkpoint into the store
(`fmx.data.tae_store`) that expert trainers read.

One row per candidate impression, tagged with the FM version (via its shard), holding: user,
split (0 train, 1 valid, 2 test), request_time, history_end (the index in the user's events
where the history stops), cand (item id), surface, tae `[d]`, ue `[d]`
(the user embedding of the same history), fm_probs `[num_tasks]`, labels and label_valid.
Every row's history is made only of events before its impression (`fmx.data.ranking`).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from fmx.data import ranking, tae_store
from fmx.train import checkpoint, fm as fm_train


def restore_fm(c: ml_collections.ConfigDict, fm_workdir: str, data):
  """(model, items, params, step) of the latest checkpoint in `fm_workdir`."""
  model, items = fm_train.setup(c, data)
  init = fm_train.make_steps(c, model, items, data.spec, data.spec.fm_tasks)[0]
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  ckpt = checkpoint.Checkpointer(fm_workdir)
  restored = ckpt.restore(abstract)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no FM checkpoint in {fm_workdir}/checkpoints: train the FM first "
                            "(python -m fmx.main --config=fmx/configs/ml1m_fm.py ...)")
  state, _ = restored
  return model, items, state.params, int(state.step)


def materialise(c: ml_collections.ConfigDict, fm_workdir: str, store_root: str, fm_version: str,
                data, splits=("train", "valid", "test"), train_windows: int = 1) -> int:
  """Writes one shard per split and returns the number of rows written. Training windows are
  the FM pipeline's own (seeded) windows of its first epoch."""
  model, items, params, _ = restore_fm(c, fm_workdir, data)
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b, items, return_user=True))
  H, T, bs = c.input.max_history, c.input.num_candidates, c.evals.batch_size
  total = 0
  for split in splits:
    if split == "train":
      ds, steps = ranking.train_batches(data, H, T, bs, c.seed, 1, train_windows)
      batches = (ds[i] for i in range(steps))
    else:
      batches = ranking.eval_batches(data, split, H, T, bs)
    rows = {k: [] for k in ("user", "split", "request_time", "history_end", "cand", "surface", "tae", "ue",
                            "fm_probs", "labels", "label_valid")}
    for b in batches:
      tae, logits, ue = (np.asarray(x) for x in forward(params, b))
      real = np.arange(T)[None, :] < b["num_targets"][:, None]
      bi, _ = np.nonzero(real)
      cand = np.take_along_axis(b["ids"], b["cand_index"], axis=1)
      surf = np.take_along_axis(b["surfaces"], b["cand_index"], axis=1)
      rows["user"].append(b["user"][bi])
      rows["split"].append(np.full(len(bi), tae_store.SPLIT_IDS[split], np.int8))
      rows["request_time"].append(b["request_time"][bi])
      rows["history_end"].append(b["history_end"][bi])
      rows["cand"].append(cand[real])
      rows["surface"].append(surf[real])
      rows["tae"].append(tae[real])
      rows["ue"].append(ue[bi])
      rows["fm_probs"].append(1.0 / (1.0 + np.exp(-logits[real])))
      rows["labels"].append(b["labels"][real])
      rows["label_valid"].append(b["label_valid"][real])
    arrays = {k: np.concatenate(v) for k, v in rows.items()}
    tae_store.write_shard(store_root, fm_version, arrays)
    total += len(arrays["user"])
  return total
