"""The ranking service over HTTP (FastAPI): `POST /v1/surfaces/{surface}/rank`, `GET /healthz`,
`GET /readyz`, `GET /metrics` (Prometheus text), and the OpenAPI spec at `/openapi.json` with
its docs page at `/docs`.

A request runs through the online FM tier (TAEs and FM predictions) and then the expert tier
(per-task scores and the value model), each behind its own dynamic batcher. It is served by
the versions current when it arrived, even if newer ones are swapped in meanwhile.
"""


import asyncio
import contextlib
import hmac
import time

import numpy as np
import prometheus_client as prom
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from fmx.serving import schema
from fmx.serving.batching import Batcher, Overloaded
from fmx.serving.expert_tier import ExpertRequest, ExpertTier
from fmx.serving.fm_tier import FMRequest, FMTier
from fmx.serving.versions import Registry, Served

OPEN_PATHS = ("/healthz", "/readyz")


class Metrics:
  """The service's Prometheus metrics, in a registry of its own."""

  def __init__(self):
    r = self.registry = prom.CollectorRegistry()
    self.latency = prom.Histogram("fmx_latency_seconds", "Request latency per tier (queue + compute)",
                                  ["tier"], registry=r, buckets=(.001, .0025, .005, .01, .025,
                                                                 .05, .1, .25, .5, 1, 2.5, 5, 10))
    self.batch = prom.Histogram("fmx_batch_size", "Requests per batch", ["tier"], registry=r,
                                buckets=(1, 2, 4, 8, 16, 32, 64))
    self.batch_seconds = prom.Histogram("fmx_batch_seconds", "Compute time per batch", ["tier"],
                                        registry=r)
    self.queue = prom.Gauge("fmx_queue_depth", "Requests waiting or computing", ["tier"], registry=r)
    self.cache = prom.Counter("fmx_history_cache_total", "History cache lookups", ["result"],
                              registry=r)
    self.cache_bytes = prom.Gauge("fmx_history_cache_bytes", "History cache size", registry=r)
    self.rejected = prom.Counter("fmx_rejected_total", "Requests refused", ["reason"], registry=r)
    self.requests = prom.Counter("fmx_requests_total", "Ranking requests", ["surface", "code"],
                                 registry=r)
    self.version = prom.Gauge("fmx_loaded_version", "Served versions", ["component"], registry=r)
    self.compilations = prom.Gauge("fmx_jit_compilations", "Shapes compiled by the tiers", registry=r)

  def observe_batch(self, tier: str, size: int, waiting: int, seconds: float) -> None:
    self.batch.labels(tier).observe(size)
    self.batch_seconds.labels(tier).observe(seconds)
    self.queue.labels(tier).set(waiting)


