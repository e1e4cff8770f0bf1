"""Training throughput of HSTU (base, large) and SASRec on ML-1M-shaped batches on this machine.

  python experiments/bench/train_throughput.py [--steps 20] [--negatives per_sequence]

Prints sequences/s, seconds per ML-1M epoch (6040 users), and achieved GFLOP/s (XLA's own
FLOP count of the compiled train step divided by the measured step time). Batches are random
ids with full-length (N=200) sequences, the worst case for ML-1M, whose median user is shorter.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from fmx.configs import retrieval as retrieval_configs
from fmx.models.sequential import SequentialRetrieval
from fmx.train import retrieval

ML1M_USERS, ML1M_ITEMS = 6040, 3706


def fake_batch(batch: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  ts = np.sort(rng.integers(956_703_932, 1_046_454_590, (batch, n + 1)), axis=1)
  ids = rng.integers(1, ML1M_ITEMS + 1, (batch, n + 1)).astype(np.int32)
  return {"ids": ids[:, :-1], "targets": ids[:, 1:], "timestamps": ts[:, :-1],
          "query_times": ts[:, 1:], "lengths": np.full((batch,), n, np.int32)}


def bench(encoder: str, variant: str, negatives: str, steps: int) -> dict[str, float]:
  c = retrieval_configs.get_config("ml-1m", encoder, variant)
  c.loss.negatives = negatives
  vocab = retrieval.padded_vocab(ML1M_ITEMS)
  task = retrieval.RetrievalTask(c, SequentialRetrieval(c.model, vocab),
                                 retrieval.make_optimizer(c.optimizer, 1), ML1M_ITEMS)
  state = task.init(jax.random.PRNGKey(0))
  batch = fake_batch(c.input.batch_size, c.input.max_len, np.random.default_rng(0))
  step = jax.jit(task.train_step, donate_argnums=0)
  compiled = step.lower(state, batch, jax.random.PRNGKey(1)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0))
  for _ in range(3):  # warm-up
    state, m = compiled(state, batch, jax.random.PRNGKey(1))
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch, jax.random.PRNGKey(1))
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / steps
  seq_s = c.input.batch_size / dt
  return {"seq_s": seq_s, "epoch_s": ML1M_USERS / seq_s, "gflops": flops / dt / 1e9,
          "step_ms": dt * 1e3}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--negatives", default="per_sequence")
  p.add_argument("--models", default="hstu:base,hstu:large,sasrec:base")
  args = p.parse_args()
  print(f"backend={jax.default_backend()} devices={jax.device_count()} negatives={args.negatives}")
  print(f"{'model':<14}{'step ms':>10}{'seq/s':>10}{'s/epoch':>10}{'GFLOP/s':>10}")
  for spec in args.models.split(","):
    encoder, variant = spec.split(":")
    r = bench(encoder, variant, args.negatives, args.steps)
    print(f"{spec:<14}{r['step_ms']:>10.1f}{r['seq_s']:>10.1f}{r['epoch_s']:>10.1f}{r['gflops']:>10.1f}")


if __name__ == "__main__":
  main()
