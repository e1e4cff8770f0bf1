"""TPU-style (Mosaic) Pallas kernels for jagged HSTU attention, forward and backward.

2-D tiles of `block` x `block` (a multiple of 128 on real TPUs) over a [B, H, N, d] layout, the
key (or query) tile index as the innermost "arbitrary" grid axis with f32 VMEM accumulators,
and sequence lengths / target counts scalar-prefetched into SMEM. Tiles that
`masks.block_needed` rules out run no compute, and the index maps clamp their block index to
the last needed tile so the pipeline issues no new DMA for them. Backward is two calls: dK/dV
(query tiles innermost) and dQ with the bias gradient (key tiles innermost).

Inputs arrive as [B, N, H, d] with N a multiple of `block`; on CPU run under
`pltpu.force_tpu_interpret_mode()` or with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import masks, tiles

F32 = jnp.float32


def _kv_last(qi, length, block, mask_kw):
  limit = masks.kv_block_limit(qi * block, block, block, length,
                               contextual_len=mask_kw["contextual_len"], causal=mask_kw["causal"])
  return jnp.maximum(limit - 1, 0)


def _q_range(ki, length, block, mask_kw):
  first = ki if (mask_kw["causal"] and mask_kw["contextual_len"] == 0) else 0
  last = jnp.maximum((length + block - 1) // block - 1, 0)
  return jnp.minimum(first, last), last


def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, count_ref, acc_ref, *, block,
                num_heads, nq, nk, alpha, inv_scale, mask_kw):
  b, h, qi, ki = (pl.program_id(i) for i in range(4))
  length, ntg = meta_ref[b, 0], meta_ref[b, 1]
  q0, k0 = qi * block, ki * block

  @pl.when(ki == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  needed = masks.block_needed(q0, k0, block, block, length, ntg, **mask_kw)

  @pl.when(needed)
  def _():
    w, _ = tiles.tile_weights(q_ref[...], k_ref[...], bias_ref[...], q0, k0, length, ntg, alpha,
                              inv_scale, mask_kw)
    acc_ref[...] += jnp.dot(w.astype(v_ref.dtype), v_ref[...], preferred_element_type=F32)

  count_ref[((b * num_heads + h) * nq + qi) * nk + ki] = needed.astype(jnp.int32)

  @pl.when(ki == nk - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _interpret(interpret: bool):
  """On CPU, the TPU interpreter (simulated VMEM/SMEM, DMAs and scalar prefetch)."""
  return pltpu.InterpretParams() if interpret else False


def _to_bhnd(x):
  return jnp.swapaxes(x, 1, 2)


def forward(q, k, v, bias, meta, *, block, alpha, inv_scale, mask_kw, interpret):
  """Returns (out `[B, N, H, dv]`, computed-tile flags `[B, H, nq, nk]`)."""
  b, n, h, dqk = q.shape
  dv = v.shape[-1]
  nq = nk = n // block
  qt, kt, vt = _to_bhnd(q), _to_bhnd(k), _to_bhnd(v)

  def kv_map(bi, hi, qi, ki, meta):
    return bi, hi, jnp.minimum(ki, _kv_last(qi, meta[bi, 0], block, mask_kw)), 0

  def bias_map(bi, hi, qi, ki, meta):
    return bi, qi, jnp.minimum(ki, _kv_last(qi, meta[bi, 0], block, mask_kw))

  kernel = functools.partial(_fwd_kernel, block=block, num_heads=h, nq=nq, nk=nk, alpha=alpha,
                             inv_scale=inv_scale, mask_kw=mask_kw)
  out, counts = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=[
              pl.BlockSpec((None, None, block, dqk), lambda bi, hi, qi, ki, m: (bi, hi, qi, 0)),
              pl.BlockSpec((None, None, block, dqk), kv_map),
              pl.BlockSpec((None, None, block, dv), kv_map),
              pl.BlockSpec((None, block, block), bias_map),
          ],
          out_specs=[
              pl.BlockSpec((None, None, block, dv), lambda bi, hi, qi, ki, m: (bi, hi, qi, 0)),
              pl.BlockSpec(memory_space=pltpu.SMEM),
          ],
          scratch_shapes=[pltpu.VMEM((block, dv), F32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((b, h, n, dv), v.dtype),
                 jax.ShapeDtypeStruct((b * h * nq * nk,), jnp.int32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",) * 4),
      interpret=_interpret(interpret),
      name="hstu_attention_fwd_tpu",
  )(meta, qt, kt, vt, bias)
  return _to_bhnd(out), counts.reshape(b, h, nq, nk)


def _dkdv_kernel(meta_ref, q_ref, k_ref, v_ref, bias_ref, do_ref, dk_ref, dv_ref, dk_acc, dv_acc,
                 *, block, nq, alpha, inv_scale, mask_kw):
  b, ki, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length, ntg = meta_ref[b, 0], meta_ref[b, 1]
  q0, k0 = qi * block, ki * block

  @pl.when(qi == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

  @pl.when(masks.block_needed(q0, k0, block, block, length, ntg, **mask_kw))
  def _():
    q, do = q_ref[...], do_ref[...]
    w, ds = tiles.tile_grads(q, k_ref[...], v_ref[...], do, bias_ref[...], q0, k0, length, ntg,
                             alpha, inv_scale, mask_kw)
    tn = (((0,), (0,)), ((), ()))  # contract the query axis: w^T do, ds^T q
    dv_acc[...] += jax.lax.dot_general(w.astype(do.dtype), do, tn, preferred_element_type=F32)
    dk_acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=F32) * alpha

  @pl.when(qi == nq - 1)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(meta_ref, q_ref, k_ref, v_ref, bias_ref, do_ref, dq_ref, dbias_ref, dq_acc, *,
               block, nk, alpha, inv_scale, mask_kw):
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length, ntg = meta_ref[b, 0], meta_ref[b, 1]
  q0, k0 = qi * block, ki * block

  @pl.when(ki == 0)
  def _():
    dq_acc[...] = jnp.zeros(dq_acc.shape, F32)

  needed = masks.block_needed(q0, k0, block, block, length, ntg, **mask_kw)

  @pl.when(needed)
  def _():
    k = k_ref[...]
    _, ds = tiles.tile_grads(q_ref[...], k, v_ref[...], do_ref[...], bias_ref[...], q0, k0, length,
                             ntg, alpha, inv_scale, mask_kw)
    dq_acc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=F32) * alpha
    dbias_ref[...] = ds

  @pl.when(jnp.logical_not(needed))
  def _():
    dbias_ref[...] = jnp.zeros(dbias_ref.shape, F32)

  @pl.when(ki == nk - 1)
  def _():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def backward(q, k, v, bias, meta, do, *, block, alpha, inv_scale, mask_kw, interpret):
  """Returns (dq, dk, dv, dbias `[B, N, N]`)."""
  b, n, h, dqk = q.shape
  dv = v.shape[-1]
  nb = n // block
  qt, kt, vt, dot_ = _to_bhnd(q), _to_bhnd(k), _to_bhnd(v), _to_bhnd(do)
  kw = dict(block=block, alpha=alpha, inv_scale=inv_scale, mask_kw=mask_kw)
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

  # dK / dV: grid (b, h, key tile, query tile); query tiles outside the needed range are clamped.
  def q_of(ki, qi, meta, bi):
    first, last = _q_range(ki, meta[bi, 0], block, mask_kw)
    return jnp.clip(qi, first, last)

  row = lambda d: pl.BlockSpec((None, None, block, d), lambda bi, hi, ki, qi, m: (bi, hi, q_of(ki, qi, m, bi), 0))
  col = lambda d: pl.BlockSpec((None, None, block, d), lambda bi, hi, ki, qi, m: (bi, hi, ki, 0))
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkdv_kernel, nq=nb, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nb, nb),
          in_specs=[row(dqk), col(dqk), col(dv),
                    pl.BlockSpec((None, block, block), lambda bi, hi, ki, qi, m: (bi, q_of(ki, qi, m, bi), ki)),
                    row(dv)],
          out_specs=[col(dqk), col(dv)],
          scratch_shapes=[pltpu.VMEM((block, dqk), F32), pltpu.VMEM((block, dv), F32)]),
      out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      compiler_params=params, interpret=_interpret(interpret), name="hstu_attention_dkdv_tpu",
  )(meta, qt, kt, vt, bias, dot_)

  # dQ and the bias gradient: grid (b, h, query tile, key tile).
  def k_of(qi, ki, meta, bi):
    return jnp.minimum(ki, _kv_last(qi, meta[bi, 0], block, mask_kw))

  qrow = lambda d: pl.BlockSpec((None, None, block, d), lambda bi, hi, qi, ki, m: (bi, hi, qi, 0))
  kcol = lambda d: pl.BlockSpec((None, None, block, d), lambda bi, hi, qi, ki, m: (bi, hi, k_of(qi, ki, m, bi), 0))
  dq, dbias = pl.pallas_call(
      functools.partial(_dq_kernel, nk=nb, **kw),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, h, nb, nb),
          in_specs=[qrow(dqk), kcol(dqk), kcol(dv),
                    pl.BlockSpec((None, block, block), lambda bi, hi, qi, ki, m: (bi, qi, k_of(qi, ki, m, bi))),
                    qrow(dv)],
          out_specs=[qrow(dqk),
                     pl.BlockSpec((None, None, block, block), lambda bi, hi, qi, ki, m: (bi, hi, qi, ki))],
          scratch_shapes=[pltpu.VMEM((block, dqk), F32)]),
      out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n, n), F32)],
      compiler_params=params, interpret=_interpret(interpret), name="hstu_attention_dq_tpu",
  )(meta, qt, kt, vt, bias, dot_)
  return _to_bhnd(dq), _to_bhnd(dk), _to_bhnd(dv_), dbias.sum(axis=1)
