"""Embedding drift: MMD² and its bandwidth against loop references, the permutation test detects
shifts and rescalings but not resampling, running moments merge exactly, and aligning one
version's moments onto another's removes the drift the test detects."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fmx.hypercast import drift


def _ref_median_bandwidth(x, y):
  z = np.concatenate([x, y])
  dists = [math.sqrt(sum((z[i, k] - z[j, k]) ** 2 for k in range(z.shape[1])))
           for i in range(len(z)) for j in range(len(z)) if i != j]
  med = float(np.median(dists))
  return med if med > 0 else 1.0


def _ref_mmd2(x, y, bw):
  def k(a, b):
    return math.exp(-sum((a[t] - b[t]) ** 2 for t in range(len(a))) / (2 * bw * bw))
  n, m = len(x), len(y)
  sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
  syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
  return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


def _small():
  rng = np.random.default_rng(3)
  return rng.normal(size=(7, 3)), rng.normal(0.4, 1.3, size=(9, 3))


def test_median_bandwidth_matches_loop_reference():
  x, y = _small()
  assert drift.median_bandwidth(x, y) == pytest.approx(_ref_median_bandwidth(x, y), rel=1e-12)
  # An even number of pooled distances (odd pooled rows) and an odd one both agree.
  assert drift.median_bandwidth(x[:4], y[:3]) == pytest.approx(
      _ref_median_bandwidth(x[:4], y[:3]), rel=1e-12)
  same = np.ones((3, 2))
  assert drift.median_bandwidth(same, same) == 1.0


def test_mmd2_matches_loop_reference():
  x, y = _small()
  for bw in (0.5, 2.0):
    assert drift.mmd2(x, y, bandwidth=bw) == pytest.approx(_ref_mmd2(x, y, bw), rel=1e-10)
  med = _ref_median_bandwidth(x, y)
  assert drift.mmd2(x, y) == pytest.approx(_ref_mmd2(x, y, med), rel=1e-10)


def _normal(seed, rows=300, dim=16, loc=0.0, scale=1.0):
  return np.random.default_rng(seed).normal(loc, scale, size=(rows, dim))


def test_same_distribution_is_not_flagged():
  x, y = _normal(0), _normal(1)
  assert abs(drift.mmd2(x, y)) < 5e-3
  assert drift.mmd_test(x, y, permutations=100)["p_value"] > 0.05


def test_shift_and_scale_are_detected():
  x = _normal(0)
  base = drift.mmd2(x, _normal(1))
  shifted = _normal(1, loc=0.5)
  res = drift.mmd_test(x, shifted)  # 200 permutations: the smallest p-value is 1/201
  assert res["p_value"] < 0.01
  assert res["mmd2"] > 10 * max(abs(base), 1e-3)
  scaled = _normal(1, scale=2.0)
  assert drift.mmd_test(x, scaled)["p_value"] < 0.01


def test_permutation_test_determinism_range_and_subsampling():
  x, y = _normal(0, rows=120, dim=4), _normal(1, rows=90, dim=4, loc=0.1)
  a = drift.mmd_test(x, y, permutations=50, seed=7)
  assert a == drift.mmd_test(x, y, permutations=50, seed=7)
  assert isinstance(a["p_value"], float) and 0 < a["p_value"] <= 1
  assert (a["n"], a["m"], a["permutations"]) == (120, 90, 50)
  # p_value is on the (1 + hits) / (1 + permutations) grid.
  assert a["p_value"] * 51 == pytest.approx(round(a["p_value"] * 51))
  b = drift.mmd_test(x, y, permutations=20, max_rows=50, seed=7)
  assert (b["n"], b["m"]) == (50, 50)
  assert 0 < b["p_value"] <= 1
  assert drift.mmd_test(x, y, permutations=0)["p_value"] == 1.0


def test_invalid_inputs_raise():
  x = _normal(0, rows=5, dim=3)
  with pytest.raises(ValueError, match="at least 2 rows"):
    drift.mmd_test(x[:1], x)
  with pytest.raises(ValueError, match="at least 2 rows"):
    drift.mmd_test(x, x[:1])
  with pytest.raises(ValueError, match="dimensions differ"):
    drift.mmd_test(x, _normal(1, rows=5, dim=4))
  with pytest.raises(ValueError, match="dimensions differ"):
    drift.mmd2(x, _normal(1, rows=5, dim=4))


def test_update_moments_merges_exactly():
  rng = np.random.default_rng(5)
  chunks = [rng.normal(3.0, 2.0, size=(k, 6)) for k in (1, 17, 4, 250, 2, 0, 33)]
  m = drift.init_moments(6)
  for c in chunks:
    before = {k: np.array(v, copy=True) for k, v in m.items()}
    new = drift.update_moments(m, c)
    for k in m:  # the input is not mutated
      np.testing.assert_array_equal(m[k], before[k])
    m = new
  allx = np.concatenate(chunks)
  assert float(m["count"]) == len(allx)
  np.testing.assert_allclose(m["mean"], allx.mean(0), rtol=1e-10)
  np.testing.assert_allclose(drift.variance(m), allx.var(0), rtol=1e-10)
  with pytest.raises(ValueError):
    drift.variance(drift.init_moments(6))


def _moments(x):
  return drift.update_moments(drift.init_moments(x.shape[1]), x)


def test_align_matches_target_moments():
  rng = np.random.default_rng(11)
  mu_s, s_s = rng.normal(size=8) * 3, rng.uniform(0.5, 4.0, size=8)
  mu_t, s_t = rng.normal(size=8), rng.uniform(0.2, 2.0, size=8)
  src = rng.normal(mu_s, s_s, size=(4000, 8))
  tgt = rng.normal(mu_t, s_t, size=(4000, 8))
  out = drift.align(src, _moments(src), _moments(tgt))
  # On the rows the source moments were computed from, the match is exact (up to eps).
  np.testing.assert_allclose(out.mean(0), tgt.mean(0), atol=1e-9)
  np.testing.assert_allclose(out.std(0), tgt.std(0), rtol=1e-5)
  # On fresh rows of the source distribution, within sampling error of the target's.
  fresh = drift.align(rng.normal(mu_s, s_s, size=(4000, 8)), _moments(src), _moments(tgt))
  np.testing.assert_allclose(fresh.mean(0), mu_t, atol=0.1)
  np.testing.assert_allclose(fresh.std(0), s_t, rtol=0.08)


def test_align_identity_passthrough_and_dtype():
  x = _normal(2, rows=50, dim=5)
  m = _moments(x)
  np.testing.assert_allclose(drift.align(x, m, m), x, rtol=1e-12, atol=1e-12)
  empty = drift.init_moments(5)
  assert drift.align(x, empty, m) is x
  assert drift.align(x, m, empty) is x
  x32 = x.astype(np.float32)
  out = drift.align(x32, m, _moments(2 * x + 1))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, 2 * x + 1, rtol=1e-5, atol=1e-5)


def test_alignment_removes_detected_drift():
  x = _normal(20)                     # the current version's TAEs (target)
  y = 3.0 * _normal(21) + 2.0         # the new version's TAEs on the same impressions
  before = drift.mmd_test(x, y)
  aligned = drift.align(y, _moments(y), _moments(x))
  after = drift.mmd_test(x, aligned, permutations=100)
  assert before["p_value"] < 0.01
  assert after["p_value"] > 0.05
  assert after["mmd2"] < 0.05 * before["mmd2"]


def _paired_reference(x, y, bandwidth):
  """Gretton et al.'s MMD²_u for paired rows, by explicit loops over pairs i != j."""
  k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * bandwidth ** 2))
  n, total = len(x), 0.0
  for i in range(n):
    for j in range(n):
      if i != j:
        total += k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
  return total / (n * (n - 1))


def test_paired_test_matches_a_loop_and_detects_drift_of_the_same_units():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(9, 3))
  y = x + rng.normal(scale=0.1, size=x.shape)
  got = drift.mmd_test(x, y, paired=True, permutations=20, seed=1)
  want = _paired_reference(x, y, drift.median_bandwidth(x, y))
  np.testing.assert_allclose(got["mmd2"], want, rtol=1e-10)
  units = rng.normal(size=(200, 8))
  old = units + rng.normal(scale=0.3, size=units.shape)  # two versions' views of the same units
  same = units + rng.normal(scale=0.3, size=units.shape)  # no drift: exchangeable within pairs
  moved = units + 0.4 + rng.normal(scale=0.3, size=units.shape)  # drifted
  assert drift.mmd_test(old, same, paired=True, seed=0)["p_value"] > 0.05
  assert drift.mmd_test(old, moved, paired=True, seed=0)["p_value"] < 0.01
  with pytest.raises(ValueError, match="as many rows"):
    drift.mmd_test(old, same[:10], paired=True)