class Service:
  """The tiers, their batchers and the served versions of one process."""

  def __init__(self, c, data, registry: Registry, fm_tier: FMTier, expert_tier: ExpertTier):
    s = c.serve
    self.s, self.data, self.spec = s, data, data.spec
    self.registry, self.fm_tier, self.expert_tier = registry, fm_tier, expert_tier
    self.metrics = Metrics()
    self.ready = False
    self.content = np.asarray(expert_tier.items["content"], np.float32)
    kw = dict(max_batch=s.max_batch, max_wait=s.max_wait_ms / 1000, max_queue=s.max_queue,
              observe=self.metrics.observe_batch)
    self.fm_batcher = Batcher("fm", lambda fm, reqs: fm_tier.run(fm.params, fm.version, reqs), **kw)
    self.expert_batcher = Batcher("expert", lambda sv, reqs: expert_tier.run(sv.fm, sv.experts, reqs),
                                  **kw)

  def publish_versions(self, served: Served) -> None:
    self.metrics.version.labels("fm").set(served.fm.version)
    for name, ev in served.experts.items():
      self.metrics.version.labels(f"expert/{name}").set(ev.version)
    self.metrics.compilations.set(self.fm_tier.compilations() + self.expert_tier.compilations())

  # ---- one ranking request --------------------------------------------------------------------

  def to_arrays(self, surface: str, body, now: float):
    """(FMRequest, the surface's short-term events, the candidates' content); raises
    RequestValidationError naming the field of any input the models cannot take."""
    errors = []
    err = lambda loc, msg: errors.append({"loc": ["body", *loc], "msg": msg, "type": "value_error"})
    limit = now + self.s.future_tolerance_seconds
    rt = body.request_time if body.request_time is not None else int(now)
    if rt > limit:
      err(["request_time"], f"{rt} is in the future (now is {int(now)})")
    n_items, oov = self.data.num_items, self.s.unknown_items == "oov"

    def item(i, loc):
      if 1 <= i <= n_items:
        return i
      if not oov:
        err(loc, f"unknown item id {i}: expected 1..{n_items}")
      return 0

    ids = np.array([item(e.item, ["history", k, "item"]) for k, e in enumerate(body.history)], np.int64)
    times = np.array([e.time for e in body.history], np.int64)
    for k, t in enumerate(times):
      if t > min(rt, limit):
        err(["history", k, "time"], f"{t} is after the request time {rt}")
      elif k and t < times[k - 1]:
        err(["history", k, "time"], f"{t} is before the previous event's {times[k - 1]}: send "
            "the history oldest first")
    surfaces = np.array([self.spec.surfaces.index(e.surface.value) if e.surface is not None
                         else self.data.item_surface[i] for e, i in zip(body.history, ids)], np.int64)
    cands = np.array([item(x.item, ["candidates", k, "item"]) for k, x in enumerate(body.candidates)],
                     np.int32)
    if errors:
      raise RequestValidationError(errors)
    events = {"ids": ids, "surfaces": surfaces,
              "actions": np.array([e.action for e in body.history], np.int64), "timestamps": times}
    s_idx = self.spec.surfaces.index(surface)
    fm_req = FMRequest(body.user_id, events, rt, cands, np.full(len(cands), s_idx, np.int32))
    mine = surfaces == s_idx
    short = {"ids": ids[mine], "actions": events["actions"][mine], "timestamps": times[mine]}
    content = self.content[cands].copy()
    for k, x in enumerate(body.candidates):
      if x.content is not None:
        content[k] = x.content
    return fm_req, short, content

  async def rank(self, surface: str, body) -> dict:
    served = self.registry.current
    fm_req, short, content = self.to_arrays(surface, body, time.time())
    t0 = time.perf_counter()
    fm_out = await self.fm_batcher.submit(served.fm, fm_req)
    t1 = time.perf_counter()
    self.metrics.latency.labels("fm").observe(t1 - t0)
    self.metrics.cache.labels(fm_out.cache).inc()
    self.metrics.cache_bytes.set(self.fm_tier.cache.bytes)
    probs, scores = await self.expert_batcher.submit(served, ExpertRequest(
        surface, short, fm_req.request_time, fm_req.cand_ids, content, fm_out.tae, fm_out.ue))
    self.metrics.latency.labels("expert").observe(time.perf_counter() - t1)
    tasks, fm_tasks = self.expert_tier.tasks[surface], self.spec.tasks
    s_idx = self.spec.surfaces.index(surface)
    order = np.argsort(-scores, kind="stable")[:body.top_k or None]
    fm_valid = [t for t in range(len(fm_tasks)) if self.spec.valid[s_idx, t] and self.spec.fm_tasks[t]]
    return {"surface": surface, "fm_version": served.fm.version,
            "expert_version": served.experts[surface].version, "request_time": fm_req.request_time,
            "history_cache": fm_out.cache,
            "candidates": [{"item": int(body.candidates[i].item), "score": float(scores[i]),
                            "tasks": {t: float(p) for t, p in zip(tasks, probs[i])},
                            "fm_tasks": {fm_tasks[t]: float(fm_out.probs[i, t]) for t in fm_valid}}
                           for i in order]}


def _error(status: int, detail: str, headers=None) -> JSONResponse:
  return JSONResponse({"detail": detail}, status, headers=headers)


