"""Embedding drift between FM versions: a monitor and a moment-alignment fix.

Consecutive foundation-model (FM) versions emit target-aware embeddings (TAEs) that downstream
experts consume as features. When a new FM version is published, its TAEs on the same impressions
may have moved (a shift, a rescaling, a rotation) even if the FM's own quality is unchanged, and an
expert trained on the previous version's TAEs then sees features from another distribution.

The monitor is a two-sample test on the TAEs of two versions over the same impressions: the
unbiased estimate of the squared maximum mean discrepancy (MMD) with a Gaussian kernel whose
bandwidth is the median heuristic, and a permutation test for its p-value (`mmd2`, `mmd_test`).

The fix is in the spirit of adaptive cross-batch normalisation (arXiv 2303.17127): keep running
first and second moments per dimension of each version's embeddings (`init_moments`,
`update_moments`, an exact parallel Welford merge) and map embeddings of one version onto the
moments of another (`align`). Everything is pure numpy (float64 internally) over plain dicts of
arrays, with no global state.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 1 << 22  # elements per block of exact pairwise differences in `median_bandwidth`


def _rows(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D [rows, dim], got shape {x.shape}")
  return x


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  x, y = _rows(x, "x"), _rows(y, "y")
  if x.shape[0] < 2 or y.shape[0] < 2:
    raise ValueError(f"x and y need at least 2 rows each, got {x.shape[0]} and {y.shape[0]}")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y dimensions differ: {x.shape[1]} != {y.shape[1]}")
  return x, y


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pairwise squared Euclidean distances [len(a), len(b)], clipped at 0."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def _kernel(a: np.ndarray, b: np.ndarray, bandwidth: float) -> np.ndarray:
  return np.exp(-_sq_dists(a, b) / (2.0 * bandwidth * bandwidth))


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
  """Median of pairwise distances (i != j) of the pooled sample [x; y]; 1.0 if that median is 0."""
  z = np.concatenate([_rows(x, "x"), _rows(y, "y")], axis=0)
  n, d = z.shape
  if n < 2:
    raise ValueError(f"median_bandwidth needs at least 2 pooled rows, got {n}")
  # Exact differences (not the dot-product identity) so identical points give exactly 0;
  # the median over i < j equals the median over i != j (each distance counted twice).
  step = max(1, _BLOCK // max(1, n * d))
  parts = []
  for s in range(0, n - 1, step):
    blk = z[s:s + step]
    sq = ((blk[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    i, j = np.nonzero(np.arange(n)[None, :] > (s + np.arange(len(blk)))[:, None])
    parts.append(sq[i, j])
  med = float(np.median(np.sqrt(np.concatenate(parts))))
  return med if med > 0.0 else 1.0


def _mmd2_from_sums(sxx: float, syy: float, sxy: float, n: int, m: int) -> float:
  return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
  """Unbiased squared MMD of x [n, d] and y [m, d], Gaussian kernel (median bandwidth if None)."""
  x, y = _pair(x, y)
  if bandwidth is None:
    bandwidth = median_bandwidth(x, y)
  n, m = len(x), len(y)
  kxx, kyy = _kernel(x, x, bandwidth), _kernel(y, y, bandwidth)
  sxx = kxx.sum() - np.trace(kxx)
  syy = kyy.sum() - np.trace(kyy)
  sxy = _kernel(x, y, bandwidth).sum()
  return float(_mmd2_from_sums(sxx, syy, sxy, n, m))


def mmd_test(x: np.ndarray, y: np.ndarray, *, permutations: int = 200, max_rows: int = 500,
             seed: int = 0, paired: bool = False) -> dict:
  """Permutation two-sample test of x and y on the unbiased MMD² (rows subsampled to max_rows).

  `paired`: row i of x and of y describe the same unit (the same impression under two FM
  versions). The statistic then leaves out the matched cross terms k(x_i, y_i) as well
  (Gretton et al. 2012's MMD²_u), and the permutations swap x_i and y_i within pairs.
  Returns {"mmd2", "bandwidth", "p_value", "n", "m", "permutations"}.
  """
  if paired:
    return _paired_test(*_pair(x, y), permutations, max_rows, seed)
  x, y = _pair(x, y)
  if max_rows < 2:
    raise ValueError(f"max_rows must be at least 2, got {max_rows}")
  if permutations < 0:
    raise ValueError(f"permutations must be non-negative, got {permutations}")
  rng = np.random.default_rng(seed)
  if len(x) > max_rows:
    x = x[np.sort(rng.choice(len(x), max_rows, replace=False))]
  if len(y) > max_rows:
    y = y[np.sort(rng.choice(len(y), max_rows, replace=False))]
  n, m = len(x), len(y)
  bandwidth = median_bandwidth(x, y)
  z = np.concatenate([x, y])
  k = _kernel(z, z, bandwidth)
  np.fill_diagonal(k, 0.0)  # the unbiased estimate leaves out i == j
  total = k.sum()

  def stat(ix: np.ndarray, iy: np.ndarray) -> float:
    sxx = k[np.ix_(ix, ix)].sum()
    syy = k[np.ix_(iy, iy)].sum()
    sxy = 0.5 * (total - sxx - syy)  # total = sxx + syy + 2 sxy
    return _mmd2_from_sums(sxx, syy, sxy, n, m)

  observed = stat(np.arange(n), np.arange(n, n + m))
  hits = 0
  for _ in range(permutations):
    p = rng.permutation(n + m)
    hits += int(stat(p[:n], p[n:]) >= observed)
  return {"mmd2": float(observed), "bandwidth": float(bandwidth),
          "p_value": float((1 + hits) / (1 + permutations)), "n": n, "m": m,
          "permutations": int(permutations)}


def init_moments(dim: int) -> dict:
  """Empty running moments: {"count": 0.0, "mean": zeros[dim], "m2": zeros[dim]}."""
  return {"count": np.asarray(0.0), "mean": np.zeros(dim), "m2": np.zeros(dim)}


def update_moments(m: dict, x: np.ndarray) -> dict:
  """New moments after adding the rows of x [k, dim] (exact Chan et al. merge); m is unchanged."""
  x = _rows(x, "x")
  mean_a = np.asarray(m["mean"], dtype=np.float64)
  if x.shape[1] != mean_a.shape[0]:
    raise ValueError(f"x has dim {x.shape[1]}, moments have dim {mean_a.shape[0]}")
  na, nb = float(m["count"]), float(x.shape[0])
  if nb == 0:
    return {"count": np.asarray(na), "mean": mean_a.copy(),
            "m2": np.array(m["m2"], dtype=np.float64)}
  mean_b = x.mean(0)
  m2_b = ((x - mean_b) ** 2).sum(0)
  n = na + nb
  delta = mean_b - mean_a
  return {"count": np.asarray(n), "mean": mean_a + delta * (nb / n),
          "m2": np.asarray(m["m2"], dtype=np.float64) + m2_b + delta * delta * (na * nb / n)}


def variance(m: dict) -> np.ndarray:
  """Population variance per dimension, m2 / count."""
  count = float(m["count"])
  if count == 0:
    raise ValueError("variance of empty moments (count == 0)")
  return np.asarray(m["m2"], dtype=np.float64) / count


def align(x: np.ndarray, source: dict, target: dict, eps: float = 1e-6) -> np.ndarray:
  """Map rows x (distributed as `source`) onto the per-dimension mean and variance of `target`.

  (x - mean_s) / sqrt(var_s + eps) * sqrt(var_t + eps) + mean_t, in x's dtype (float64 for
  non-float x); x unchanged when either moments are empty.
  """
  if float(source["count"]) == 0 or float(target["count"]) == 0:
    return x
  x = np.asarray(x)
  dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
  scale = np.sqrt(variance(target) + eps) / np.sqrt(variance(source) + eps)
  out = (x.astype(np.float64) - source["mean"]) * scale + target["mean"]
  return out.astype(dtype)


def _paired_test(x: np.ndarray, y: np.ndarray, permutations: int, max_rows: int,
                 seed: int) -> dict:
  if len(x) != len(y):
    raise ValueError(f"a paired test needs as many rows in x as in y, got {len(x)} and {len(y)}")
  if max_rows < 2 or permutations < 0:
    raise ValueError(f"max_rows must be at least 2 and permutations non-negative, got "
                     f"{max_rows} and {permutations}")
  rng = np.random.default_rng(seed)
  if len(x) > max_rows:
    keep = np.sort(rng.choice(len(x), max_rows, replace=False))
    x, y = x[keep], y[keep]
  n = len(x)
  bandwidth = median_bandwidth(x, y)
  z = np.concatenate([x, y])
  k = _kernel(z, z, bandwidth)
  off = ~np.eye(n, dtype=bool)

  def stat(swap: np.ndarray) -> float:
    a = np.where(swap, np.arange(n, 2 * n), np.arange(n))  # the rows playing x
    b = np.where(swap, np.arange(n), np.arange(n, 2 * n))  # and y
    h = k[np.ix_(a, a)] + k[np.ix_(b, b)] - k[np.ix_(a, b)] - k[np.ix_(b, a)]
    return float(h[off].sum() / (n * (n - 1)))

  observed = stat(np.zeros(n, bool))
  hits = sum(int(stat(rng.random(n) < 0.5) >= observed) for _ in range(permutations))
  return {"mmd2": observed, "bandwidth": float(bandwidth),
          "p_value": float((1 + hits) / (1 + permutations)), "n": n, "m": n,
          "permutations": int(permutations)}
