"""The ranking service on loopback: scores equal the offline models', the history cache reuses
and appends without changing a score, nothing compiles after warm-up, bad input gets a 4xx
that names the field, schemathesis finds no 5xx or schema violation, overload gets 503 with a
bounded queue, and a hot reload under concurrent load fails no request."""

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import pytest

from servable import Running, rank_body, serve_config
from fmx.data.items import item_table
from fmx.models.foundation import probabilities
from fmx.runtime.mfalcon import MFalcon, history_inputs
from fmx.runtime import fm as fm_runtime
from fmx.serving.initialised import publish_fm, save_experts


@pytest.fixture(scope="module")
def running(served_workdir):
  root = served_workdir[0]
  with Running(serve_config(root)) as r:
    yield r


def offline(served_workdir, running, body, surface="s0"):
  """(expert per-task probabilities, FM probabilities, value scores) of `body` computed without
  the service: MFalcon on the FM params, then the expert on its checkpoint's params."""
  root, c, data, fm_params, ex_params = served_workdir
  spec = data.spec
  model, items = fm_runtime.build(c.fm, data)
  ev = running.service.registry.current.experts[surface]
  h = body["history"]
  ids, ts = np.array([e["item"] for e in h]), np.array([e["time"] for e in h])
  acts, surf = np.array([e["action"] for e in h]), data.item_surface[ids]
  rt = body["request_time"]
  hist = history_inputs(ids, surf, acts, ts, rt, int(c.fm.input.max_history))
  s = spec.surfaces.index(surface)
  cands = np.array([x["item"] for x in body["candidates"]], np.int32)
  cand = {"ids": cands, "surfaces": np.full(len(cands), s, np.int32)}
  mf = MFalcon(model, items, micro_batch=32)
  tae = mf.target_aware_embeddings(fm_params, hist, cand)
  fm_probs = mf.predict(fm_params, hist, cand)
  ue = mf.user_embedding(fm_params, hist)
  mine = surf == s
  k = min(int(mine.sum()), ev.short_len)
  pad = lambda a: np.pad(a[mine][len(a[mine]) - k:], (0, ev.short_len - k))[None].repeat(len(cands), 0)
  rows = {"ids": pad(ids).astype(np.int32), "actions": pad(acts).astype(np.int32),
          "timestamps": pad(ts).astype(np.int32), "lengths": np.full(len(cands), k, np.int32),
          "cand": cands, "request_time": np.full(len(cands), rt, np.int32), "tae": tae,
          "ue": np.repeat(ue[None], len(cands), 0)}
  ex_items = item_table(data, ev.model.vocab_size)
  logits = ev.model.apply({"params": ex_params[surface]["follow_0"]}, rows, ex_items,
                          fm_table=fm_params["item"]["embedding"])
  probs = np.asarray(probabilities(logits))
  weights = running.service.expert_tier.weights[surface]
  return probs, fm_probs, probs @ weights


def post(url, body, surface="s0", **kw):
  return httpx.post(f"{url}/v1/surfaces/{surface}/rank", json=body, timeout=30, **kw)


def check_against_offline(served_workdir, running, body, out):
  probs, fm_probs, scores = offline(served_workdir, running, body)
  spec = served_workdir[2].spec
  by_item = {x["item"]: x for x in out["candidates"]}
  tasks = running.service.expert_tier.tasks["s0"]
  for i, cand in enumerate(body["candidates"]):
    got = by_item[cand["item"]]
    np.testing.assert_allclose([got["tasks"][t] for t in tasks], probs[i], atol=1e-5)
    np.testing.assert_allclose(got["score"], scores[i], atol=1e-5)
    for t, p in got["fm_tasks"].items():
      np.testing.assert_allclose(p, fm_probs[i, spec.tasks.index(t)], atol=1e-5)
  np.testing.assert_allclose([x["score"] for x in out["candidates"]], np.sort(scores)[::-1],
                             atol=1e-5)  # sorted, best first


