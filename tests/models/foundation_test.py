"""Foundation-model facts: candidate isolation, history causality, summation inputs, M-FALCON
micro-batching, appending to an encoded history, and task masking in the MTML loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmx.configs import foundation as fm_configs
from fmx.data import ranking, synthetic_surfaces
from fmx.models.foundation import age_bucket
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


def _histories(data, spec, appended: bool):
  """`[B, 20]` histories, one per (user, n): the user's first n events (request 30 s after the
  last), or those plus 3 events a minute apart (request a minute after them) when `appended`."""
  hists = []
  for u, n in spec:
    last = int(data.timestamps[u][n - 1])
    m = n + 3 if appended else n
    ids = data.item_ids[u][:m]
    ts = np.append(data.timestamps[u][:n], last + 60 * np.arange(1, 4))[:m]
    hists.append(history_inputs(ids, data.item_surface[ids], data.actions[u][:m], ts,
                                last + (240 if appended else 30), 20))
  return {k: np.concatenate([h[k] for h in hists]) for k in hists[0]}


def _first_change(old, new):
  """Per row, the first position whose inputs (event, age bucket, query time) differ."""
  age = lambda h: np.asarray(age_bucket(h["request_time"][:, None], h["timestamps"]))
  diff = age(old) != age(new)
  for k in ("ids", "surfaces", "actions", "timestamps", "query_times"):
    diff |= old[k] != new[k]
  diff |= np.arange(20)[None] >= old["lengths"][:, None]
  return diff.argmax(axis=1).astype(np.int32)


def _check_append(setup, start, rows):
  data, model, params, items, _ = setup
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
  spec = [(2, 7), (5, 15)]  # row 1: start + rows runs past H = 20
  old, new = _histories(data, spec, False), _histories(data, spec, True)
  start = _first_change(old, new) if start is None else start
  assert (start < old["lengths"]).all() and (new["lengths"] <= start + rows).all()
  _, old_cache = apply("encode_history", old, items)
  out, cache = apply("encode_history", new, items)
  cand = {"ids": np.array([[5, 9, 40], [77, 3, 12]], np.int32),
          "surfaces": np.array([[0, 1, 2], [3, 0, 1]], np.int32)}
  want = apply("extend", new, cache, cand, items)
  row_out, appended = apply("append_history", new, old_cache, start, rows, items)
  for got, w in zip(apply("extend", new, appended, cand, items), want):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
  pos = start[:, None] + np.arange(rows)
  real = pos < new["lengths"][:, None]
  fresh_rows = np.asarray(out)[np.nonzero(real)[0], pos[real]]
  np.testing.assert_allclose(np.asarray(row_out)[real], fresh_rows, rtol=1e-5, atol=1e-5)
  assert (np.asarray(row_out)[~real] == 0).all()
  return start


def test_append_history_matches_fresh_encoding(setup):
  start = _check_append(setup, None, rows=8)
  assert (start > 0).all() and start[0] != start[1]  # rows before start reused from the cache


def test_append_history_from_row_zero_matches_fresh_encoding(setup):
  _check_append(setup, np.zeros(2, np.int32), rows=20)


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
