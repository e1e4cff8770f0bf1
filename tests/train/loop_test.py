"""The loop over a stream without epochs: it checkpoints its position with the state, so a
stream that grew while the run was away is resumed at the first unseen batch."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fmx.train import loop
from fmx.train.state import gradient_step, init_state


class GrowingStream:
  """Batches appended by a producer; the position is the offset of the next batch."""

  steps_per_epoch = None
  total_steps = None

  def __init__(self, batches):
    self.batches = batches

  def start(self):
    return {"offset": 0}

  def iterate(self, position):
    for i in range(position["offset"], len(self.batches)):
      yield self.batches[i], {"offset": i + 1}


def config():
  return ml_collections.ConfigDict(dict(
      seed=0, log_every_steps=1, checkpoint_every_steps=3, progress=False, resume_anyway=False,
      mesh=dict(data=-1, model=1, rules=()), evals=dict(every_epochs=1, every_steps=4, show=())))


def train(workdir, batches):
  tx = optax.sgd(0.1)
  loss = lambda p, b, rng: (jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2), {})
  mse = lambda p, b: float(jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2))
  state, final, report = loop.train_loop(
      config(), str(workdir), init=lambda rng: init_state({"w": nn.LogicallyPartitioned(jnp.zeros(4), ("embed",))}, tx),
      train_step=lambda s, b, rng: gradient_step(s, tx, loss, b, rng),
      source=GrowingStream(batches), evaluate=lambda p, epoch: {"mse": mse(p, batches[0])},
      select=None, desc="stream")
  report.close()
  return state, final


def test_a_grown_stream_resumes_at_the_first_unseen_batch(tmp_path):
  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=(8, 4)).astype(np.float32),
              "y": rng.normal(size=8).astype(np.float32)} for _ in range(11)]
  whole, final = train(tmp_path / "whole", batches)
  assert final["steps"] == 11 and int(whole.step) == 11
  train(tmp_path / "parts", batches[:7])  # the producer had written 7 batches
  parts, final = train(tmp_path / "parts", batches)  # ... and 4 more while the run was away
  assert final["steps"] == 11
  np.testing.assert_array_equal(np.asarray(parts.params["w"]), np.asarray(whole.params["w"]))
  rows = [int(line.split('"step": ')[1].split(",")[0])
          for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
  assert rows == [4, 7, 8, 11]  # every 4 steps and at the end of each sitting, none twice
