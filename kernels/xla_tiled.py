"""Causal HSTU attention in XLA that skips the tiles above the diagonal (the `xla` impl on CPU).

The query axis is cut into tiles of `block` rows; tile `[r0, r1)` attends only to keys `[0, r1)`,
so about a third of the `[N, N]` pairs are never computed (four tiles). A hand-written backward
pass (`jax.custom_vjp`) recomputes each tile's logits instead of keeping `[B, H, N, N]`
residuals (keeping them measured 10-20% slower: the working set outgrows the caches) and forms
`silu'` once per tile.

Same mask (`kernels/masks.py`), bias and scale as `reference.hstu_attention_reference`, which the
tests compare it with; only causal attention without a contextual prefix takes this path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels import masks, tiles

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TiledSpec:
  block: int
  alpha: float
  inv_scale: float
  max_attn_len: int


def _tiles(n: int, block: int):
  return [(r0, min(r0 + block, n)) for r0 in range(0, n, block)]


def _tile(q, k, bias, lengths, num_targets, r0, r1, spec: TiledSpec):
  """(w, g) of query rows [r0, r1) against keys [0, r1): `w = mask silu(s) / N`,
  `g = mask silu'(s) / N` with `s = alpha q k^T + bias`, `[B, H, r1 - r0, r1]`."""
  s = jnp.einsum("bhid,bhjd->bhij", q[:, :, r0:r1], k[:, :, :r1], preferred_element_type=F32)
  s = s * spec.alpha
  if bias is not None:
    s = s + bias[:, None, r0:r1, :r1].astype(F32)
  rows = jnp.arange(r0, r1)[None, None, :, None]
  cols = jnp.arange(r1)[None, None, None, :]
  valid = masks.element_mask(rows, cols, lengths[:, None, None, None],
                             num_targets[:, None, None, None], max_attn_len=spec.max_attn_len)
  return tiles.silu_weights(s, valid, spec.inv_scale)


def _forward(q, k, v, bias, lengths, num_targets, spec):
  n = q.shape[2]
  outs = []
  for r0, r1 in _tiles(n, spec.block):
    w, _ = _tile(q, k, bias, lengths, num_targets, r0, r1, spec)
    outs.append(jnp.einsum("bhij,bhjd->bhid", w.astype(v.dtype), v[:, :, :r1],
                           preferred_element_type=F32))
  return jnp.concatenate(outs, axis=2).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, bias, lengths, num_targets, spec):
  return _forward(q, k, v, bias, lengths, num_targets, spec)


def _attention_fwd(q, k, v, bias, lengths, num_targets, spec):
  return _forward(q, k, v, bias, lengths, num_targets, spec), (q, k, v, bias, lengths, num_targets)


def _attention_bwd(spec, residuals, do):
  q, k, v, bias, lengths, num_targets = residuals
  n = q.shape[2]
  dq, dbias = [], []
  dk, dv = jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32)
  for r0, r1 in _tiles(n, spec.block):
    w, g = _tile(q, k, bias, lengths, num_targets, r0, r1, spec)
    do_t = do[:, :, r0:r1]
    dv = dv.at[:, :, :r1].add(jnp.einsum("bhij,bhid->bhjd", w, do_t, preferred_element_type=F32))
    ds = jnp.einsum("bhid,bhjd->bhij", do_t, v[:, :, :r1], preferred_element_type=F32) * g
    dq.append(jnp.einsum("bhij,bhjd->bhid", ds, k[:, :, :r1], preferred_element_type=F32))
    dk = dk.at[:, :, :r1].add(jnp.einsum("bhij,bhid->bhjd", ds, q[:, :, r0:r1],
                                         preferred_element_type=F32))
    if bias is not None:
      ds_heads = functools.reduce(jnp.add, [ds[:, h] for h in range(ds.shape[1])])  # fast on CPU
      dbias.append(jnp.pad(ds_heads, ((0, 0), (0, 0), (0, n - r1))))
  dq = jnp.concatenate(dq, axis=2) * spec.alpha
  dbias = None if bias is None else jnp.concatenate(dbias, axis=1).astype(bias.dtype)
  return (dq.astype(q.dtype), (dk * spec.alpha).astype(k.dtype), dv.astype(v.dtype), dbias,
          None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def default_block(n: int) -> int:
  """Four tiles of a multiple of 16 rows (one tile below 64 rows)."""
  return n if n < 64 else -(-n // 64) * 16


def tiled_attention(q, k, v, lengths, *, bias=None, num_targets=None, max_attn_len: int = 0,
                    alpha: float = 1.0, scale_len: int, block: int | None = None) -> jax.Array:
  """Causal HSTU attention of `[B, N, H, d]` inputs (bias `[B, N, N]` or None); see the module
  docstring. Returns `[B, N, H, dv]`, padded rows zero."""
  lengths = jnp.asarray(lengths, jnp.int32)
  num_targets = (jnp.zeros_like(lengths) if num_targets is None
                 else jnp.asarray(num_targets, jnp.int32))
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  n = q.shape[1]
  spec = TiledSpec(block or default_block(n), float(alpha), 1.0 / float(scale_len),
                   int(max_attn_len))
  out = _attention(heads_first(q), heads_first(k), heads_first(v), bias, lengths, num_targets,
                   spec)
  return jnp.swapaxes(out, 1, 2)
