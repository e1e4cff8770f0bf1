"""Load test of the ranking service (fmx/serving) on loopback: latency and throughput by
concurrency, the gains of dynamic batching, M-FALCON and the history cache, the expert tier's
share of serving compute, and the service's peak memory.

  python experiments/bench/serving.py [--requests=200] [--workdir=DIR] [--out[=FILE]]
  python experiments/bench/serving.py --dataset=synthetic --requests=20   # smoke run, ~1 min

The servable HyperCast-style workdir (`fmx.serving.initialised`: FM v1 published as a snapshot,
an expert_stream checkpoint, follow=("newest",)) holds INITIALISED, NOT TRAINED weights: latency
does not depend on them. ML-1M: the FM of stream_fm.py:ml-1m (H=200; HyperCast's own is its runlocal variant, H=50)
and the experts of hypercast_ml1m.py; synthetic: both of hypercast_ml1m.py:synthetic (H=50).
The service is a subprocess (python -m fmx.main --config=fmx/configs/serve_ml1m.py): no shared
GIL, but client and service share the cores. Requests: a real user's last --history events
before their last 3, --candidates items of the first surface, request_time = last event + 60 s,
a distinct user_id each (a history-cache miss), sent back to back by one async worker per
concurrent request. M-FALCON is timed in this process, before any service runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import timeit

import httpx
import jax
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from fmx.configs import hypercast_ml1m, serve_ml1m, stream_fm
from fmx.data import load as data_load
from fmx.models.foundation import probabilities
from fmx.runtime import fm as fm_runtime
from fmx.runtime.mfalcon import history_inputs
from fmx.serving import initialised
from fmx.serving.fm_tier import FMRequest, FMTier
from fmx.serving.versions import FMSource

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCHING_CONCURRENCY = 16  # the load of the dynamic batching comparison
TABLES: list[str] = []


def table(title: str, header, rows) -> None:
  text = "\n".join([f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]) + "\n"
  print(text, flush=True)
  TABLES.append(text)


def pipeline_config(dataset: str):
  c = hypercast_ml1m.get_config("synthetic" if dataset == "synthetic" else "runlocal")
  if dataset != "synthetic":
    c.fm = stream_fm.get_config("ml-1m")  # base sizes, H=200
  c.experts.stream.follow = ("newest",)
  return c


def build_workdir(w: str, c, data) -> str:
  """FM v1 as a published snapshot and the experts' checkpoint (step 1), initialised weights."""
  if os.path.exists(f"{w}/snapshots/manifest.json") and os.path.isdir(f"{w}/experts/checkpoints"):
    return "reused"
  params = initialised.publish_fm(w, data, c.fm, 1, seed=0)
  vocab, dim = params["item"]["embedding"].shape
  initialised.save_experts(w, data, c.experts, 1, seed=1, fm_dim=dim, fm_vocab=vocab)
  return "built"


class Bodies:
  """Request bodies from real users' events (users with >= n + 3 events: 3 are kept to append)."""

  def __init__(self, data, n: int, m: int):
    self.data, self.n, self.m, self.rng, self.next = data, n, m, np.random.default_rng(0), 0
    self.users = self.rng.permutation(np.flatnonzero([len(x) >= n + 3 for x in data.item_ids]))
    self.pool = np.flatnonzero(data.item_surface == 0)[1:]  # the first surface (not padding)
    if not len(self.users) or len(self.pool) < m:
      sys.exit(f"serving: {len(self.users)} users with {n + 3} events, {len(self.pool)} items on "
               "the surface: lower --history or --candidates")

  def candidates(self) -> list:
    return [{"item": int(i)} for i in self.rng.choice(self.pool, self.m, replace=False)]

  def user(self) -> int:
    self.next += 1
    return self.users[(self.next - 1) % len(self.users)]

  def body(self, uid: str, u: int | None = None, n: int | None = None, extra: int = 0) -> dict:
    """User u's (default: the next user's) last n events before their last 3, plus `extra`."""
    u, d = self.user() if u is None else u, self.data
    end = len(d.item_ids[u]) - 3
    sl = slice(end - (n or self.n), end + extra)
    hist = [{"item": int(i), "time": int(t), "action": int(a)}
            for i, t, a in zip(d.item_ids[u][sl], d.timestamps[u][sl], d.actions[u][sl])]
    return {"user_id": uid, "history": hist, "candidates": self.candidates(),
            "request_time": hist[-1]["time"] + 60}


