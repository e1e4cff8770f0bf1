"""Foundation-model facts: candidate isolation, history causality, summation inputs, M-FALCON
micro-batching, and task masking in the MTML loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmx.configs import foundation as fm_configs
from fmx.data import ranking, synthetic_surfaces
from fmx.runtime import fm as fm_runtime
from fmx.runtime.mfalcon import MFalcon, history_inputs
from fmx.train import losses


@pytest.fixture(scope="module")
def setup():
  data = synthetic_surfaces.generate(num_users=20, num_items=120, seed=1, min_len=30, max_len=40)
  c = fm_configs.get_config("synthetic", "runlocal")
  c.input.max_history, c.input.num_candidates = 20, 6
  c.model.max_len = 26
  model, items = fm_runtime.build(c, data)
  params = fm_runtime.init_params(c, model, items, jax.random.PRNGKey(0))
  batch = next(ranking.eval_batches(data, "test", 20, 6, batch_size=4))
  return data, model, params, items, batch


def _tae(model, params, items, batch):
  return np.asarray(model.apply({"params": params}, batch, items)[0])


def test_candidates_never_see_each_other(setup):
  _, model, params, items, batch = setup
  base = _tae(model, params, items, batch)
  changed = {k: v.copy() for k, v in batch.items()}
  j = changed["cand_index"][0, 2]
  changed["ids"][0, j] = (changed["ids"][0, j] % 100) + 1
  changed["surfaces"][0, j] = (changed["surfaces"][0, j] + 1) % 4
  other = _tae(model, params, items, changed)
  keep = [i for i in range(6) if i != 2]
  np.testing.assert_array_equal(base[0, keep], other[0, keep])  # bit-identical
  assert not np.allclose(base[0, 2], other[0, 2])


def test_history_is_causal_and_blind_to_candidates(setup):
  data, model, params, items, _ = setup
  u = 3
  ids, ts = data.item_ids[u][:20], data.timestamps[u][:20]
  hist = history_inputs(ids, data.item_surface[ids], data.actions[u][:20], ts, int(ts[-1]) + 60, 20)
  out, _ = model.apply({"params": params}, hist, items, method="encode_history")
  hist2 = {k: v.copy() for k, v in hist.items()}
  hist2["ids"][0, 15:] = 7  # change the future of position 14
  hist2["actions"][0, 15:] = 3
  out2, _ = model.apply({"params": params}, hist2, items, method="encode_history")
  np.testing.assert_allclose(np.asarray(out)[0, :15], np.asarray(out2)[0, :15], rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(out)[0, 15:20], np.asarray(out2)[0, 15:20])


def test_summation_inputs_candidates_carry_no_action(setup):
  data, model, params, items, batch = setup
  real = np.arange(6)[None, :] < batch["num_targets"][:, None]
  cand_actions = np.take_along_axis(batch["actions"], batch["cand_index"], axis=1)
  assert (cand_actions[real] == 0).all()
  hist_actions = batch["actions"][0, : batch["lengths"][0] - batch["num_targets"][0]]
  assert (hist_actions > 0).all()
  # action row 0 ("none") is never added: changing it changes nothing
  p2 = jax.tree_util.tree_map(lambda x: x, params)
  p2["action"]["embedding"] = params["action"]["embedding"].at[0].set(5.0)
  np.testing.assert_array_equal(_tae(model, params, items, batch), _tae(model, p2, items, batch))


def test_mfalcon_micro_batches_match_full_sequence(setup):
  data, model, params, items, batch = setup
  b = 1
  h = int(batch["lengths"][b] - batch["num_targets"][b])
  hist = history_inputs(batch["ids"][b, :h], batch["surfaces"][b, :h], batch["actions"][b, :h],
                        batch["timestamps"][b, :h], int(batch["request_time"][b]), 20)
  t = int(batch["num_targets"][b])
  cand = {"ids": batch["ids"][b, h:h + t], "surfaces": batch["surfaces"][b, h:h + t]}
  full = _tae(model, params, items, batch)[b, :t]
  outs = [MFalcon(model, items, micro_batch=mb).target_aware_embeddings(params, hist, cand)
          for mb in (1, 4, 16)]
  for o in outs:
    np.testing.assert_allclose(o, full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(outs[1], MFalcon(model, items, 4).target_aware_embeddings(params, hist, cand))
  ue = MFalcon(model, items).user_embedding(params, hist)
  assert ue.shape == (full.shape[-1],)


def test_invalid_task_has_zero_loss_and_gradient():
  logits = jnp.array([[0.3, -1.0, 2.0], [1.5, 0.2, -0.7]])
  labels = jnp.array([[1, 0, 1], [0, 1, 1]])
  valid = jnp.array([[True, False, True], [True, False, False]])
  w = jnp.array([1.0, 1.0, 0.5])
  grad = jax.grad(lambda l: losses.mtml_bce(l, labels, valid, w)[0])(logits)
  assert np.all(np.asarray(grad)[~np.asarray(valid)] == 0.0)
  flipped = labels.at[0, 1].set(1).at[1, 2].set(0)
  assert float(losses.mtml_bce(logits, flipped, valid, w)[0]) == float(losses.mtml_bce(logits, labels, valid, w)[0])
  _, per_task = losses.mtml_bce(logits, labels, valid, w)
  assert float(per_task[1]) == 0.0
  bce = lambda x, y: float(np.log1p(np.exp(-x)) if y else np.log1p(np.exp(x)))
  assert float(per_task[0]) == pytest.approx((bce(0.3, 1) + bce(1.5, 0)) / 2, rel=1e-6)
