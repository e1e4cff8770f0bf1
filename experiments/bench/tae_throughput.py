"""M-FALCON speedup: target-aware embeddings for one request with 256 and 1024 candidates.

  python experiments/bench/tae_throughput.py [--variant base] [--history 200]

Compares (a) M-FALCON: the history is encoded once and candidates are scored in micro-batches
against its key/value cache, with (b) one sequence per candidate: history + that candidate
through the full model (batched 64 sequences at a time). Both use the FM `base` config with
random weights on synthetic items; both are jitted and warmed up, and the fastest of `--reps`
calls is reported. It also checks
that the two give the same TAEs.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from fmx.configs import foundation as fm_configs
from fmx.data import synthetic_surfaces
from fmx.runtime import fm as fm_runtime
from fmx.runtime.mfalcon import MFalcon, history_inputs


def per_candidate_batches(hist, cand, h, batch):
  """Full-model inputs: one sequence [history, candidate] per candidate."""
  m = len(cand["ids"])
  for s in range(0, m, batch):
    ids = cand["ids"][s:s + batch]
    k = len(ids)
    seq = lambda a, c: np.concatenate([np.repeat(a[:, :h], batch, 0), np.pad(c, (0, batch - k))[:, None]], 1)
    req = hist["request_time"][0]
    yield {"ids": seq(hist["ids"], ids), "surfaces": seq(hist["surfaces"], cand["surfaces"][s:s + batch]),
           "actions": seq(hist["actions"], np.zeros(k, np.int32)),
           "timestamps": seq(hist["timestamps"], np.full(k, req)),
           "query_times": seq(hist["query_times"], np.full(k, req)),
           "positions": np.tile(np.append(np.arange(h), h), (batch, 1)).astype(np.int32),
           "lengths": np.full(batch, h + 1, np.int32), "num_targets": np.ones(batch, np.int32),
           "cand_index": np.full((batch, 1), h, np.int32), "request_time": np.full(batch, req),
           "user": np.zeros(batch, np.int32)}, k


def best_of(reps: int, fn):
  """(fastest wall time of `reps` calls, the last result)."""
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return min(times), out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="base")
  p.add_argument("--history", type=int, default=200)
  p.add_argument("--micro-batch", type=int, default=256)
  p.add_argument("--reps", type=int, default=5, help="timed calls per path (fastest reported)")
  args = p.parse_args()
  c = fm_configs.get_config("synthetic", args.variant)
  h = args.history
  c.model.max_len = h + 1
  data = synthetic_surfaces.generate(num_users=2, num_items=4000, seed=0, min_len=h + 1, max_len=h + 1)
  model, items = fm_runtime.build(c, data)
  params = fm_runtime.init_params(c, model, items, jax.random.PRNGKey(0))
  ids, ts = data.item_ids[0][:h], data.timestamps[0][:h]
  hist = history_inputs(ids, data.item_surface[ids], data.actions[0][:h], ts, int(ts[-1]) + 60, h)
  falcon = MFalcon(model, items, args.micro_batch)
  full = jax.jit(lambda p, b: model.apply({"params": p}, b, items)[0])
  rng = np.random.default_rng(0)
  print(f"FM {args.variant}: d={c.model.dim}, {c.model.num_layers} layers, history {h}, "
        f"micro-batch {args.micro_batch}, backend {jax.default_backend()}")
  print(f"{'candidates':>10}{'M-FALCON ms':>13}{'per-candidate ms':>18}{'speedup':>9}{'max |diff|':>12}")
  for m in (256, 1024):
    cid = rng.integers(1, data.num_items + 1, m).astype(np.int32)
    cand = {"ids": cid, "surfaces": data.item_surface[cid]}
    falcon.target_aware_embeddings(params, hist, cand)  # warm-up / compile
    t_fast, fast = best_of(args.reps, lambda: falcon.target_aware_embeddings(params, hist, cand))
    batches = list(per_candidate_batches(hist, cand, h, 64))
    jax.block_until_ready(full(params, batches[0][0]))  # compile
    t_slow, slow = best_of(args.reps, lambda: np.concatenate(
        [np.asarray(full(params, b))[:k, 0] for b, k in batches]))
    print(f"{m:>10}{t_fast * 1e3:>13.1f}{t_slow * 1e3:>18.1f}{t_slow / t_fast:>8.1f}x"
          f"{float(np.abs(fast - slow).max()):>12.2e}")


if __name__ == "__main__":
  main()