class Guard:
  """ASGI middleware: the bearer token (when one is set) on every path but the health probes,
  and the request body cap (413)."""

  def __init__(self, app, token: str | None, max_body: int, metrics: Metrics):
    self.app, self.token, self.max_body, self.metrics = app, token, max_body, metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope.get("headers") or [])
    if self.token and scope["path"] not in OPEN_PATHS:
      given = headers.get(b"authorization", b"")
      if not hmac.compare_digest(given, b"Bearer " + self.token.encode()):
        self.metrics.rejected.labels("unauthorized").inc()
        return await _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                            {"WWW-Authenticate": "Bearer"})(scope, receive, send)
    length = headers.get(b"content-length")
    too_large = _error(413, f"request body over {self.max_body} bytes: send fewer events or "
                       "candidates")
    if length is not None and (not length.isdigit() or int(length) > self.max_body):
      self.metrics.rejected.labels("too_large").inc()
      return await too_large(scope, receive, send)
    if length is None and scope["method"] in ("POST", "PUT", "PATCH"):  # chunked: read it capped
      body, more = b"", True
      while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > self.max_body:
          self.metrics.rejected.labels("too_large").inc()
          return await too_large(scope, receive, send)
      sent = False

      async def replay():
        nonlocal sent
        if sent:
          return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await self.app(scope, replay, send)
    return await self.app(scope, receive, send)


def create_app(service: Service, token: str | None, warm) -> FastAPI:
  """The FastAPI app of `service`; `warm()` (run in a thread at start-up) loads and compiles."""
  s, m = service.s, service.metrics
  Surface, RankRequest = schema.request_models(  # pylint: disable=invalid-name
      service.spec.surfaces, max_history=s.max_history, max_candidates=s.max_candidates,
      content_dim=service.content.shape[1])

  @contextlib.asynccontextmanager
  async def lifespan(_):
    service.fm_batcher.start()
    service.expert_batcher.start()
    for name, b in (("fm", service.fm_batcher), ("expert", service.expert_batcher)):
      m.queue.labels(name).set_function(lambda b=b: b.depth)
    warming = asyncio.get_running_loop().run_in_executor(None, warm)
    warming.add_done_callback(lambda f: setattr(service, "ready", f.exception() is None))
    try:
      yield
    finally:
      service.registry.stop()
      await service.fm_batcher.stop()
      await service.expert_batcher.stop()

  app = FastAPI(title="fmx ranking service", version="1", lifespan=lifespan,
                description="The online FM tier (M-FALCON target-aware embeddings) and the "
                            "per-surface expert tier of the Foundation-Expert paradigm.")
  errors = {code: {"model": schema.Error, "description": why} for code, why in (
      (400, "the body is not JSON"), (401, "missing or wrong bearer token"), (413, "request body too large"),
      (503, "overloaded (see Retry-After) or not ready yet"), (504, "not answered in time"))}

  @app.post("/v1/surfaces/{surface}/rank", response_model=schema.Ranked, responses=errors)
  async def rank(surface: Surface, body: RankRequest):  # type: ignore[valid-type]
    name = surface.value
    if not service.ready:
      return _error(503, "warming up: retry shortly", {"Retry-After": str(s.retry_after_seconds)})
    try:
      out = await asyncio.wait_for(service.rank(name, body), s.timeout_seconds)
    except Overloaded as e:
      m.rejected.labels("overload").inc()
      m.requests.labels(name, "503").inc()
      return _error(503, f"the {e} tier is at capacity: retry after {s.retry_after_seconds}s",
                    {"Retry-After": str(s.retry_after_seconds)})
    except asyncio.TimeoutError:
      m.rejected.labels("timeout").inc()
      m.requests.labels(name, "504").inc()
      return _error(504, f"not answered within {s.timeout_seconds}s: retry, or send fewer candidates")
    except RequestValidationError:
      m.requests.labels(name, "422").inc()
      raise
    m.requests.labels(name, "200").inc()
    return JSONResponse(out)  # built to the schema already: no second validation of every row

  @app.exception_handler(RequestValidationError)
  async def invalid(_, exc: RequestValidationError):  # the field and why, never the input back
    m.rejected.labels("invalid").inc()
    return JSONResponse({"detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                                    for e in exc.errors()]}, 422)

  @app.get("/healthz", response_model=schema.Health, response_model_exclude_none=True)
  async def healthz():
    return {"status": "ok"}

  @app.get("/readyz", response_model=schema.Health, responses={503: {"model": schema.Health}})
  async def readyz():
    cur = service.registry.current
    if not service.ready or cur is None:
      return JSONResponse({"status": "warming up"}, 503)
    return {"status": "ready", "fm_version": cur.fm.version,
            "expert_versions": {k: v.version for k, v in cur.experts.items()}}

  @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
  async def metrics():
    return Response(prom.generate_latest(m.registry), media_type=prom.CONTENT_TYPE_LATEST)

  return Guard(app, token, s.max_body_bytes, m), app
