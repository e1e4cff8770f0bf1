"""The expert: no gradient reaches the FM's embeddings, carriers change the inputs it sees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmx.models.expert import Expert
from fmx.models.hstu import HSTUConfig


def _setup(carrier):
  c = HSTUConfig(num_layers=1, dim=16, num_heads=1, dqk=8, dv=8, max_len=6, dropout=0.0)
  rng = np.random.default_rng(0)
  b, t, d_fm = 3, 5, 12
  batch = {"ids": jnp.asarray(rng.integers(1, 30, (b, t)), jnp.int32),
           "actions": jnp.asarray(rng.integers(1, 4, (b, t)), jnp.int32),
           "timestamps": jnp.asarray(np.sort(rng.integers(0, 10**6, (b, t)), 1), jnp.int32),
           "lengths": jnp.array([5, 2, 0], jnp.int32), "cand": jnp.array([3, 4, 5], jnp.int32),
           "request_time": jnp.full((b,), 10**6 + 5, jnp.int32),
           "tae": jnp.asarray(rng.normal(size=(b, d_fm)), jnp.float32),
           "ue": jnp.asarray(rng.normal(size=(b, d_fm)), jnp.float32)}
  items = {"genres": jnp.zeros((32, 19)), "content": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)}
  model = Expert(c, vocab_size=32, num_tasks=3, carrier=carrier)
  params = model.init(jax.random.PRNGKey(0), batch, items)["params"]
  return model, params, batch, items


@pytest.mark.parametrize("carrier", ["tae", "tae+ue"])
def test_no_gradient_reaches_the_fm(carrier):
  model, params, batch, items = _setup(carrier)

  def loss(tae, ue):
    return jnp.sum(model.apply({"params": params}, {**batch, "tae": tae, "ue": ue}, items) ** 2)

  g_tae, g_ue = jax.grad(loss, argnums=(0, 1))(batch["tae"], batch["ue"])
  assert np.all(np.asarray(g_tae) == 0) and np.all(np.asarray(g_ue) == 0)
  # ...while the FM knowledge does change the expert's output
  moved = model.apply({"params": params}, {**batch, "tae": batch["tae"][:, ::-1]}, items)
  assert not np.allclose(moved, model.apply({"params": params}, batch, items))


def test_expert_alone_ignores_fm_inputs():
  model, params, batch, items = _setup("none")
  base = model.apply({"params": params}, batch, items)
  other = model.apply({"params": params}, {**batch, "tae": batch["tae"] * 0, "ue": batch["ue"] * 0}, items)
  np.testing.assert_array_equal(base, other)
  assert base.shape == (3, 3) and np.all(np.isfinite(base))


@pytest.mark.parametrize("carrier", ["tae", "tae+ue", "none"])
def test_scoring_candidates_against_the_events_cache_equals_one_row_each(carrier):
  """Serving's M-FALCON path: the events encoded once, candidates scored against the cache,
  give what `__call__` gives each (events, candidate) row (lengths 5, 2 and 0 included)."""
  model, params, batch, items = _setup(carrier)
  rng = np.random.default_rng(1)
  m = 4
  cands = jnp.asarray(rng.integers(1, 30, (3, m)), jnp.int32)
  taes = jnp.asarray(rng.normal(size=(3, m, 12)), jnp.float32)
  content = jnp.asarray(rng.normal(size=(3, m, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(32, 12)), jnp.float32)
  params = model.init(jax.random.PRNGKey(1), batch, items, fm_table=table)["params"]
  cache = model.apply({"params": params}, batch, method="encode_events")
  got = model.apply({"params": params}, {**batch, "cand": cands, "tae": taes, "content": content},
                    cache, items, table, method="score")
  for j in range(m):
    row = {**batch, "cand": cands[:, j], "tae": taes[:, j], "content": content[:, j]}
    want = model.apply({"params": params}, row, items, fm_table=table)
    np.testing.assert_allclose(got[:, j], want, atol=1e-5)
