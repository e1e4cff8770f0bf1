"""Expert examples: the short-term history is the surface's last T events before the window,
splits are disjoint by user, padded evaluation rows count for nothing."""

import numpy as np

from fmx.data import expert_examples, ranking, synthetic_surfaces, tae_store

T_SHORT = 5


def _rows(data, num_candidates=4):
  """Store rows (as the logging tier writes them, FM outputs faked) of valid and test windows."""
  rows = {k: [] for k in ("user", "split", "request_time", "history_end", "cand", "surface", "tae",
                          "ue", "fm_probs", "labels", "label_valid")}
  rng = np.random.default_rng(0)
  for split in ("valid", "test"):
    for b in ranking.eval_batches(data, split, 10, num_candidates, 8):
      real = np.arange(num_candidates)[None, :] < b["num_targets"][:, None]
      bi, _ = np.nonzero(real)
      rows["user"].append(b["user"][bi])
      rows["split"].append(np.full(len(bi), tae_store.SPLIT_IDS[split]))
      rows["request_time"].append(b["request_time"][bi])
      rows["history_end"].append(b["history_end"][bi])
      rows["cand"].append(np.take_along_axis(b["ids"], b["cand_index"], 1)[real])
      rows["surface"].append(np.take_along_axis(b["surfaces"], b["cand_index"], 1)[real])
      rows["labels"].append(b["labels"][real])
      rows["label_valid"].append(b["label_valid"][real])
      rows["tae"].append(rng.normal(size=(len(bi), 6)))
      rows["ue"].append(rng.normal(size=(len(bi), 6)))
      rows["fm_probs"].append(rng.uniform(size=(len(bi), data.spec.num_tasks)))
  return {k: np.concatenate(v) for k, v in rows.items()}


def test_short_term_history_is_the_surfaces_last_events_before_the_window():
  data = synthetic_surfaces.generate(num_users=30, num_items=120, seed=3, min_len=20, max_len=40)
  rows = _rows(data)
  for s in range(len(data.spec.surfaces)):
    ex = expert_examples.surface_examples(data, rows, s, T_SHORT)
    on_s = rows["surface"] == s
    assert len(ex["cand"]) == on_s.sum() and (data.item_surface[ex["cand"]] == s).all()
    tasks = np.flatnonzero(data.spec.valid[s])
    np.testing.assert_array_equal(ex["labels"], rows["labels"][on_s][:, tasks])
    np.testing.assert_array_equal(ex["fm_probs"], rows["fm_probs"][on_s][:, tasks].astype(np.float32))
    for i, (u, end) in enumerate(zip(rows["user"][on_s], rows["history_end"][on_s])):
      ids = data.item_ids[u]
      expect = [j for j in range(end) if data.item_surface[ids[j]] == s][-T_SHORT:]
      k = ex["lengths"][i]
      assert k == len(expect)
      np.testing.assert_array_equal(ex["ids"][i, :k], ids[expect])
      np.testing.assert_array_equal(ex["timestamps"][i, :k], data.timestamps[u][expect])
      assert (ex["ids"][i, k:] == 0).all()
      assert (ex["timestamps"][i, :k] <= ex["request_time"][i]).all()


def test_partition_and_batches():
  data = synthetic_surfaces.generate(num_users=60, num_items=120, seed=4, min_len=20, max_len=40)
  ex = expert_examples.surface_examples(data, _rows(data), 0, T_SHORT)
  parts = expert_examples.partition(ex, 0.2)
  assert not set(parts["fit"]["user"]) & set(parts["select"]["user"])
  assert (parts["test"]["split"] == 2).all() and (parts["fit"]["split"] == 1).all()
  assert len(parts["fit"]["cand"]) + len(parts["select"]["cand"]) == (ex["split"] == 1).sum()
  # the held-out users do not depend on anything but the fixed seed
  again = expert_examples.partition(ex, 0.2)
  np.testing.assert_array_equal(again["select"]["user"], parts["select"]["user"])

  test = parts["test"]
  batches = list(expert_examples.eval_batches(test, 16))
  n = len(test["cand"])
  assert len(batches) == -(-n // 16)
  assert sum(int(b["label_valid"].any(-1).sum()) for b in batches) == int(test["label_valid"].any(-1).sum())
  assert not batches[-1]["label_valid"][n - 16 * (len(batches) - 1):].any()

  ds, steps = expert_examples.train_batches(parts["fit"], 8, seed=1, num_epochs=2)
  ds2, _ = expert_examples.train_batches(parts["fit"], 8, seed=1, num_epochs=2)
  assert len(ds) == 2 * steps
  for i in (0, steps + 1):  # batch i is a pure function of (seed, i): resume is exact
    for k in expert_examples.MODEL_KEYS:
      np.testing.assert_array_equal(ds[i][k], ds2[i][k])


def test_batches_from_the_store_equal_batches_from_memory(tmp_path):
  """The expert trainer reads the store without its embeddings (a shard at a time) and takes
  the TAEs and UEs of each batch's rows by random access: the same batches as from memory."""
  data = synthetic_surfaces.generate(num_users=40, num_items=120, seed=5, min_len=20, max_len=40)
  rows = _rows(data)
  cut = [0, 7, 7, 50, len(rows["user"])]  # shards of uneven sizes, one empty
  with tae_store.write_version(tmp_path, "v1") as w:
    for a, b in zip(cut, cut[1:]):
      w.write_shard({k: v[a:b] for k, v in rows.items()})
  index, source = expert_examples.load_index(str(tmp_path), "v1")
  assert "tae" not in index and "ue" not in index
  np.testing.assert_array_equal(index["row"], np.arange(len(rows["user"])))
  ex_mem = expert_examples.surface_examples(data, rows, 1, T_SHORT)
  ex_store = expert_examples.surface_examples(data, index, 1, T_SHORT)
  mem, _ = expert_examples.train_batches(ex_mem, 8, seed=2, num_epochs=1)
  store, _ = expert_examples.train_batches(ex_store, 8, seed=2, num_epochs=1, source=source)
  evals = zip(expert_examples.eval_batches(ex_mem, 16),
              expert_examples.eval_batches(ex_store, 16, source))
  for a, b in [(mem[0], store[0]), (mem[len(mem) - 1], store[len(mem) - 1]), *evals]:
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  source.close()
