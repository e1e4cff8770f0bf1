"""The online ranking service: the online FM tier and the expert tier behind one HTTP API.

Run, pointed at a HyperCast workdir (python -m fmx.main --config=fmx/configs/hypercast_ml1m.py
--workdir=/tmp/hypercast):
  python -m fmx.main --config=fmx/configs/serve_ml1m.py --workdir=/tmp/serve \
      --config.serve.hypercast=/tmp/hypercast
or at an FM workdir (job=fm) and an expert workdir (job=expert, one expert per surface):
  ... --config.serve.fm=/tmp/ml1m_fm --config.serve.experts=/tmp/ml1m_expert
Variants: `ml-1m` (default) or `synthetic` (the seeded synthetic surfaces), and `runlocal`
(small shape buckets: a few seconds of warm-up). The service writes DIR/address.json (its URL)
once it is ready, and DIR/results.json when it stops (SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import ml_collections

from fmx.configs import common, foundation


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words = common.parse_variant(arg, ("ml-1m", "synthetic", "runlocal"), "ml-1m")
  dataset = "synthetic" if "synthetic" in words else "ml-1m"
  fm = foundation.get_config(dataset, "runlocal" if "runlocal" in words else None)
  c = ml_collections.ConfigDict()
  c.job = "serve"
  c.input = ml_collections.ConfigDict({k: fm.input[k] for k in (
      "dataset", "data_dir", "manual_dir", "fetch_wheel", "synthetic")})  # the item table's data

  s = c.serve = ml_collections.ConfigDict()
  s.hypercast = ""  # a HyperCast workdir: FM versions from DIR/snapshots, experts from DIR/experts
  s.fm = ""  # or: an FM snapshot directory, or an FM workdir (job=fm; its steps are versions)
  s.experts = ""  # or: an expert_stream workdir, or an expert workdir (job=expert, per surface)
  s.expert_slot = "follow_0"  # which expert of an expert_stream checkpoint serves (alone, follow_i)
  s.host = "127.0.0.1"  # another address needs a bearer token (token_file or $FMX_SERVE_TOKEN)
  s.port = 8080  # 0: any free port (DIR/address.json says which)
  s.token_file = ""  # a file holding the bearer token (else $FMX_SERVE_TOKEN)
  # request limits
  s.max_body_bytes = 1 << 20
  s.max_history = 0  # events per request; 0: the FM's input.max_history (its most)
  s.max_candidates = 512
  s.timeout_seconds = 5.0  # a request not answered by then gets 504
  s.future_tolerance_seconds = 300  # event or request times later than now + this are refused
  s.unknown_items = "reject"  # "reject" (422) | "oov" (mapped to the out-of-vocabulary row 0)
  # dynamic batching, per tier
  s.max_batch = 16  # requests per batch (per tier)
  s.max_wait_ms = 2.0  # how long a batch waits for more requests
  s.max_queue = 256  # requests waiting per tier; more get 503 with Retry-After
  s.retry_after_seconds = 1
  # shapes (jit compiles each once, at warm-up)
  s.batch_buckets = (1, 2, 4, 8, 16)  # FM batch sizes (a batch is padded up to one of these)
  s.history_buckets = (64, 128, 256)  # padded history lengths (cut to serve.max_history)
  s.micro_batch = 128  # candidates per M-FALCON micro-batch (both tiers)
  s.append_buckets = (16, 64)  # rows a cached history recomputes when events are appended
  s.cache_bytes = 256 << 20  # the history cache (LRU by bytes; 0 turns it off)
  s.reload_seconds = 2.0  # how often to look for new FM and expert versions
  # the value model: final score = sum of weight * task probability over the surface's tasks
  s.value_weights = {"like": 1.0, "love": 1.0, "watchable": 0.5, "dislike": -1.0}

  if dataset == "synthetic":
    s.value_weights = {"click": 1.0, "like": 1.0, "comment": 0.5}
  if "runlocal" in words:
    s.batch_buckets = (1, 4)
    s.history_buckets = (32, 128)
    s.micro_batch = 64
    s.append_buckets = (16,)
    s.max_candidates = 256
  return c
