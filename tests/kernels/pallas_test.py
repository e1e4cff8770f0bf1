"""Pallas kernels in interpret mode and the tiled XLA path against the pure-jnp reference:
outputs, gradients of q, k, v and the bias, edge cases, block skipping, and the whole model's
gradient through the Pallas op."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels import hstu_attention, valid_attn_mask
from kernels.hstu_attention import computed_blocks, schedule

STYLES = {"pallas_gpu": (16, contextlib.nullcontext), "pallas_tpu": (128, pltpu.force_tpu_interpret_mode),
          "xla": (8, contextlib.nullcontext)}  # xla: tiles of 8 rows, several per sequence

# (name, lengths, num_targets, N, heads, dtype, extra kwargs)
CASES = [
    ("jagged_with_empty_and_single", [23, 0, 1, 9], [4, 0, 0, 9], 23, 2, jnp.float32, {}),
    ("all_targets", [12, 7], [12, 7], 13, 1, jnp.float32, {}),
    ("contextual_and_max_attn_len", [20, 11], [3, 0], 21, 2, jnp.float32,
     {"contextual_len": 2, "max_attn_len": 5}),
    ("bidirectional", [10, 4], None, 10, 1, jnp.float32, {"causal": False}),
    ("bf16", [19, 6], [2, 1], 19, 2, jnp.bfloat16, {}),
]


def _inputs(seed, lengths, n, heads, dtype, dqk=8, dv=6):
  rng = np.random.default_rng(seed)
  b = len(lengths)
  q, k = (jnp.asarray(rng.normal(size=(b, n, heads, dqk)), dtype) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(b, n, heads, dv)), dtype)
  bias = jnp.asarray(rng.normal(size=(b, n, n)) * 0.5, dtype)
  return q, k, v, bias


def _value_and_grads(impl, q, k, v, bias, lengths, num_targets, block=None, **kw):
  def loss(q, k, v, bias):
    out = hstu_attention(q, k, v, lengths, bias=bias, num_targets=num_targets, impl=impl,
                         alpha=0.9, scale_len=q.shape[1], block=block, **kw)
    return jnp.sum(out.astype(jnp.float32) * jnp.sin(out.astype(jnp.float32))), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
  return out, grads


@pytest.mark.parametrize("impl", list(STYLES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_reference(impl, case):
  _, lengths, targets, n, heads, dtype, kw = case
  block, ctx = STYLES[impl]
  q, k, v, bias = _inputs(hash(case[0]) % 1000, lengths, n, heads, dtype)
  lengths = jnp.array(lengths)
  targets = None if targets is None else jnp.array(targets)
  want_out, want_grads = _value_and_grads("reference", q, k, v, bias, lengths, targets, **kw)
  with ctx():
    out, grads = _value_and_grads(impl, q, k, v, bias, lengths, targets, block=block, **kw)
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(out), f32(want_out), **tol)
  for name, got, want in zip("q k v bias".split(), grads, want_grads):
    scale = max(1.0, float(np.abs(f32(want)).max()))
    np.testing.assert_allclose(f32(got) / scale, f32(want) / scale, err_msg=f"d{name}", **tol)


def _brute_force_tiles(lengths, targets, n, block, heads):
  m = np.asarray(valid_attn_mask(n, jnp.array(lengths), jnp.array(targets)))
  nb = -(-n // block)
  pad = np.zeros((len(lengths), nb * block, nb * block), bool)
  pad[:, :n, :n] = m
  tiles = pad.reshape(len(lengths), nb, block, nb, block).any(axis=(2, 4))
  return int(tiles.sum()) * heads, len(lengths) * nb * nb * heads


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_kernels_skip_exactly_the_empty_tiles(impl):
  block, ctx = STYLES[impl]
  n = 3 * block + 5  # not a multiple of the block
  lengths, targets = [n, 2 * block + 1, block // 2, 0, 1], [block + 3, 0, 2, 0, 0]
  want, total = _brute_force_tiles(lengths, targets, n, block, heads=2)
  with ctx():
    got = computed_blocks(lengths, targets, n=n, impl=impl, block=block, num_heads=2)
  assert got == want == schedule(lengths, targets, n=n, block=block, num_heads=2)[0]
  assert got < total / 2  # far fewer tiles than B * H * (N / block)^2


@pytest.mark.parametrize("impl", ["pallas_gpu", "xla"])
def test_model_gradient_matches_the_reference(impl):
  from fmx.configs import retrieval as retrieval_configs
  from fmx.train.retrieval import build_model

  def grads(impl):
    c = retrieval_configs.get_config("synthetic", "hstu", "runlocal")
    c.model.max_len, c.model.num_heads, c.model.dqk, c.model.dv = 20, 2, 8, 8
    c.model.attention_impl = impl
    model = build_model(c.model, vocab=32)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 32, (3, 20)), jnp.int32)
    ts = jnp.asarray(np.sort(rng.integers(0, 10**6, (3, 21)), axis=1))
    lengths = jnp.array([20, 9, 1])
    params = model.init(jax.random.PRNGKey(0), ids, lengths, ts[:, :-1], ts[:, 1:])["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, ids, lengths, ts[:, :-1], ts[:, 1:]) ** 3)
    return jax.grad(loss)(params)

  want, got = grads("reference"), grads(impl)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
