"""Expert cost relative to the foundation model: parameters and FLOPs per candidate.

  python experiments/bench/expert_cost.py [--fm-variant base] [--candidates 16]
      [--expert-dim 24] [--expert-layers 1] [--short 16]

The expert's defaults are those of fmx/configs/ml1m_expert.py (and synthetic_expert.py).

FLOPs come from XLA's cost analysis of the compiled forward passes. FM per candidate is the
full-sequence forward over a request with H=200 history events and `--candidates`
candidates, divided by the number of candidates (the training layout). Expert per candidate is
its forward (short-term HSTU over the surface's last `--short` events plus the candidate,
fusion and heads) on one candidate. The paper's budget is an expert at most 10% of the FM.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmx.configs import expert as expert_configs, foundation as fm_configs
from fmx.data import synthetic_surfaces
from fmx.models.embeddings import padded_vocab
from fmx.models.expert import Expert
from fmx.models.hstu import HSTUConfig
from fmx.runtime import fm as fm_runtime


def flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0))


def count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--fm-variant", default="base")
  e = expert_configs.get_config("ml-1m", "tae+ue", fm_workdir="")
  p.add_argument("--short", type=int, default=e.input.short_len, help="T: the expert's short-term events")
  p.add_argument("--candidates", type=int, default=16)
  p.add_argument("--expert-dim", type=int, default=e.model.dim)
  p.add_argument("--expert-layers", type=int, default=e.model.num_layers)
  args = p.parse_args()
  c = fm_configs.get_config("synthetic", args.fm_variant)
  h, m = 200, args.candidates
  c.input.max_history, c.input.num_candidates = h, m
  c.model.max_len = h + m
  data = synthetic_surfaces.generate(num_users=2, num_items=3706, seed=0, min_len=h + m, max_len=h + m)
  vocab = padded_vocab(data.num_items)
  fm, items = fm_runtime.build(c, data)
  fm_params = fm_runtime.init_params(c, fm, items, jax.random.PRNGKey(0))
  n = h + m
  tokens = {k: jnp.zeros((1, n), jnp.int32) for k in ("ids", "surfaces", "actions", "positions",
                                                       "timestamps", "query_times")}
  tokens.update(lengths=jnp.array([n]), num_targets=jnp.array([m]),
                cand_index=jnp.arange(h, n)[None], request_time=jnp.zeros((1,), jnp.int32),
                user=jnp.zeros((1,), jnp.int32))
  fm_flops = flops(lambda p, t: fm.apply({"params": p}, t, items), fm_params, tokens) / m

  t = args.short
  d = args.expert_dim
  hstu = HSTUConfig.from_model_config(e.model, dim=d, num_layers=args.expert_layers, dqk=d, dv=d,
                                      max_len=t + 1)
  expert = Expert(hstu, vocab, num_tasks=4, carrier=e.model.carrier)
  batch = {"ids": jnp.zeros((1, t), jnp.int32), "actions": jnp.zeros((1, t), jnp.int32),
           "timestamps": jnp.zeros((1, t), jnp.int32), "lengths": jnp.array([t]),
           "cand": jnp.ones((1,), jnp.int32), "request_time": jnp.zeros((1,), jnp.int32),
           "tae": jnp.zeros((1, c.model.dim)), "ue": jnp.zeros((1, c.model.dim))}
  e_params = nn.meta.unbox(expert.init(jax.random.PRNGKey(0), batch, items)["params"])
  e_flops = flops(lambda p, b: expert.apply({"params": p}, b, items), e_params, batch)
  emb = lambda params, name: int(np.prod(params[name]["embedding"].shape))
  fm_dense, e_dense = count(fm_params) - emb(fm_params, "item"), count(e_params) - emb(e_params, "item")
  print(f"FM {args.fm_variant}: {count(fm_params):,} params ({fm_dense:,} without the item table), "
        f"{fm_flops / 1e6:.2f} MFLOP per candidate (H={h}, {m} candidates per request)")
  print(f"expert (d={args.expert_dim}, {args.expert_layers} HSTU layer(s), T={t}, carrier tae+ue): "
        f"{count(e_params):,} params ({e_dense:,} without the item table), {e_flops / 1e6:.3f} MFLOP per candidate")
  print(f"expert / FM: params {count(e_params) / count(fm_params):.1%} "
        f"(dense {e_dense / fm_dense:.1%}), FLOPs per candidate {e_flops / fm_flops:.1%}")


if __name__ == "__main__":
  main()
