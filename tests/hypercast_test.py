"""The logging tier materialises a pinned FM checkpoint's TAEs, equal to request-time TAEs."""

import numpy as np

from fmx.configs import foundation as fm_configs
from fmx.data import synthetic_surfaces, tae_store
from fmx.hypercast import logging_tier
from fmx.models.foundation import MFalcon, history_inputs
from fmx.train import fm as fm_train


def test_materialised_taes_match_serving(tmp_path):
  data = synthetic_surfaces.generate(num_users=40, num_items=200, seed=2, min_len=30, max_len=50)
  c = fm_configs.get_config("synthetic", "runlocal")
  c.num_epochs, c.progress = 1, False
  c.input.max_history, c.input.num_candidates = 20, 4
  c.model.max_len = 24
  fm_workdir = str(tmp_path / "fm")
  fm_train.train_one(c, fm_workdir, data, data.spec.fm_tasks.astype(np.float32))
  rows = logging_tier.materialise(c, fm_workdir, str(tmp_path / "store"), "fm-v1", data,
                                  splits=("valid", "test"))
  assert rows == 40 * 4 * 2
  shards = list(tae_store.read(tmp_path / "store", "fm-v1"))
  test = shards[1][1]
  assert (test["split"] == 2).all() and test["tae"].shape == (160, c.model.dim)
  # the first test row equals what the serving path computes for that request
  model, items, params, _ = logging_tier.restore_fm(c, fm_workdir, data)
  u = int(test["user"][0])
  n = len(data.item_ids[u])
  cut = n - 4
  hist = history_inputs(data.item_ids[u][:cut], data.item_surface[data.item_ids[u][:cut]],
                        data.actions[u][:cut], data.timestamps[u][:cut], int(data.timestamps[u][cut]), 20)
  cand = {"ids": data.item_ids[u][cut:], "surfaces": data.item_surface[data.item_ids[u][cut:]]}
  falcon = MFalcon(model, items, micro_batch=4)
  np.testing.assert_allclose(test["tae"][test["user"] == u], falcon.target_aware_embeddings(params, hist, cand),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(test["ue"][0], falcon.user_embedding(params, hist), rtol=1e-5, atol=1e-5)
  assert (test["request_time"][test["user"] == u] == data.timestamps[u][cut]).all()
