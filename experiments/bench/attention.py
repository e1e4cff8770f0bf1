"""Jagged HSTU attention: XLA reference vs Pallas kernels, forward and forward+backward.

  python experiments/bench/attention.py [--batch 128] [--n 200] [--small-batch 4 --small-n 160]

Lengths follow MovieLens-1M's real training windows (min(#ratings - 1, N)), sampled per batch.
For each implementation it prints the time, the effective GFLOP/s counting only unmasked
(query, key) pairs, the fraction of tiles the Pallas kernels skip, and the peak temporary
memory XLA reports for the compiled function. It also prints the skip fraction of both kernel
styles over all 6040 ML-1M users at N=200.

On CPU the Pallas kernels only run in interpret mode, at the small size: their timings there
measure the interpreter, not the kernels. On GPU/TPU both paths run at the full size.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from fmx.configs import retrieval as retrieval_configs
from fmx.data import load as data_load
from kernels import hstu_attention, valid_attn_mask
from kernels.hstu_attention import default_block, schedule


def ml1m_window_lengths(n: int) -> np.ndarray:
  data = data_load.load(retrieval_configs.get_config("ml-1m", "hstu", "base").input, "sequences")
  return np.minimum(np.array([len(s) for s in data.item_ids]) - 2, n)


def timed(fn, *args, reps: int):
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
  jax.block_until_ready(compiled(*args))
  t = time.perf_counter()
  for _ in range(reps):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps, temp


def run(impl: str, lengths: np.ndarray, n: int, heads: int, d: int, reps: int, ctx):
  b = len(lengths)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, n, heads, d)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.normal(size=(b, n, n)) * 0.1, jnp.float32)
  lens = jnp.asarray(lengths, jnp.int32)
  fwd = lambda q, k, v, bias: hstu_attention(q, k, v, lens, bias=bias, impl=impl)
  loss = lambda q, k, v, bias: jnp.sum(fwd(q, k, v, bias) ** 2)
  both = jax.grad(loss, argnums=(0, 1, 2, 3))
  pairs = float(np.asarray(valid_attn_mask(n, lens)).sum()) * heads
  with ctx():
    t_f, m_f = timed(fwd, q, k, v, bias, reps=reps)
    t_b, m_b = timed(both, q, k, v, bias, reps=reps)
  return {"fwd_ms": t_f * 1e3, "fwd_gflops": pairs * 4 * d / t_f / 1e9, "fwd_mem_mb": m_f / 2**20,
          "fb_ms": t_b * 1e3, "fb_gflops": pairs * 14 * d / t_b / 1e9, "fb_mem_mb": m_b / 2**20}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--n", type=int, default=200)
  p.add_argument("--heads", type=int, default=1)
  p.add_argument("--d", type=int, default=50)
  p.add_argument("--small-batch", type=int, default=4)
  p.add_argument("--small-n", type=int, default=160)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  backend = jax.default_backend()
  all_lengths = ml1m_window_lengths(args.n)
  rng = np.random.default_rng(0)

  print(f"backend={backend}; ML-1M training windows at N={args.n}: "
        f"median length {int(np.median(all_lengths))}, {np.mean(all_lengths == args.n):.0%} full")
  for style, impl in (("gpu", "pallas_gpu"), ("tpu", "pallas_tpu")):
    block = default_block(style, args.n)
    done, total = schedule(all_lengths, n=args.n, block=block)
    print(f"  {impl} (block {block}): computes {done}/{total} tiles over 6040 users, "
          f"skips {1 - done / total:.1%}")

  on_cpu = backend == "cpu"
  rows = [("xla", args.batch, args.n, contextlib.nullcontext)]
  small = (args.small_batch, args.small_n) if on_cpu else (args.batch, args.n)
  rows += [("xla", *small, contextlib.nullcontext), ("pallas_gpu", *small, contextlib.nullcontext),
           ("pallas_tpu", *small, pltpu.force_tpu_interpret_mode if on_cpu else contextlib.nullcontext)]
  if backend == "gpu":
    rows = [r for r in rows if r[0] != "pallas_tpu"]
  if backend == "tpu":
    rows = [r for r in rows if r[0] != "pallas_gpu"]
  print(f"\n{'impl':<11}{'B':>5}{'N':>5}{'skip':>7}{'fwd ms':>10}{'GFLOP/s':>9}{'MiB':>8}"
        f"{'f+b ms':>10}{'GFLOP/s':>9}{'MiB':>8}")
  for impl, b, n, ctx in rows:
    lengths = np.minimum(rng.choice(all_lengths, b), n)
    skip = "-"
    if impl != "xla":
      done, total = schedule(lengths, n=n, block=default_block(impl[-3:], n), num_heads=args.heads)
      skip = f"{1 - done / total:.0%}"
    r = run(impl, lengths, n, args.heads, args.d, args.reps, ctx)
    print(f"{impl:<11}{b:>5}{n:>5}{skip:>7}{r['fwd_ms']:>10.1f}{r['fwd_gflops']:>9.2f}"
          f"{r['fwd_mem_mb']:>8.1f}{r['fb_ms']:>10.1f}{r['fb_gflops']:>9.2f}{r['fb_mem_mb']:>8.1f}")
  if on_cpu:
    print("\nNote: on CPU the Pallas rows run in interpret mode; their times measure the "
          "interpreter, not the kernels. Effective GFLOP/s count only unmasked pairs.")


if __name__ == "__main__":
  main()
