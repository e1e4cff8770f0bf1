"""The hashed dropout: flax's `nn.Dropout` distribution and API, independent masks per call.
(The same mask on any mesh: `tests/train/mesh_equivalence_test.py` trains with it.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmx.models.dropout import Dropout, keep_mask


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.1])
def test_each_element_is_kept_with_its_probability_independently(keep):
  m = np.asarray(keep_mask(jnp.array([7, 11], jnp.uint32), (64, 200, 50), keep), np.float64)
  sd = np.sqrt(keep * (1 - keep) / m.size)
  assert abs(m.mean() - keep) < 5 * sd
  # every row and column position keeps its share: no position is favoured
  assert abs(m.mean(axis=(0, 1)) - keep).max() < 6 * np.sqrt(keep * (1 - keep) / (64 * 200))
  assert abs(m.mean(axis=(0, 2)) - keep).max() < 6 * np.sqrt(keep * (1 - keep) / (64 * 50))
  # neighbours along every axis are uncorrelated
  c = m - m.mean()
  for axis in range(3):
    a, b = np.swapaxes(c, 0, axis)[1:], np.swapaxes(c, 0, axis)[:-1]
    assert abs((a * b).mean() / c.var()) < 5 / np.sqrt(a.size)


def test_seeds_give_independent_masks():
  a = np.asarray(keep_mask(jnp.array([1, 2], jnp.uint32), (1000, 50), 0.5), np.float64)
  b = np.asarray(keep_mask(jnp.array([1, 3], jnp.uint32), (1000, 50), 0.5), np.float64)
  c = np.asarray(keep_mask(jnp.array([2, 2], jnp.uint32), (1000, 50), 0.5), np.float64)
  for x, y in ((a, b), (a, c), (b, c)):
    assert abs(np.corrcoef(x.ravel(), y.ravel())[0, 1]) < 5 / np.sqrt(x.size)


def test_layer_scales_what_it_keeps_and_draws_anew_per_call():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return Dropout(0.25)(x, deterministic=not train), Dropout(0.25, deterministic=not train)(x)

  x = jnp.ones((32, 100, 8))
  a, b = Two().apply({}, x, True, rngs={"dropout": jax.random.key(0)})
  assert set(np.unique(np.asarray(a))) == {0.0, np.float32(1 / 0.75)}
  assert abs(float(a.mean()) - 1.0) < 0.02  # inverted dropout keeps the expectation
  assert not np.array_equal(a, b)  # two layers, two masks
  again, _ = Two().apply({}, x, True, rngs={"dropout": jax.random.key(0)})
  assert np.array_equal(a, again)  # the same rng, the same mask
  other, _ = Two().apply({}, x, True, rngs={"dropout": jax.random.key(1)})
  assert not np.array_equal(a, other)
  assert Two().apply({}, x, False)[0] is x  # deterministic: no rng needed
  out = Dropout(0.25).apply({}, x.astype(jnp.bfloat16), deterministic=False,
                            rngs={"dropout": jax.random.key(0)})
  assert out.dtype == jnp.bfloat16

