"""Helpers of the serving tests. A tiny servable HyperCast workdir on the synthetic surfaces: FM version 1 published as a
snapshot and the streaming experts' checkpoint, as the pipeline writes them (freshly initialised
weights: serving needs their shapes and versions, not their quality)."""

import json

import jax
import ml_collections
import numpy as np

from fmx.configs import hypercast_ml1m
from fmx.data import load as data_load
from fmx.hypercast import expert_stream
from fmx.hypercast.snapshots import Snapshots
from fmx.runtime import checkpoint, fm as fm_runtime
from fmx.train.loop import checkpoint_items
from fmx.train.state import init_state, make_optimizer


def plain(c) -> dict:
  return json.loads(json.dumps(c.to_dict()))


def publish_fm(root, data, c, version: int, seed: int):
  model, items = fm_runtime.build(c, data)
  params = fm_runtime.init_params(c, model, items, jax.random.PRNGKey(seed))
  Snapshots(str(root / "snapshots")).publish(version, params, {"config": plain(c), "fm_step": 0,
                                                                "dataset": data.name}, full=True)
  return params


def save_experts(root, data, c, step: int, seed: int, fm_dim: int, fm_vocab: int):
  follow = tuple(c.stream.follow)
  _, _, init = expert_stream.build_models(c, data, follow, fm_dim, fm_vocab)
  state = init_state(init(jax.random.PRNGKey(seed)), make_optimizer(c.optimizer))
  ckpt = checkpoint.Checkpointer(str(root / "experts" / "checkpoints"), max_to_keep=None)
  ckpt.save(step, checkpoint_items(state), {"config": plain(c), "position": {}})
  ckpt.close()
  return state.params


def serve_config(root, **overrides) -> ml_collections.ConfigDict:
  from fmx.configs import serve_ml1m
  c = serve_ml1m.get_config("synthetic,runlocal")
  c.input.synthetic = hypercast_ml1m.get_config("synthetic").fm.input.synthetic  # the fixture's data
  c.serve.hypercast = str(root)
  c.serve.port = 0
  c.serve.reload_seconds = 0.2
  for k, v in overrides.items():
    c.serve[k] = v
  return c


class Running:
  """The service of config `c` on loopback in a background thread (uvicorn on a free port)."""

  def __init__(self, c):
    import threading
    import uvicorn
    from fmx.serving import service, app
    self.service, token, warm = service.build(c)
    guarded, self.app = app.create_app(self.service, token, warm)
    self.server = uvicorn.Server(uvicorn.Config(guarded, host=c.serve.host, port=c.serve.port,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self):
    import time
    self.thread.start()
    deadline = time.time() + 300
    while not (self.server.started and self.service.ready):
      assert time.time() < deadline and self.thread.is_alive(), "the service did not start"
      time.sleep(0.05)
    host, port = self.server.servers[0].sockets[0].getsockname()[:2]
    self.url = f"http://{host}:{port}"
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(30)


def rank_body(data, n_hist=12, n_cand=20, seed=0, user=None, surface=0, request_time=None):
  """A valid request: a user's first events of the synthetic data, candidates of `surface`."""
  rng = np.random.default_rng(seed)
  u = int(rng.integers(data.num_users))
  ids, ts, acts = data.item_ids[u][:n_hist], data.timestamps[u][:n_hist], data.actions[u][:n_hist]
  pool = np.flatnonzero(data.item_surface == surface)
  cands = rng.choice(pool[pool > 0], n_cand, replace=False)
  body = {"history": [{"item": int(i), "time": int(t), "action": int(a)}
                      for i, t, a in zip(ids, ts, acts)],
          "candidates": [{"item": int(i)} for i in cands],
          "request_time": int(request_time if request_time is not None else ts[-1] + 60)}
  if user is not None:
    body["user_id"] = user
  return body
