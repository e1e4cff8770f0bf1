"""The ranking service job (`job="serve"`, fmx/configs/serve_ml1m.py): loads the newest FM and
expert versions, compiles every request shape, serves HTTP with uvicorn until SIGTERM or
Ctrl-C, and swaps newer versions in as they are published.

`workdir/address.json` ({"url", "pid"}) appears once the service is ready; `results.json`
(requests served, versions) when it stops.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import time

import ml_collections
import uvicorn

from fmx import files
from fmx.configs.common import ConfigError
from fmx.data import load as data_load
from fmx.data.items import item_table
from fmx.runtime import fm as fm_runtime
from fmx.serving.app import Service, create_app
from fmx.serving.expert_tier import ExpertTier
from fmx.serving.fm_tier import FMTier
from fmx.serving.versions import ExpertSource, FMSource, Registry, Served, VersionError
from fmx.train import reporting


def sources(s) -> tuple[str, str]:
  """(FM path, experts path) from `serve.hypercast` or `serve.fm` and `serve.experts`."""
  fm, experts = s.fm, s.experts
  if s.hypercast:
    fm = fm or os.path.join(s.hypercast, "snapshots")
    experts = experts or os.path.join(s.hypercast, "experts")
  if not fm or not experts:
    raise ConfigError("--config.serve.hypercast=DIR (a HyperCast workdir), or both "
                      "--config.serve.fm and --config.serve.experts, name what to serve")
  return fm, experts


def bearer_token(s) -> str | None:
  """The token from `serve.token_file` or $FMX_SERVE_TOKEN; required off loopback."""
  token = os.environ.get("FMX_SERVE_TOKEN", "").strip() or None
  if s.token_file:
    try:
      with open(s.token_file) as f:
        token = f.read().strip() or None
    except OSError as e:
      raise ConfigError(f"--config.serve.token_file={s.token_file}: unreadable ({e.strerror})") from None
  try:
    loopback = ipaddress.ip_address(s.host).is_loopback
  except ValueError:
    loopback = s.host == "localhost"
  if not loopback and token is None:
    raise ConfigError(f"--config.serve.host={s.host} is not loopback: set a bearer token with "
                      "--config.serve.token_file=FILE or $FMX_SERVE_TOKEN, or bind 127.0.0.1")
  return token


def check_bind(s) -> None:
  """Fails before anything loads if `serve.host:serve.port` cannot be bound (a port in use)."""
  if not s.port:
    return
  with socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET) as probe:
    try:
      probe.bind((s.host, s.port))
    except OSError as e:
      raise ConfigError(f"--config.serve.port={s.port}: cannot bind {s.host}:{s.port} "
                        f"({e.strerror}); pick a free port, or 0 for any") from None


def resolve_limits(s, fm_config) -> ml_collections.ConfigDict:
  """`s` with `max_history` and `history_buckets` resolved against the FM, checked."""
  s = ml_collections.ConfigDict(s.to_dict())
  if s.unknown_items not in ("reject", "oov"):
    raise ConfigError(f"--config.serve.unknown_items={s.unknown_items!r}: expected reject or oov")
  n = int(fm_config.input.max_history)
  if s.max_history > n:
    raise ConfigError(f"--config.serve.max_history={s.max_history}: the FM reads at most {n} events")
  s.max_history = s.max_history or n
  s.history_buckets = tuple(sorted({min(h, s.max_history) for h in s.history_buckets}))
  if max(s.history_buckets) < s.max_history:
    raise ConfigError(f"--config.serve.history_buckets={tuple(s.history_buckets)}: the largest "
                      f"must hold serve.max_history={s.max_history}")
  if max(s.batch_buckets) > s.max_batch:
    raise ConfigError(f"--config.serve.batch_buckets={tuple(s.batch_buckets)}: none may exceed "
                      f"serve.max_batch={s.max_batch}")
  return s


def build(c: ml_collections.ConfigDict):
  """(service, token, warm): the loaded versions and the tiers, not yet compiled."""
  s = c.serve
  token = bearer_token(s)
  check_bind(s)
  fm_path, experts_path = sources(s)
  data = data_load.load(c.input, "surfaces")
  fm_source = FMSource(fm_path, data)
  registry = Registry(fm_source, ExpertSource(experts_path, data, s.expert_slot),
                      on_new=lambda served: None, every=s.reload_seconds)
  registry.refresh()
  first = registry.current
  c = ml_collections.ConfigDict({**c.to_dict(), "serve": resolve_limits(s, first.fm.config).to_dict()})
  s = c.serve
  model, items = fm_runtime.build(first.fm.config, data)
  fm_tier = FMTier(model, items, batch_buckets=s.batch_buckets,
                   history_buckets=s.history_buckets,
                   micro_batch=s.micro_batch, append_buckets=s.append_buckets,
                   cache_bytes=s.cache_bytes)
  vocab = next(iter(first.experts.values())).model.vocab_size
  expert_tier = ExpertTier(item_table(data, vocab), data.spec, batch_buckets=s.batch_buckets,
                           micro_batch=s.micro_batch, weights=dict(s.value_weights))
  service = Service(c, data, registry, fm_tier, expert_tier)

  def on_new(served: Served) -> None:  # runs in the reload thread, before the swap
    new_model, _ = fm_runtime.build(served.fm.config, data)
    if new_model != model:
      raise VersionError(f"FM v{served.fm.version} has another architecture than the served "
                         "one; restart the service to serve it")
    expert_tier.warm(served.fm, served.experts)  # compiles only experts of a new shape
    service.publish_versions(served)

  def warm() -> None:
    fm_tier.warm(first.fm.params)
    expert_tier.warm(first.fm, first.experts)
    service.publish_versions(first)
    registry.on_new = on_new
    registry.start()

  return service, token, warm


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c, t0 = config, time.time()
  service, token, warm = build(c)
  guarded, _ = create_app(service, token, warm)
  server = uvicorn.Server(uvicorn.Config(guarded, host=c.serve.host, port=c.serve.port,
                                         log_level="warning", timeout_graceful_shutdown=5))
  address = os.path.join(workdir, "address.json")
  if os.path.exists(address):
    os.remove(address)

  async def announce():
    while not (server.started and service.ready):
      await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    files.atomic_write(address, json.dumps({"url": f"http://{host}:{port}", "pid": os.getpid()}))
    print(f"fmx: serving on http://{host}:{port} (FM v{service.registry.current.fm.version})",
          flush=True)

  async def main():
    task = asyncio.get_running_loop().create_task(announce())
    await server.serve()
    task.cancel()

  try:
    asyncio.run(main())
  except KeyboardInterrupt:  # uvicorn shut down on SIGTERM/SIGINT, then re-raised the signal
    pass
  if os.path.exists(address):
    os.remove(address)
  cur = service.registry.current
  counts = {}
  for metric in service.metrics.requests.collect():
    for sample in metric.samples:
      if sample.name.endswith("_total"):
        key = f"requests/{sample.labels['code']}"
        counts[key] = counts.get(key, 0) + int(sample.value)
  results = {**counts, "fm_version": cur.fm.version,
             "expert_versions": {k: v.version for k, v in cur.experts.items()},
             "compilations": service.fm_tier.compilations() + service.expert_tier.compilations(),
             "wall_s": round(time.time() - t0, 2), "steps": 0, "config": c.to_dict()}
  reporting.write_results(workdir, results)
  return results