def median_ms(fn, reps: int) -> float:
  fn()  # compiles, if not yet
  times = timeit.repeat(lambda: jax.block_until_ready(fn()), number=1, repeat=reps)
  return float(np.median(times)) * 1e3


def mfalcon_gain(fm, data, body: dict, micro_batch: int, reps: int) -> None:
  """FMTier.run on one request vs the full forward of one [history, candidate] per candidate."""
  model, items = fm_runtime.build(fm.config, data)
  ids, acts, ts = (np.array([e[k] for e in body["history"]]) for k in ("item", "action", "time"))
  cands = np.array([c["item"] for c in body["candidates"]], np.int32)
  n, m, rt = len(ids), len(cands), body["request_time"]
  events = {"ids": ids, "surfaces": data.item_surface[ids], "actions": acts, "timestamps": ts}
  req = FMRequest(None, events, rt, cands, np.zeros(m, np.int32))
  tier = FMTier(model, items, batch_buckets=(1,), history_buckets=(n,), micro_batch=micro_batch,
                append_buckets=(), cache_bytes=0)
  tier.warm(fm.params)
  hist = history_inputs(*events.values(), rt, n)
  new = {"ids": cands, "surfaces": req.cand_surfaces, "actions": 0, "timestamps": rt,
         "query_times": rt}  # the candidate: no action, at the request time
  tokens = {k: np.concatenate([np.repeat(hist[k], m, 0),
                               np.broadcast_to(np.reshape(v, (-1, 1)), (m, 1))], 1)
            for k, v in new.items()}
  tokens.update(positions=np.tile(np.arange(n + 1, dtype=np.int32), (m, 1)),
                lengths=np.full(m, n + 1, np.int32), num_targets=np.ones(m, np.int32),
                cand_index=np.full((m, 1), n, np.int32), request_time=np.full(m, rt),
                user=np.zeros(m, np.int32))
  full = jax.jit(lambda p, t: (lambda tae, logits: (tae, probabilities(logits)))(
      *model.apply({"params": p}, t, items)))
  fast = lambda: tier.run(fm.params, 1, [req])[0].tae
  slow = lambda: np.asarray(full(fm.params, tokens)[0])[:, 0]
  t_fast, t_slow = median_ms(fast, reps), median_ms(slow, reps)
  table(f"FM tier per request, in-process ({n} events, {m} candidates; median of {reps})",
        ["path", "ms / request", "vs M-FALCON"],
        [[f"M-FALCON: FMTier.run (history once, candidates in micro-batches of {micro_batch})",
          f"{t_fast:.1f}", "1.0x"],
         [f"one sequence per candidate: full forward on {m} x [{n} + 1] tokens, one jitted batch",
          f"{t_slow:.1f}", f"{t_slow / t_fast:.1f}x"],
         [f"(max TAE difference between the two: {np.abs(fast() - slow()).max():.1e})", "", ""]])


