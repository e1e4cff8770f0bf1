"""The public jagged HSTU attention op. Models call only this function.

Implementations:
  * "xla": XLA. Causal attention without a contextual prefix runs `kernels/xla_tiled.py`
    (tiles above the diagonal skipped, a hand-written backward); every other mask runs the
    pure-jnp reference;
  * "reference": always the pure-jnp reference (`kernels/reference.py`), differentiated by JAX
    (the slow path the others are tested against);
  * "pallas": the Pallas kernel of the current backend (GPU: Triton style, TPU: Mosaic style;
    on CPU the GPU-style kernel in interpret mode), forward and backward via `jax.custom_vjp`;
  * "pallas_gpu" / "pallas_tpu": one style explicitly (interpret mode on CPU);
  * "auto": Pallas on GPU and TPU, XLA elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import masks, pallas_gpu, pallas_tpu, reference, xla_tiled

IMPLS = ("auto", "xla", "reference", "pallas", "pallas_gpu", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """Static (hashable) parameters of one Pallas attention call."""

  style: str  # "gpu" | "tpu"
  block: int
  alpha: float
  inv_scale: float
  contextual_len: int
  max_attn_len: int
  causal: bool
  interpret: bool

  @property
  def mask_kw(self) -> dict:
    return {"contextual_len": self.contextual_len, "max_attn_len": self.max_attn_len,
            "causal": self.causal}

  def kernel_kw(self) -> dict:
    return {"block": self.block, "alpha": self.alpha, "inv_scale": self.inv_scale,
            "mask_kw": self.mask_kw, "interpret": self.interpret}


def _module(style: str):
  return pallas_gpu if style == "gpu" else pallas_tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pallas(q, k, v, bias, meta, spec: KernelSpec):
  return _module(spec.style).forward(q, k, v, bias, meta, **spec.kernel_kw())[0]


def _pallas_fwd(q, k, v, bias, meta, spec):
  return _pallas(q, k, v, bias, meta, spec), (q, k, v, bias, meta)


def _pallas_bwd(spec, residuals, do):
  q, k, v, bias, meta = residuals
  dq, dk, dv, dbias = _module(spec.style).backward(q, k, v, bias, meta, do, **spec.kernel_kw())
  return dq, dk, dv, dbias.astype(bias.dtype), None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def default_block(style: str, n: int) -> int:
  if style == "tpu":
    return 128
  return 64 if n >= 64 else max(16, 1 << (max(n, 1) - 1).bit_length())


def pad_inputs(q, k, v, bias, block: int, style: str):
  """Pads N to a multiple of `block` (and, GPU style, head dims to powers of two >= 16)."""
  n = q.shape[1]
  n_pad = _round_up(n, block)
  def head(d):
    return d if style == "tpu" else max(16, 1 << (d - 1).bit_length())
  pad4 = lambda x: jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0), (0, head(x.shape[-1]) - x.shape[-1])))
  bias = jnp.pad(bias, ((0, 0), (0, n_pad - n), (0, n_pad - n)))
  return pad4(q), pad4(k), pad4(v), bias


def kernel_meta(lengths, num_targets=None) -> jax.Array:
  """`[B, 2]` int32 (length, num_targets) per sequence, as both kernel styles read it."""
  lengths = jnp.asarray(lengths, jnp.int32)
  targets = jnp.zeros_like(lengths) if num_targets is None else jnp.asarray(num_targets, jnp.int32)
  return jnp.stack([lengths, targets], axis=1)


def resolve_style(impl: str) -> tuple[str, bool] | None:
  """(style, interpret) for a Pallas impl on this backend, or None for XLA."""
  backend = jax.default_backend()
  if impl == "auto":
    impl = "pallas" if backend in ("gpu", "tpu") else "xla"
  if impl in ("xla", "reference"):
    return None
  style = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(impl, "tpu" if backend == "tpu" else "gpu")
  return style, backend == "cpu"


def hstu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    bias: jax.Array | None = None,
    num_targets: jax.Array | None = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    causal: bool = True,
    alpha: float = 1.0,
    scale_len: int | None = None,
    impl: str = "auto",
    block: int | None = None,
) -> jax.Array:
  """Jagged HSTU attention over right-padded sequences.

  Args:
    q, k: `[B, N, H, dqk]`; v: `[B, N, H, dv]`. Rows at positions >= `lengths[b]` are padding.
    lengths: `[B]` int, real length of every sequence (history + targets).
    bias: additive relative attention bias, `[B, N, N]` (shared by heads); the XLA path also
      takes `[B, H, N, N]`.
    num_targets: `[B]` int, the trailing targets of every sequence (M-FALCON candidates):
      each target sees all history and itself, never another target.
    contextual_len: a bidirectional prefix of contextual tokens.
    max_attn_len: if > 0, a query looks back at most this many positions.
    causal: causal (True) or bidirectional attention.
    alpha: multiplier of q.k (the official code uses no 1/sqrt(d)).
    scale_len: the 1/N normaliser; defaults to the padded length N.
    impl: see the module docstring.
    block: tile size (default: Pallas 64 GPU style, 128 TPU style; XLA a quarter of N).

  Returns:
    `[B, N, H, dv]` in v's dtype (f32 accumulation); padded rows are zero.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  b, n, h, _ = q.shape
  scale_len = n if scale_len is None else scale_len
  resolved = resolve_style(impl)
  if resolved is None:
    if impl != "reference" and causal and not contextual_len and (bias is None or bias.ndim == 3):
      return xla_tiled.tiled_attention(q, k, v, lengths, bias=bias, num_targets=num_targets,
                                       max_attn_len=max_attn_len, alpha=alpha,
                                       scale_len=scale_len, block=block)
    return reference.hstu_attention_reference(
        q, k, v, lengths, bias=bias, num_targets=num_targets, contextual_len=contextual_len,
        max_attn_len=max_attn_len, causal=causal, alpha=alpha, scale_len=scale_len)
  style, interpret = resolved
  if bias is not None and bias.ndim != 3:
    raise ValueError(f"impl={impl!r} takes a head-shared bias [B, N, N]; got shape {bias.shape}")
  block = block or default_block(style, n)
  if bias is None:
    bias = jnp.zeros((b, n, n), q.dtype)
  meta = kernel_meta(lengths, num_targets)
  spec = KernelSpec(style, block, float(alpha), 1.0 / float(scale_len), int(contextual_len),
                    int(max_attn_len), bool(causal), interpret)
  qp, kp, vp, bp = pad_inputs(q, k, v, bias, block, style)
  out = _pallas(qp, kp, vp, bp, meta, spec)
  return out[:, :n, :, : v.shape[-1]]


