"""The public jagged HSTU attention op. Models call only this function."""

from __future__ import annotations

import jax

from kernels import reference

IMPLS = ("auto", "xla")


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
) -> jax.Array:
  """Jagged HSTU attention over right-padded sequences.

  Args:
    q, k: `[B, N, H, dqk]`; v: `[B, N, H, dv]`. Rows at positions >= `lengths[b]` are padding.
    lengths: `[B]` int, real length of every sequence (history + targets).
    bias: additive relative attention bias, `[B, N, N]` (shared by heads) or `[B, H, N, N]`.
    num_targets: `[B]` int, the trailing targets of every sequence (M-FALCON candidates):
      each target sees all history and itself, never another target.
    contextual_len: a bidirectional prefix of contextual tokens.
    max_attn_len: if > 0, a query looks back at most this many positions.
    causal: causal (True) or bidirectional attention.
    alpha: multiplier of q.k (the official code uses no 1/sqrt(d)).
    scale_len: the 1/N normaliser; defaults to the padded length N.
    impl: "auto" (XLA on CPU) or "xla".

  Returns:
    `[B, N, H, dv]`; padded rows are zero.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  return reference.hstu_attention_reference(
      q, k, v, lengths, bias=bias, num_targets=num_targets, contextual_len=contextual_len,
      max_attn_len=max_attn_len, causal=causal, alpha=alpha, scale_len=scale_len)
