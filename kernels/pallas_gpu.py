"""GPU-style (Triton lowering) Pallas kernels for jagged HSTU attention, forward and backward.

Structure after jax's Pallas GPU flash attention: the forward grid is (query block, batch,
head) and loops over key blocks; one backward call with grid (batch, head, block) accumulates
dK/dV of its key block over query blocks and dQ (plus the bias gradient) of its query block over
key blocks, so no atomics are needed. HSTU has no softmax, so there is no running max or
log-sum-exp. Tiles that `masks.block_needed` rules out are never loaded or multiplied.

Layout: q, k `[B, N, H, dqk]`, v `[B, N, H, dv]`, bias `[B, N, N]` (shared by heads), with N a
multiple of `block` and head dims padded to powers of two by the caller (`pad_inputs`).
On CPU run with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import masks, tiles

F32 = jnp.float32


def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, count_ref, *, block, alpha,
                inv_scale, mask_kw):
  qb = pl.program_id(0)
  length, ntg = meta_ref[0], meta_ref[1]
  q0 = qb * block
  q = q_ref[...]

  def body(kb, carry):
    acc, count = carry
    k0 = kb * block

    def compute(acc):
      k = k_ref[pl.ds(k0, block), :]
      v = v_ref[pl.ds(k0, block), :]
      w, _ = tiles.tile_weights(q, k, bias_ref[:, pl.ds(k0, block)], q0, k0, length, ntg, alpha,
                                inv_scale, mask_kw)
      return acc + jnp.dot(w.astype(v.dtype), v, preferred_element_type=F32)

    needed = masks.block_needed(q0, k0, block, block, length, ntg, **mask_kw)
    acc = lax.cond(needed, compute, lambda a: a, acc)
    return acc, count + needed.astype(jnp.int32)

  limit = masks.kv_block_limit(q0, block, block, length, contextual_len=mask_kw["contextual_len"],
                               causal=mask_kw["causal"])
  acc0 = jnp.zeros((block, v_ref.shape[-1]), F32)
  acc, count = lax.fori_loop(0, limit, body, (acc0, jnp.int32(0)))
  o_ref[...] = acc.astype(o_ref.dtype)
  count_ref[...] = jnp.full(count_ref.shape, count, jnp.int32)


def _bwd_kernel(meta_ref, q_ref, k_ref, v_ref, bias_ref, do_ref, dq_ref, dk_ref, dv_ref,
                dbias_ref, *, block, num_blocks, alpha, inv_scale, mask_kw):
  j = pl.program_id(2)
  length, ntg = meta_ref[0], meta_ref[1]
  j0 = j * block
  args = (length, ntg, alpha, inv_scale, mask_kw)
  needed = functools.partial(masks.block_needed, block_q=block, block_k=block, length=length,
                             num_targets=ntg, **mask_kw)

  # dK, dV of key block j, accumulated over query blocks.
  k = k_ref[pl.ds(j0, block), :]
  v = v_ref[pl.ds(j0, block), :]

  def dkdv_body(qb, carry):
    q0 = qb * block

    def compute(carry):
      dk, dv = carry
      q = q_ref[pl.ds(q0, block), :]
      do = do_ref[pl.ds(q0, block), :]
      w, ds = tiles.tile_grads(q, k, v, do, bias_ref[pl.ds(q0, block), pl.ds(j0, block)], q0, j0,
                               *args)
      dv = dv + jnp.dot(w.T.astype(do.dtype), do, preferred_element_type=F32)
      dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=F32) * alpha
      return dk, dv

    return lax.cond(needed(q0, j0), compute, lambda c: c, carry)

  causal_only = mask_kw["causal"] and mask_kw["contextual_len"] == 0
  first_q = j if causal_only else 0  # query blocks above key block j see none of it
  dk0 = jnp.zeros((block, k_ref.shape[-1]), F32)
  dv0 = jnp.zeros((block, v_ref.shape[-1]), F32)
  dk, dv = lax.fori_loop(first_q, num_blocks, dkdv_body, (dk0, dv0))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  # dQ and the bias gradient of query block j, accumulated over key blocks.
  q = q_ref[pl.ds(j0, block), :]
  do = do_ref[pl.ds(j0, block), :]
  dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)

  def dq_body(kb, dq):
    k0 = kb * block

    def compute(dq):
      kt = k_ref[pl.ds(k0, block), :]
      vt = v_ref[pl.ds(k0, block), :]
      _, ds = tiles.tile_grads(q, kt, vt, do, bias_ref[pl.ds(j0, block), pl.ds(k0, block)], j0,
                               k0, *args)
      dbias_ref[:, pl.ds(k0, block)] = ds.astype(dbias_ref.dtype)
      return dq + jnp.dot(ds.astype(kt.dtype), kt, preferred_element_type=F32) * alpha

    return lax.cond(needed(j0, k0), compute, lambda d: d, dq)

  limit = masks.kv_block_limit(j0, block, block, length, contextual_len=mask_kw["contextual_len"],
                               causal=mask_kw["causal"])
  dq = lax.fori_loop(0, limit, dq_body, jnp.zeros((block, q_ref.shape[-1]), F32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def forward(q, k, v, bias, meta, *, block, alpha, inv_scale, mask_kw, interpret):
  """Returns (out `[B, N, H, dv]`, computed-tile counts `[N/block, B, H]`)."""
  b, n, h, dqk = q.shape
  dv = v.shape[-1]
  nq = n // block
  kernel = functools.partial(_fwd_kernel, block=block, alpha=alpha, inv_scale=inv_scale,
                             mask_kw=mask_kw)
  out, counts = pl.pallas_call(
      kernel,
      grid=(nq, b, h),
      in_specs=[
          pl.BlockSpec((None, 2), lambda i, j, hh: (j, 0)),
          pl.BlockSpec((None, block, None, dqk), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, n, None, dqk), lambda i, j, hh: (j, 0, hh, 0)),
          pl.BlockSpec((None, n, None, dv), lambda i, j, hh: (j, 0, hh, 0)),
          pl.BlockSpec((None, block, n), lambda i, j, hh: (j, i, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, block, None, dv), lambda i, j, hh: (j, i, hh, 0)),
          pl.BlockSpec((None, None, None, 1), lambda i, j, hh: (i, j, hh, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, n, h, dv), v.dtype),
                 jax.ShapeDtypeStruct((nq, b, h, 1), jnp.int32)],
      interpret=interpret,
      name="hstu_attention_fwd",
  )(meta, q, k, v, bias)
  return out, counts[..., 0]


def backward(q, k, v, bias, meta, do, *, block, alpha, inv_scale, mask_kw, interpret):
  """Returns (dq, dk, dv, dbias `[B, N, N]`) in one Pallas call."""
  b, n, h, dqk = q.shape
  dv = v.shape[-1]
  nb = n // block
  kernel = functools.partial(_bwd_kernel, block=block, num_blocks=nb, alpha=alpha,
                             inv_scale=inv_scale, mask_kw=mask_kw)
  full = lambda d: pl.BlockSpec((None, n, None, d), lambda i, hh, j: (i, 0, hh, 0))
  tile = lambda d: pl.BlockSpec((None, block, None, d), lambda i, hh, j: (i, j, hh, 0))
  dq, dk, dv_, dbias = pl.pallas_call(
      kernel,
      grid=(b, h, nb),
      in_specs=[pl.BlockSpec((None, 2), lambda i, hh, j: (i, 0)), full(dqk), full(dqk), full(dv),
                pl.BlockSpec((None, n, n), lambda i, hh, j: (i, 0, 0)), full(dv)],
      out_specs=[tile(dqk), tile(dqk), tile(dv),
                 pl.BlockSpec((None, None, block, n), lambda i, hh, j: (i, hh, j, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, n, n), F32)],
      interpret=interpret,
      name="hstu_attention_bwd",
  )(meta, q, k, v, bias, do)
  return dq, dk, dv_, dbias.sum(axis=1)
