"""HSTU model facts: the official time buckets and relative positions, padding invariance and
causality of the full retrieval model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmx.configs import retrieval as retrieval_configs
from fmx.models import hstu
from fmx.train.retrieval import build_model


def test_time_buckets_match_official_formula():
  ts = jnp.array([[0, 10, 1000, 10**6]])
  nxt = jnp.array([[10, 1000, 10**6, 10**6 + 1]])
  got = np.asarray(hstu.time_buckets(ts, nxt, 128))[0]
  for i in range(4):
    for j in range(4):
      dt = abs(int(nxt[0, i]) - int(ts[0, j]))
      assert got[i, j] == min(max(int(np.log(max(dt, 1)) / 0.301), 0), 128)
  assert got[0, 0] == int(np.log(10) / 0.301)  # 7


def test_relative_positions_index_the_2n_minus_1_table():
  pos = jnp.arange(4)[None]
  r = np.asarray(hstu.relative_positions(pos, pos, max_len=4))[0]
  assert r[0, 0] == 3 and r[3, 0] == 0 and r[0, 3] == 6 and r.max() == 6


@pytest.fixture(params=["hstu", "sasrec"])
def model_and_params(request):
  c = retrieval_configs.get_config("synthetic", request.param, "runlocal")
  c.model.max_len = 12
  model = build_model(c.model, vocab=40)
  z = jnp.zeros((1, 12), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), z, jnp.ones((1,), jnp.int32), z, z)["params"]
  return model, params


def _batch(rng, lengths, n=12):
  ids = rng.integers(1, 40, (len(lengths), n)).astype(np.int32)
  ts = np.sort(rng.integers(0, 10**7, (len(lengths), n + 1)), axis=1)
  for b, l in enumerate(lengths):
    ids[b, l:] = 0
    ts[b, l:] = 0
  return ids, ts[:, :-1], ts[:, 1:]


def test_padding_invariance(model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(0)
  ids, ts, qt = _batch(rng, [7, 12])
  base = model.apply({"params": params}, ids, jnp.array([7, 12]), ts, qt)
  ids2, ts2, qt2 = ids.copy(), ts.copy(), qt.copy()
  ids2[0, 7:] = rng.integers(1, 40, 5)
  ts2[0, 7:] = 123456789
  qt2[0, 7:] = 5
  other = model.apply({"params": params}, ids2, jnp.array([7, 12]), ts2, qt2)
  np.testing.assert_array_equal(np.asarray(base)[0, :7], np.asarray(other)[0, :7])
  np.testing.assert_array_equal(np.asarray(other)[0, 7:], 0.0)


def test_causality(model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(1)
  ids, ts, qt = _batch(rng, [12])
  base = np.asarray(model.apply({"params": params}, ids, jnp.array([12]), ts, qt))
  ids2 = ids.copy()
  ids2[0, 8:] = (ids2[0, 8:] % 39) + 1  # change the future
  other = np.asarray(model.apply({"params": params}, ids2, jnp.array([12]), ts, qt))
  np.testing.assert_allclose(base[0, :8], other[0, :8], rtol=1e-6, atol=1e-6)
  assert not np.allclose(base[0, 8:], other[0, 8:])