def computed_blocks(lengths, num_targets=None, *, n: int, impl: str = "pallas_gpu",
                    block: int | None = None, num_heads: int = 1, contextual_len: int = 0,
                    max_attn_len: int = 0, causal: bool = True) -> int:
  """Tiles the forward kernel actually computes, as counted by the kernel itself."""
  style, interpret = resolve_style(impl)
  block = block or default_block(style, n)
  b = len(lengths)
  x = jnp.zeros((b, n, num_heads, 8), jnp.float32)
  qp, kp, vp, bp = pad_inputs(x, x, x, jnp.zeros((b, n, n)), block, style)
  spec = KernelSpec(style, block, 1.0, 1.0 / n, contextual_len, max_attn_len, causal, interpret)
  _, counts = _module(style).forward(qp, kp, vp, bp, kernel_meta(lengths, num_targets),
                                     **spec.kernel_kw())
  return int(np.asarray(counts).sum())


def schedule(lengths, num_targets=None, *, n: int, block: int, num_heads: int = 1,
             contextual_len: int = 0, max_attn_len: int = 0, causal: bool = True) -> tuple[int, int]:
  """(computed, total) tiles of the Pallas kernels for these lengths, from `masks.block_needed`
  alone (NumPy; cheap enough for a whole dataset)."""
  lengths = np.asarray(lengths)[:, None, None]
  targets = np.zeros_like(lengths) if num_targets is None else np.asarray(num_targets)[:, None, None]
  nb = -(-n // block)
  starts = np.arange(nb) * block
  needed = masks.block_needed(starts[None, :, None], starts[None, None, :], block, block, lengths,
                              targets, contextual_len=contextual_len, max_attn_len=max_attn_len,
                              causal=causal)
  return int(np.sum(needed)) * num_heads, len(lengths) * nb * nb * num_heads


def hstu_cached_attention(q, k_cache, v_cache, cache_lengths, k_self, v_self, *, bias_cache=None,
                          bias_self=None, max_attn_len: int = 0, alpha: float = 1.0,
                          scale_len: int, impl: str = "auto") -> jax.Array:
  """M-FALCON's cached step: new target rows attend to a cached history's keys and values and
  to themselves, never to each other (see `reference.hstu_cached_attention_reference`).

  The history is encoded once; candidates then come in micro-batches of any size. Only the
  XLA implementation exists for this op (it is matmul-bound: no mask to skip).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  return reference.hstu_cached_attention_reference(
      q, k_cache, v_cache, cache_lengths, k_self, v_self, bias_cache=bias_cache,
      bias_self=bias_self, max_attn_len=max_attn_len, alpha=alpha, scale_len=scale_len)
