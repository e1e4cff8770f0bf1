"""Helpers of the serving tests: the service on loopback in a thread, request bodies from the
synthetic data, and a servable workdir (`fmx.serving.initialised`)."""

import ml_collections
import numpy as np

from fmx.configs import hypercast_ml1m


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
