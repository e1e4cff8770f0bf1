"""Where the time of one HSTU training step goes, piece by piece, on real ML-1M batches.

  python experiments/bench/step_profile.py [--models hstu:base,hstu:large] [--n 200] [--ops]

Each piece is jitted on its own at the step's shapes (batch 128, padded length `--n`) and timed
(median of `--reps` calls after a warm call); forward and backward together where it has a
gradient. `rest` is the gradient computation minus the pieces: the input embeddings,
projections, layer norms, elementwise work and everything XLA fuses around them. The pieces run
in isolation, so they need not add up exactly to the step.

`--ops` instead traces `--reps` whole steps with jax.profiler and adds up the time of each
compiled operation XLA ran, by kind: the matmuls with what XLA fused into them, gathers,
scatters, copies/slices/transposes, reductions, the other elementwise fusions, and `other`
(sorts, custom calls, random bits); then the operations that took longest, with the JAX op each
came from. Where operations run at once on several threads, each instant is split equally
between them, so the kinds add up to the wall time during which any operation ran.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads, as fmx.main does (fmx/allocator.py)
  from fmx import allocator
  allocator.restart()

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fmx.configs import retrieval as retrieval_configs
from fmx.data import load as data_load, sequences as seqlib
from fmx.models import hstu
from fmx.models.embeddings import l2_normalize, padded_vocab
from fmx.train import losses, retrieval
from fmx.train.state import make_optimizer
from kernels import hstu_attention


def median_ms(fn, *args, reps: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_MOVES = {"copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate",
          "pad", "bitcast", "reshape", "broadcast", "parameter", "constant", "tuple",
          "get-tuple-element", "iota"}
_OTHER = {"custom-call", "sort", "rng", "rng-bit-generator", "rng-get-and-update-state",
          "infeed", "outfeed", "send", "recv", "all-reduce", "all-gather", "all-to-all"}
_CALLS = re.compile(r"(?:calls|to_apply|select|scatter)=%([\w.\-]+)")


def hlo_kinds(hlo: str) -> dict[str, tuple[str, str, str]]:
  """Every instruction of a compiled HLO module -> (kind, shape, the JAX op it came from).
  Control flow (while, conditional, call) gets no kind: the operations inside it are timed."""
  comps, cur = {}, None
  for line in hlo.splitlines():
    if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):
      cur = line.split()[line.startswith("ENTRY")].lstrip("%")
      comps[cur] = []
    elif cur is not None and (m := _INSTRUCTION.match(line)):
      comps[cur].append(m.groups())
  def opcodes(comp, seen):
    ops = set()
    for _, _, op, rest in comps.get(comp, ()):
      ops.add(op)
      for sub in _CALLS.findall(rest):
        if sub not in seen:
          seen.add(sub)
          ops |= opcodes(sub, seen)
    return ops
  kinds = {}
  for comp in comps.values():
    for name, shape, op, rest in comp:
      if op in ("while", "conditional", "call"):
        continue
      ops = set() if op == "fusion" else {op}  # a fusion is what it fuses
      for sub in _CALLS.findall(rest):
        ops |= opcodes(sub, {sub})
      kind = ("matmul (+ fused)" if ops & {"dot", "convolution"} else
              "scatter" if ops & {"scatter", "select-and-scatter"} else
              "gather" if "gather" in ops else
              "other" if not ops or ops & _OTHER else
              "copy, slice, transpose" if ops <= _MOVES else
              "reduce (+ fused)" if ops & {"reduce", "reduce-window"} else "elementwise")
      source = re.search(r'op_name="([^"]*)"', rest)
      kinds[name] = (kind, shape, source[1] if source else "")
  return kinds


def op_breakdown(fn, args, reps: int, top: int = 12):
  """Wall ms per call of `fn`, the ms of each kind of its compiled operations, and the `top`
  operations."""
  fn = jax.jit(fn)
  kinds = hlo_kinds(fn.lower(*args).compile().as_text())
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      t = time.perf_counter()
      for _ in range(reps):
        jax.block_until_ready(fn(*args))
      wall = (time.perf_counter() - t) / reps * 1e3
    trace = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  spans = [(e.start_ns, e.start_ns + e.duration_ns, e.name)
           for line in trace.find_plane_with_name("/host:CPU").lines for e in line.events
           if e.name in kinds]
  # Operations run at once on several threads: each instant of wall time is split equally
  # between the operations running in it, so the kinds add up to the time any of them ran.
  bounds = sorted((t, start, i) for i, (a, b, _) in enumerate(spans)
                  for t, start in ((a, 1), (b, 0)))
  per_op, running, last = collections.Counter(), set(), 0
  for t, start, i in bounds:
    for j in running:
      per_op[spans[j][2]] += (t - last) / len(running) / 1e6 / reps
    last = t
    (running.add if start else running.discard)(i)
  per_kind = collections.Counter()
  for name, ms in per_op.items():
    per_kind[kinds[name][0]] += ms
  return wall, per_kind, [(ms, name, *kinds[name]) for name, ms in per_op.most_common(top)]


def print_ops(fn, args, reps: int):
  wall, per_kind, top = op_breakdown(fn, args, reps)
  total = sum(per_kind.values())
  print(f"  wall {wall:.1f} ms a step; its operations ran during {total:.1f} ms of it")
  for kind, ms in per_kind.most_common():
    print(f"  {kind:<26}{ms:>9.1f} ms{ms / total:>6.0%}")
  print("  longest operations (ms a step, shape, JAX op):")
  for ms, name, _, shape, source in top:
    source = source.replace("jit(train_step)/", "")
    print(f"  {ms:>8.1f}  {name[:28]:<28} {shape[:34]:<34} {source[-90:]}")


def profile(data, encoder: str, variant: str, negatives: str, n: int, reps: int,
            ops: bool = False) -> dict:
  c = retrieval_configs.get_config("ml-1m", encoder, variant)
  c.loss.negatives = negatives
  c.input.sort_chunk, c.input.length_buckets = 0, ()
  c.input.max_len = c.model.max_len = n
  ds, _ = seqlib.train_batches(data, c.input.protocol, n, c.input.batch_size, c.seed, 1)
  batch = ds[0]
  task = retrieval.RetrievalTask(c, retrieval.build_model(c.model, padded_vocab(data.num_items)),
                                 make_optimizer(c.optimizer), data.num_items)
  state = nn.meta.unbox(task.init(jax.random.PRNGKey(0)))
  rng = jax.random.PRNGKey(1)
  if ops:
    print_ops(task.train_step, (state, batch, rng), reps)
    return {}
  hc = task.model.config
  b, layers = batch["ids"].shape[0], hc.num_layers
  key = jax.random.split(jax.random.PRNGKey(2), 4)
  normal = lambda k, *shape: jax.random.normal(k, shape, jnp.float32) * 0.1
  q, k = (normal(key[i], b, n, hc.num_heads, hc.dqk) for i in range(2))
  v = normal(key[2], b, n, hc.num_heads, hc.dv)
  lengths = jnp.asarray(batch["lengths"])
  out = {}
  out["step"] = median_ms(task.train_step, state, batch, rng, reps=reps)
  grads = jax.grad(lambda p, batch: task.loss(p, batch, rng)[0])
  out["gradients"] = median_ms(grads, state.params, batch, reps=reps)
  param_grads = grads(state.params, batch)
  update = lambda g, opt_state, params: optax.apply_updates(
      params, task.tx.update(g, opt_state, params)[0])
  out["optimizer"] = median_ms(update, param_grads, state.opt_state, state.params, reps=reps)
  if encoder == "hstu":
    out["time buckets"] = median_ms(
        lambda ts, qt: hstu.time_buckets(ts, qt, hc.num_buckets), batch["timestamps"],
        batch["query_times"], reps=reps)
    buckets = hstu.time_buckets(batch["timestamps"], batch["query_times"], hc.num_buckets)
    rel = hstu.relative_positions(jnp.arange(n)[None], jnp.arange(n)[None], hc.max_len)
    rab = hstu.RelativeBias(hc.max_len, hc.num_buckets)
    rab_params = nn.meta.unbox(rab.init(rng, buckets, rel))
    bias_cotangent = normal(key[3], b, n, n)
    rab_grad = jax.grad(lambda p, buckets, rel, g: jnp.sum(rab.apply(p, buckets, rel) * g))
    out["rab (all layers)"] = layers * median_ms(rab_grad, rab_params, buckets, rel,
                                                 bias_cotangent, reps=reps)
    attn = lambda q, k, v, bias: jnp.sum(hstu_attention(
        q, k, v, lengths, bias=bias, scale_len=n, impl=hc.attention_impl) * v)
    out["attention (all layers)"] = layers * median_ms(
        jax.grad(attn, argnums=(0, 1, 2, 3)), q, k, v, bias_cotangent, reps=reps)
  query = l2_normalize(normal(key[0], b, n, hc.dim))
  weights = (jnp.arange(n)[None] < lengths[:, None]).astype(jnp.float32)

  def negatives_loss(params, query, targets):
    neg_ids = jax.random.randint(rng, losses.negative_shape(negatives, b, n, c.loss.num_negatives),
                                 1, data.num_items + 1)
    table = task.model.apply({"params": params}, method="item_embeddings")
    return losses.sampled_softmax(query, table, targets, neg_ids, weights, c.loss.temperature)

  out["sampled softmax"] = median_ms(jax.grad(negatives_loss, argnums=(0, 1)), state.params,
                                     query, batch["targets"], reps=reps)
  out["rest"] = out["gradients"] - sum(
      v for k, v in out.items() if k not in ("step", "gradients", "optimizer"))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="hstu:base,hstu:large")
  p.add_argument("--negatives", default="per_sequence,per_position")
  p.add_argument("--n", type=int, default=200, help="padded length of the profiled batch")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--ops", action="store_true",
                 help="trace whole steps and break their time down by compiled operation")
  args = p.parse_args()
  data = data_load.load(retrieval_configs.get_config("ml-1m", "hstu", "base").input, "sequences")
  how = f"ms a step, {args.reps} traced steps" if args.ops else f"ms, median of {args.reps}"
  print(f"backend={jax.default_backend()} batch=128 N={args.n} ({how})")
  for spec in args.models.split(","):
    for negatives in args.negatives.split(","):
      encoder, variant = spec.split(":")
      print(f"\n{spec} negatives={negatives}")
      r = profile(data, encoder, variant, negatives, args.n, args.reps, args.ops)
      for name, ms in r.items():
        share = "" if name == "step" else f"{ms / r['step']:>8.0%}"
        print(f"  {name:<34}{ms:>9.1f} ms{share}")


if __name__ == "__main__":
  main()
