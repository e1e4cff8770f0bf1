"""The logging tier materialises a pinned FM checkpoint's TAEs, equal to request-time TAEs, through
the FM runtime layer (parameters restored without an optimizer)."""

import numpy as np

from fmx.configs import foundation as fm_configs
from fmx.data import synthetic_surfaces, tae_store
from fmx.hypercast import logging_tier
from fmx.runtime import fm as fm_runtime
from fmx.runtime.mfalcon import history_inputs
from fmx.train import fm as fm_train


def test_materialised_taes_match_serving(tmp_path):
  data = synthetic_surfaces.generate(num_users=40, num_items=200, seed=2, min_len=30, max_len=50)
  c = fm_configs.get_config("synthetic", "runlocal")
  c.num_epochs, c.progress = 1, False
  c.input.max_history, c.input.num_candidates = 20, 4
  c.model.max_len = 24
  fm_workdir = str(tmp_path / "fm")
  _, trained = fm_train.train_one(c, fm_workdir, data, data.spec.fm_tasks.astype(np.float32))
  fm = fm_runtime.restore(fm_workdir, load_data=lambda cfg: data)
  assert fm.step == 1 and set(fm.params) == set(trained)  # parameters only, no optimizer
  np.testing.assert_array_equal(fm.params["item"]["embedding"], trained["item"]["embedding"])
  store = str(tmp_path / "store")
  rows = logging_tier.materialise(fm, store, "fm-v1", splits=("valid", "test"), batch_size=16)
  assert rows == 40 * 4 * 2
  assert logging_tier.materialise(fm, store, "fm-v1", splits=("valid", "test")) == 0  # once
  shards = list(tae_store.read(store, "fm-v1"))
  assert tae_store.version_meta(store, "fm-v1")["fm_step"] == 1
  test = shards[1][1]
  assert (test["split"] == 2).all() and test["tae"].shape == (160, c.model.dim)
  # the first test row equals what the serving path computes for that request
  u = int(test["user"][0])
  n = len(data.item_ids[u])
  cut = n - 4
  hist = history_inputs(data.item_ids[u][:cut], data.item_surface[data.item_ids[u][:cut]],
                        data.actions[u][:cut], data.timestamps[u][:cut], int(data.timestamps[u][cut]), 20)
  cand = {"ids": data.item_ids[u][cut:], "surfaces": data.item_surface[data.item_ids[u][cut:]]}
  falcon = fm.mfalcon(micro_batch=4)
  np.testing.assert_allclose(test["tae"][test["user"] == u],
                             falcon.target_aware_embeddings(fm.params, hist, cand), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(test["ue"][0], falcon.user_embedding(fm.params, hist), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(test["fm_probs"][test["user"] == u],
                             falcon.predict(fm.params, hist, cand), rtol=1e-5, atol=1e-5)
  assert (test["request_time"][test["user"] == u] == data.timestamps[u][cut]).all()
