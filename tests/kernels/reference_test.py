"""The pure-jnp reference against a per-element loop, its mask semantics, and padding."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import hstu_attention, valid_attn_mask


def loop_mask(n, length, num_targets=0, contextual=0):
  """The official mask written out case by case (no max_attn_len)."""
  hist = length - num_targets  # contextual + history tokens
  m = np.zeros((n, n), bool)
  for i, j in itertools.product(range(length), range(length)):
    if i == j:
      m[i, j] = True
    elif i < contextual:  # contextual rows: bidirectional over every non-target
      m[i, j] = j < hist
    elif i >= hist:  # a target sees every non-target, never another target
      m[i, j] = j < hist
    else:  # history: causal, and always sees the contextual prefix
      m[i, j] = j < i or j < contextual
  return m


def loop_attention(q, k, v, lengths, bias, num_targets, contextual, alpha, scale_len):
  b, n, h, _ = q.shape
  out = np.zeros(v.shape, np.float64)
  for s in range(b):
    m = loop_mask(n, lengths[s], num_targets[s], contextual)
    for hh, i in itertools.product(range(h), range(n)):
      for j in range(n):
        if m[i, j]:
          x = alpha * float(np.dot(q[s, i, hh], k[s, j, hh])) + bias[s, i, j]
          out[s, i, hh] += x / (1 + np.exp(-x)) / scale_len * v[s, j, hh]
  return out


@pytest.mark.parametrize("contextual", [0, 2])
def test_matches_loop_reference(contextual):
  rng = np.random.default_rng(0)
  b, n, h, d = 4, 9, 2, 3
  lengths = np.array([9, 5, 3, 0])
  num_targets = np.array([3, 1, 0, 0])
  q, k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(b, n, n)).astype(np.float32)
  got = hstu_attention(q, k, v, lengths, bias=bias, num_targets=num_targets,
                       contextual_len=contextual, alpha=0.7, scale_len=11)
  want = loop_attention(q, k, v, lengths, bias, num_targets, contextual, 0.7, 11)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length,targets,contextual", [(7, 0, 0), (7, 3, 0), (8, 2, 3), (5, 5, 0), (1, 0, 0), (0, 0, 0)])
def test_mask_semantics(length, targets, contextual):
  got = valid_attn_mask(8, jnp.array([length]), jnp.array([targets]), contextual_len=contextual)
  np.testing.assert_array_equal(np.asarray(got)[0], loop_mask(8, length, targets, contextual))


def test_num_targets_isolates_candidates():
  m = np.asarray(valid_attn_mask(6, jnp.array([6]), jnp.array([3])))[0]
  hist, cand = slice(0, 3), slice(3, 6)
  assert m[cand, hist].all()  # candidates see the whole history
  np.testing.assert_array_equal(m[cand, cand], np.eye(3, dtype=bool))  # and only themselves
  assert not m[hist, cand].any()  # history never sees candidates


def test_max_attn_len_limits_lookback():
  m = np.asarray(valid_attn_mask(6, jnp.array([6]), max_attn_len=2))[0].astype(int)
  want = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                   [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(m, want)


def test_padding_never_changes_real_outputs():
  rng = np.random.default_rng(1)
  b, n, h, d = 2, 10, 1, 4
  lengths = np.array([6, 10])
  q, k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(b, n, n)).astype(np.float32)
  base = np.asarray(hstu_attention(q, k, v, lengths, bias=bias, scale_len=n))
  junk = [x.copy() for x in (q, k, v, bias)]
  for x in junk[:3]:
    x[0, 6:] = rng.normal(size=x[0, 6:].shape) * 100
  junk[3][0, 6:, :] = 1e3
  junk[3][0, :, 6:] = 1e3
  other = np.asarray(hstu_attention(*junk[:3], lengths, bias=junk[3], scale_len=n))
  np.testing.assert_array_equal(base[0, :6], other[0, :6])
  np.testing.assert_array_equal(other[0, 6:], 0.0)
  np.testing.assert_array_equal(base[1], other[1])


def test_unknown_impl_is_rejected():
  x = jnp.zeros((1, 2, 1, 2))
  with pytest.raises(ValueError, match="impl"):
    hstu_attention(x, x, x, jnp.array([2]), impl="cuda")
