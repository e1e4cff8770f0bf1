"""Tile math shared by both Pallas kernel styles: HSTU weights of one (query, key) tile and
their gradient with respect to the logits. All accumulation in f32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import masks

F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def tile_weights(q, k, bias, q0, k0, length, num_targets, alpha, inv_scale, mask_kw):
  """(w, g): `w = mask * silu(alpha q k^T + bias) / N` and `g = mask * silu'(...) / N`."""
  s = jax.lax.dot_general(q, k, _NT, preferred_element_type=F32) * alpha + bias.astype(F32)
  rows = q0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
  cols = k0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  valid = masks.element_mask(rows, cols, length, num_targets, **mask_kw)
  return silu_weights(s, valid, inv_scale)


def silu_weights(s, valid, inv_scale):
  """(w, g) from logits `s`: `w = valid * silu(s) * inv_scale`, `g = valid * silu'(s) * inv_scale`
  (the XLA tiled path shares it with the Pallas kernels)."""
  sig = jax.nn.sigmoid(s)
  w = jnp.where(valid, s * sig * inv_scale, 0.0)
  g = jnp.where(valid, sig * (1.0 + s * (1.0 - sig)) * inv_scale, 0.0)
  return w, g


def tile_grads(q, k, v, do, bias, q0, k0, length, num_targets, alpha, inv_scale, mask_kw):
  """(w, ds): the tile's weights and the gradient of the loss with respect to its logits."""
  w, g = tile_weights(q, k, bias, q0, k0, length, num_targets, alpha, inv_scale, mask_kw)
  dw = jax.lax.dot_general(do, v, _NT, preferred_element_type=F32)
  return w, dw * g