def test_scores_equal_offline_and_the_cache_changes_nothing(served_workdir, running):
  data = served_workdir[2]
  compiled = running.service.fm_tier.compilations() + running.service.expert_tier.compilations()
  body = rank_body(data, n_hist=20, n_cand=40, seed=3, user="alice")
  first = post(running.url, body).json()
  assert first["history_cache"] == "miss" and first["fm_version"] == 1 and first["expert_version"] == 10
  check_against_offline(served_workdir, running, body, first)
  body["candidates"] = rank_body(data, n_cand=70, seed=4)["candidates"]  # new candidates: a hit
  again = post(running.url, body).json()
  assert again["history_cache"] == "hit"
  check_against_offline(served_workdir, running, body, again)
  t = body["request_time"]
  body["history"] += [{"item": 7 + k, "time": t - 50 + 10 * k, "action": 1 + k % 3} for k in range(3)]
  body["request_time"] = t + 1  # a later request: rows whose age bucket moved recompute too
  appended = post(running.url, body).json()
  assert appended["history_cache"] == "append"
  check_against_offline(served_workdir, running, body, appended)
  long = rank_body(data, n_hist=45, n_cand=3, seed=5)  # another history bucket, no user: no cache
  out = post(running.url, long).json()
  assert out["history_cache"] == "off"
  check_against_offline(served_workdir, running, long, out)
  assert post(running.url, {**body, "top_k": 5}).json()["candidates"] == appended["candidates"][:5]
  assert (running.service.fm_tier.compilations() + running.service.expert_tier.compilations()
          == compiled), "a request compiled a new shape after warm-up"


def test_concurrent_requests_are_batched_and_equal_single_ones(served_workdir, running):
  data = served_workdir[2]
  bodies = [rank_body(data, n_hist=5 + 3 * i, n_cand=10 + i, seed=10 + i) for i in range(12)]
  alone = [post(running.url, b).json() for b in bodies]

  async def burst():
    async with httpx.AsyncClient(timeout=30) as client:
      return await asyncio.gather(*(client.post(f"{running.url}/v1/surfaces/s0/rank", json=b)
                                    for b in bodies))
  together = [r.json() for r in asyncio.run(burst())]
  for a, b in zip(alone, together):
    np.testing.assert_allclose([x["score"] for x in a["candidates"]],
                               [x["score"] for x in b["candidates"]], atol=1e-5)
  metrics = httpx.get(f"{running.url}/metrics").text
  sizes = [l for l in metrics.splitlines() if l.startswith('fmx_batch_size_sum{tier="fm"}')]
  counts = [l for l in metrics.splitlines() if l.startswith('fmx_batch_size_count{tier="fm"}')]
  assert float(sizes[0].split()[-1]) > float(counts[0].split()[-1])  # some batch held > 1 request


BAD = [  # (what, body or raw text, expected status, a word the message must hold)
    ("malformed json", '{"history": [', 422, "json"),
    ("empty history", {"history": []}, 422, "history"),
    ("unknown item", {"history": [{"item": 10**6}]}, 422, "item"),
    ("negative item", {"candidates": [{"item": -3}]}, 422, "item"),
    ("too many candidates", {"candidates": [{"item": 1}] * 257}, 422, "candidates"),
    ("future event", {"history": [{"time": 2**31 - 2}]}, 422, "time"),
    ("future request", {"request_time": 2**31 - 2}, 422, "request_time"),
    ("out of order", {"history": [{"time": 1_500_000_000}, {"time": 1_400_000_000}]}, 422, "oldest first"),
    ("nan feature", '{"content": [NaN, 0.0]}', 422, "content"),
    ("infinite feature", '{"content": [Infinity, 0.0]}', 422, "content"),
    ("wrong feature size", {"candidates": [{"item": 1, "content": [0.5]}]}, 422, "content"),
    ("bad action", {"history": [{"action": 9}]}, 422, "action"),
    ("unknown field", {"extra": 1}, 422, "extra"),
    ("unknown event surface", {"history": [{"surface": "nope"}]}, 422, "surface"),
]


def _bad_body(data, spec, dim):
  base = rank_body(data, n_hist=3, n_cand=2, seed=1)
  if isinstance(spec, str):
    if spec.startswith('{"content"'):  # a candidate with non-finite features, as raw JSON
      values = spec[len('{"content": ['):-2]
      cand = '{"item": %d, "content": [%s%s]}' % (base["candidates"][0]["item"], values,
                                                   ", 0.0" * (dim - 2))
      body = json.dumps({**base, "candidates": []})
      return body.replace('"candidates": []', f'"candidates": [{cand}]')
    return spec
  body = json.loads(json.dumps(base))
  for key, value in spec.items():
    if key in ("history", "candidates") and value and isinstance(value[0], dict):
      body[key] = [{**body[key][0], **v} for v in value] if value else []
    else:
      body[key] = value
  return json.dumps(body)


