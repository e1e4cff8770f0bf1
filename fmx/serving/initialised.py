"""A servable HyperCast-style workdir with freshly initialised weights, laid out as the pipeline
writes it: FM versions published as snapshots (`DIR/snapshots`) and the streaming experts'
checkpoints (`DIR/experts/checkpoints`). For load tests and tests of the service, which need
the models' shapes and versions, not their quality."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax

from fmx.hypercast import expert_stream
from fmx.hypercast.snapshots import Snapshots
from fmx.runtime import checkpoint, fm as fm_runtime
from fmx.train.loop import checkpoint_items
from fmx.train.state import init_state, make_optimizer


def plain(c) -> dict:
  """A config as JSON-able values (what checkpoints and snapshots record)."""
  return json.loads(json.dumps(c.to_dict()))


def publish_fm(root: str, data, c, version: int, seed: int) -> dict:
  """Publishes FM `version` of FM config `c`, initialised from `seed`; returns its params."""
  model, items = fm_runtime.build(c, data)
  params = fm_runtime.init_params(c, model, items, jax.random.PRNGKey(seed))
  Snapshots(os.path.join(root, "snapshots")).publish(
      version, params, {"config": plain(c), "fm_step": 0, "dataset": data.name}, full=True)
  return params


def save_experts(root: str, data, c, step: int, seed: int, fm_dim: int, fm_vocab: int) -> dict:
  """Saves the experts of expert_stream config `c` at `step`, initialised; returns their params."""
  _, _, init = expert_stream.build_models(c, data, tuple(c.stream.follow), fm_dim, fm_vocab)
  state = nn.meta.unbox(init_state(init(jax.random.PRNGKey(seed)), make_optimizer(c.optimizer)))
  ckpt = checkpoint.Checkpointer(os.path.join(root, "experts", "checkpoints"), max_to_keep=None)
  ckpt.save(step, checkpoint_items(state), {"config": plain(c), "position": {}})
  ckpt.close()
  return state.params