@contextlib.contextmanager
def serving(w: str, dataset: str, surface: str, tag: str, overrides=()):
  """The service of workdir `w` as a subprocess: yields its address.json ({url, pid}) once it is
  ready, plus `rank` (the endpoint of `surface`), and stops it with SIGTERM."""
  d = f"{w}/serve_{tag}"
  os.makedirs(d, exist_ok=True)
  with contextlib.suppress(FileNotFoundError):
    os.remove(f"{d}/address.json")  # a stale one (the service leaves it behind)
  cmd = [sys.executable, "-m", "fmx.main", "--config=fmx/configs/serve_ml1m.py"
         + (":synthetic" if dataset == "synthetic" else ""), f"--workdir={d}",
         f"--config.serve.hypercast={w}", "--config.serve.port=0", *overrides]
  t0 = time.time()
  with open(f"{d}/serve.log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  try:
    while not os.path.exists(f"{d}/address.json"):
      if proc.poll() is not None or time.time() - t0 > 900:
        sys.exit(f"serving: service {tag} did not start (exit {proc.poll()}):\n"
                 + open(f"{d}/serve.log").read()[-2000:])
      time.sleep(0.5)
    info = json.load(open(f"{d}/address.json"))
    print(f"service {tag}: ready after {time.time() - t0:.0f}s at {info['url']}, pid {info['pid']}")
    yield {**info, "rank": f"{info['url']}/v1/surfaces/{surface}/rank"}
  finally:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(60)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    print(f"service {tag}: stopped, exit status {proc.returncode}\n", flush=True)


async def send(rank: str, bodies: list[dict], concurrency: int, max_seconds: float):
  """([(latency s, response)], wall s): `concurrency` workers sending back to back."""
  todo, out = iter([json.dumps(b).encode() for b in bodies]), []
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  async with httpx.AsyncClient(timeout=60, limits=limits) as client:
    deadline = time.perf_counter() + max_seconds

    async def worker():
      for content in todo:
        if time.perf_counter() > deadline:
          return
        t = time.perf_counter()
        r = await client.post(rank, content=content, headers={"content-type": "application/json"})
        out.append((time.perf_counter() - t, r))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, time.perf_counter() - t0


def metrics(info: dict) -> collections.Counter:
  text = httpx.get(f"{info['url']}/metrics").text
  return collections.Counter({(s.name, s.labels.get("tier", "")): s.value
                              for f in text_string_to_metric_families(text) for s in f.samples})


def run_level(info: dict, bodies: list[dict], concurrency: int, max_seconds: float):
  """(row: ok, errors, p50/p95/p99 ms, req/s, mean FM and expert batch; /metrics deltas)."""
  before = metrics(info)
  out, wall = asyncio.run(send(info["rank"], bodies, concurrency, max_seconds))
  delta = metrics(info)
  delta.subtract(before)
  ok = np.array([t for t, r in out if r.status_code == 200]) * 1e3
  for r in [r for _, r in out if r.status_code != 200][:1]:
    print(f"serving: the service answered {r.status_code}: {r.text[:500]}")
  errors = dict(collections.Counter(r.status_code for _, r in out if r.status_code != 200)) or 0
  batch = lambda t: f"{delta['fmx_batch_size_sum', t] / max(delta['fmx_batch_size_count', t], 1):.1f}"
  p = np.percentile(ok, [50, 95, 99]) if len(ok) else [np.nan] * 3
  return [len(ok), errors, *(f"{x:.1f}" for x in p), f"{len(ok) / wall:.1f}", batch("fm"),
          batch("expert")], delta


def memory_row(name: str, info: dict) -> list:
  status = dict(l.split(":", 1) for l in open(f"/proc/{info['pid']}/status"))
  return [name, *(f"{int(status[k].split()[0]) / 1024:.0f}" for k in ("VmHWM", "VmRSS")),
          f"{metrics(info)['fmx_history_cache_bytes', ''] / 2**20:.1f}"]


def cache_followups(info: dict, bodies: Bodies, users: int, max_seconds: float) -> None:
  """Per user at concurrency 1: a first request, the same history and time with new candidates,
  then 3 more events and a later request_time; latency by the service's `history_cache`."""
  seq, n = [], bodies.n - 3
  for i in range(users):
    u = bodies.user()
    first = bodies.body(f"cache-{i}", u, n)
    seq += [("first request", first),
            ("same history, new candidates", {**first, "candidates": bodies.candidates()}),
            ("3 events appended, later request_time", bodies.body(f"cache-{i}", u, n, 3))]
  out, _ = asyncio.run(send(info["rank"], [b for _, b in seq], 1, max_seconds))
  by = collections.defaultdict(list)
  for (intent, _), (t, r) in zip(seq, out):
    by[intent, r.json()["history_cache"] if r.status_code == 200 else r.status_code].append(t * 1e3)
  table(f"History cache on follow-ups (concurrency 1, {users} users, {n} + 3 events)",
        ["request", "history_cache", "n", "p50 ms", "mean ms"],
        [[*k, len(v), f"{np.median(v):.1f}", f"{np.mean(v):.1f}"] for k, v in by.items()])


def bench(args, w: str) -> None:
  c, served = pipeline_config(args.dataset), serve_ml1m.get_config(args.dataset)
  data, s = data_load.load(served.input, "surfaces"), served.serve  # the service's data
  how = build_workdir(w, c, data)
  fm = FMSource(f"{w}/snapshots", data).load(1)
  bodies = Bodies(data, min(args.history, int(fm.config.input.max_history)), args.candidates)
  m, e = fm.config.model, c.experts
  cpu = next((l.split(":")[1].strip() for l in open("/proc/cpuinfo") if "model name" in l), "?")
  table("Machine and config", ["", ""], [
      ["machine", f"{os.cpu_count()} cores, {cpu}, jax {jax.__version__} ({jax.default_backend()})"],
      ["workdir", f"{w} ({how}); weights INITIALISED, NOT TRAINED (latency does not depend on them)"],
      ["FM", f"d={m.dim}, {m.num_layers} layers, {m.num_heads} heads, at most "
             f"{fm.config.input.max_history} events (history_buckets are cut to it), "
             f"{sum(x.size for x in jax.tree.leaves(fm.params)):,} params"],
      ["experts", f"d={e.model.dim}, {e.model.num_layers} layer, short_len {e.input.short_len}"],
      ["requests", f"{args.dataset}: {bodies.n} events, {args.candidates} candidates of "
                   f"{data.spec.surfaces[0]}, {args.requests} per level (at most "
                   f"{args.max_seconds:.0f} s)"],
      ["serve", ", ".join(f"{k} {s[k]}" for k in ("max_batch", "max_wait_ms", "batch_buckets",
                          "history_buckets", "micro_batch", "cache_bytes"))]])
  mfalcon_gain(fm, data, bodies.body("mfalcon"), s.micro_batch, args.reps)
  del fm
  levels, k = [int(x) for x in args.concurrency.split(",")], BATCHING_CONCURRENCY
  load = {x: [bodies.body(f"c{x}-{i}") for i in range(args.requests)] for x in {*levels, k}}
  header = ["ok", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s", "mean FM batch",
            "mean expert batch"]
  rows, cost, memory = {}, collections.Counter(), []
  with serving(w, args.dataset, data.spec.surfaces[0], "batched") as info:
    run_level(info, [bodies.body(f"warm-{i}") for i in range(8)], 4, args.max_seconds)
    for x in levels:
      rows[x], delta = run_level(info, load[x], x, args.max_seconds)
      cost.update({key: v for key, v in delta.items() if key[0].endswith("_seconds_sum")})
    table("Latency and throughput by concurrency (dynamic batching; each request a cache miss)",
          ["concurrency", *header], [[x, *r] for x, r in rows.items()])
    share = lambda name: cost[name, "expert"] / max(cost[name, "fm"] + cost[name, "expert"], 1e-9)
    table("Expert tier's share of serving cost (summed over the concurrency runs, /metrics)",
          ["measure", "FM tier s", "expert tier s", "expert share"],
          [[what, f"{cost[name, 'fm']:.2f}", f"{cost[name, 'expert']:.2f}", f"{share(name):.1%}"]
           for what, name in (("compute per batch (fmx_batch_seconds)", "fmx_batch_seconds_sum"),
                              ("queue + compute (fmx_latency_seconds)", "fmx_latency_seconds_sum"))])
    cache_followups(info, bodies, args.cache_users, args.max_seconds)
    memory.append(memory_row("dynamic batching (default)", info))
  with serving(w, args.dataset, data.spec.surfaces[0], "unbatched",
               ["--config.serve.max_batch=1", "--config.serve.batch_buckets=(1,)"]) as info:
    run_level(info, [bodies.body(f"warm1-{i}") for i in range(8)], 4, args.max_seconds)
    single, _ = run_level(info, load[k], k, args.max_seconds)
    memory.append(memory_row("max_batch=1", info))
  ratio = lambda i: f"{float(rows[k][i]) / float(single[i]):.2f}x" if k in rows else ""
  table(f"Dynamic batching vs one request at a time (concurrency {k}, the same requests)",
        ["service", *header],
        [["dynamic batching (default)", *rows.get(k, [""] * 8)],
         ["max_batch=1, batch_buckets=(1,)", *single],
         ["batched / one at a time", "", "", "", "", ratio(4), ratio(5), "", ""]])
  table("Service memory (/proc/<pid>/status, read before stopping it)",
        ["service", "peak RSS MB (VmHWM)", "RSS MB at the end", "history cache MB (/metrics)"],
        memory)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="ml-1m", choices=("ml-1m", "synthetic"))
  p.add_argument("--workdir", default="", help="a servable workdir to reuse (built if missing)")
  p.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
  p.add_argument("--concurrency", default="1,4,16,64")
  p.add_argument("--history", type=int, default=200, help="events per request (at most the FM's)")
  p.add_argument("--candidates", type=int, default=256)
  p.add_argument("--cache-users", type=int, default=20)
  p.add_argument("--reps", type=int, default=5, help="timed calls per M-FALCON path")
  p.add_argument("--max-seconds", type=float, default=120, help="time cap per load run")
  p.add_argument("--out", nargs="?", const="experiments/results/serving.md",
                 help="also write the tables to this file (bare: experiments/results/serving.md)")
  args = p.parse_args()
  if args.workdir:
    bench(args, os.path.abspath(args.workdir))
  else:
    with tempfile.TemporaryDirectory(prefix="fmx_serving_bench_") as w:
      bench(args, w)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      command = " ".join(["python experiments/bench/serving.py", *sys.argv[1:]])
      f.write(f"## Serving load test\n\n`{command}`\n\n" + "\n".join(TABLES))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