@pytest.mark.parametrize("what,spec,status,word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_naming_the_field(served_workdir, running, what, spec, status, word):
  data = served_workdir[2]
  dim = data.item_content.shape[1]
  r = httpx.post(f"{running.url}/v1/surfaces/s0/rank", content=_bad_body(data, spec, dim),
                 headers={"content-type": "application/json"}, timeout=30)
  assert r.status_code == status, (what, r.status_code, r.text[:500])
  assert word in r.text.lower(), (what, r.text[:500])


def test_unknown_surface_oversized_body_and_oov_items(served_workdir, running):
  data = served_workdir[2]
  body = rank_body(data, n_hist=3, n_cand=2)
  r = post(running.url, body, surface="nowhere")
  assert r.status_code == 422 and "surface" in r.text
  big = httpx.post(f"{running.url}/v1/surfaces/s0/rank", content=b"x" * (2 << 20), timeout=30)
  assert big.status_code == 413 and "bytes" in big.json()["detail"]
  s = running.service.s
  s.unknown_items = "oov"
  try:
    body["candidates"].append({"item": 10**6})
    out = post(running.url, body)
  finally:
    s.unknown_items = "reject"
  assert out.status_code == 200 and len(out.json()["candidates"]) == 3
  assert httpx.get(f"{running.url}/readyz").json()["status"] == "ready"
  assert httpx.get(f"{running.url}/docs").status_code == 200


def test_schemathesis_finds_no_server_error_or_schema_violation(running, tmp_path):
  """Every check but `positive_data_acceptance`: a request can be schema-valid and still be
  refused with a 422 for what JSON Schema cannot say (an item id the served table lacks, events
  out of time order or in the future)."""
  p = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{running.url}/openapi.json",
                      "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                      "--max-examples", "40", "--seed", "1",
                      "--request-timeout", "20", "--no-color",
                      "--generation-database", "none",
                      "--suppress-health-check", "all"],
                     capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_overload_gets_503_and_the_queue_stays_bounded(served_workdir, running):
  data = served_workdir[2]
  fm = running.service.fm_batcher
  old = fm.max_queue, fm.max_batch
  fm.max_queue, fm.max_batch = 3, 1
  depth, stop = [], threading.Event()

  def watch():
    while not stop.is_set():
      depth.append(fm.depth)
      time.sleep(0.001)

  async def burst():
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
      bodies = [rank_body(data, n_hist=40, n_cand=200, seed=i) for i in range(60)]
      return await asyncio.gather(*(client.post(f"{running.url}/v1/surfaces/s1/rank", json=b)
                                    for b in bodies))
  watcher = threading.Thread(target=watch)
  watcher.start()
  try:
    responses = asyncio.run(burst())
  finally:
    stop.set()
    watcher.join()
    fm.max_queue, fm.max_batch = old
  codes = [r.status_code for r in responses]
  assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
  rejected = [r for r in responses if r.status_code == 503]
  assert all(r.headers["retry-after"] == "1" and "capacity" in r.json()["detail"] for r in rejected)
  assert max(depth) <= 3 + 1  # the queue plus the batch being computed
  assert post(running.url, rank_body(data, n_hist=4, n_cand=4)).status_code == 200


def test_hot_reload_under_load_fails_no_request(served_workdir, running):
  """Last in this module: it publishes FM v2 and experts step 20 into the shared workdir."""
  root, c, data, fm_params, _ = served_workdir
  results, stop = [], threading.Event()

  async def load():
    async with httpx.AsyncClient(timeout=30) as client:
      async def worker(w):
        i = 0
        while not stop.is_set():
          body = rank_body(data, n_hist=8 + (i % 20), n_cand=16, seed=1000 * w + i, user=f"u{w}")
          r = await client.post(f"{running.url}/v1/surfaces/s2/rank", json=body)
          results.append((r.status_code, r.json() if r.status_code == 200 else r.text))
          i += 1
      await asyncio.gather(*(worker(w) for w in range(6)))
  loader = threading.Thread(target=lambda: asyncio.run(load()))
  loader.start()
  try:
    time.sleep(1.0)
    params = publish_fm(root, data, c.fm, 2, seed=5)
    table = np.asarray(params["item"]["embedding"])
    save_experts(root, data, c.experts, 20, seed=6, fm_dim=table.shape[1], fm_vocab=table.shape[0])
    deadline = time.time() + 60
    while time.time() < deadline:
      cur = running.service.registry.current
      if cur.fm.version == 2 and cur.experts["s2"].version == 20:
        break
      time.sleep(0.1)
    time.sleep(1.0)
  finally:
    stop.set()
    loader.join(60)
  bad = [r for r in results if r[0] != 200]
  assert not bad, bad[:3]
  versions = [(r[1]["fm_version"], r[1]["expert_version"]) for r in results]
  assert versions[0] == (1, 10) and versions[-1] == (2, 20), (versions[0], versions[-1])
  assert len(results) > 20
  ready = httpx.get(f"{running.url}/readyz").json()
  assert ready["fm_version"] == 2 and set(ready["expert_versions"].values()) == {20}
  cached = [r[1]["history_cache"] for r in results if r[1]["fm_version"] == 2]
  assert "miss" in cached  # the first request of a user after the swap: v1 encodings dropped
  assert jax.tree.leaves(fm_params)  # v1 params are still those of the fixture
