"""Logical axis rules: the table a config builds, where each parameter lands, and the rules
that cannot apply (errors, never a silent replication)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from fmx.configs import retrieval as retrieval_configs
from fmx.models import axes
from fmx.train import sharding
from fmx.train.state import init_state, make_optimizer

MESH = AbstractMesh((2, 4), ("data", "model"))


def rules(**mesh):
  return sharding.logical_rules(ml_collections.ConfigDict(
      {"item_table": "rows", "fsdp": False, "rules": (), **mesh}))


@pytest.mark.parametrize("table, expected", [("rows", P("model", None)),
                                             ("columns", P(None, "model")),
                                             ("replicated", P(None, None))])
def test_item_table_choices(table, expected):
  got = sharding.spec((axes.VOCAB, axes.VOCAB_EMBED), (3712, 64), MESH, rules(item_table=table),
                      "items")
  assert got == expected


def test_fsdp_shards_dense_width_over_data_and_rules_override():
  r = rules(fsdp=True, rules=(("mlp", "model"),))
  assert sharding.spec((axes.EMBED, axes.MLP), (64, 200), MESH, r, "uvqk") == P("data", "model")
  assert sharding.spec((axes.TABLE,), (399,), MESH, r, "rab") == P(None)
  assert sharding.spec((), (3, 4, 5), MESH, r, "mha") == P()  # explicitly replicated


@pytest.mark.parametrize("mesh_config, names, shape, needle", [
    ({"item_table": "columns"}, (axes.VOCAB, axes.VOCAB_EMBED), (3712, 50),
     "axis 'vocab_embed' of size 50 cannot be split over ('model',) (4 devices)"),
    ({"rules": (("embed", "pipeline"),)}, (axes.EMBED, axes.MLP), (64, 64),
     "maps 'embed' to ['pipeline'], not an axis of the mesh"),
    ({}, ("heads", None), (4, 4), "logical axis 'heads' has no rule; add it to mesh.rules"),
    ({"rules": (("mlp", "model"), ("embed", "model"))}, (axes.EMBED, axes.MLP), (64, 64),
     "mesh axis ['model'] used twice"),
    ({}, (axes.EMBED,), (64, 64), "1 logical names ('embed',) for shape (64, 64)"),
    ({"item_table": "diagonal"}, (), (), "mesh.item_table='diagonal'"),
])
def test_rules_that_cannot_apply_are_errors(mesh_config, names, shape, needle):
  with pytest.raises(sharding.ShardingError) as e:
    sharding.spec(names, shape, MESH, rules(**mesh_config), "p")
  assert needle in str(e.value)


def test_every_parameter_of_every_model_has_names_and_moments_follow_them():
  """The retrieval models' train states: every array is named, and each AdamW moment is sharded
  as its parameter."""
  from fmx.models.embeddings import padded_vocab
  from fmx.train import retrieval
  mesh = sharding.make_mesh(1, 1)
  for encoder, variant in (("hstu", "base"), ("sasrec", "base")):
    c = retrieval_configs.get_config("ml-1m", encoder, variant)
    c.mesh.item_table = "columns"
    task = retrieval.RetrievalTask(c, retrieval.build_model(c.model, padded_vocab(3706)),
                                   make_optimizer(c.optimizer), 3706)
    boxed = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    sh = sharding.tree_shardings(boxed, mesh, sharding.logical_rules(c.mesh))
    assert sh.params["items"]["embedding"].spec == P(None, "model")
    mu = sh.opt_state[0].mu
    assert jax.tree.map(lambda s: s.spec, mu) == jax.tree.map(lambda s: s.spec, sh.params)


def test_a_parameter_without_names_is_an_error():
  tx = make_optimizer(retrieval_configs.get_config("ml-1m", "hstu", "base").optimizer)
  state = jax.eval_shape(lambda: init_state({"w": jnp.zeros((4, 2))}, tx))
  with pytest.raises(sharding.ShardingError, match=r"\.params\['w'\] \(4, 2\) has no logical axis"):
    sharding.tree_shardings(state, sharding.make_mesh(1, 1), rules())


def test_shards_sit_where_the_rules_say_on_simulated_devices():
  """On 8 simulated CPU devices (a 2x4 mesh), the initialised state's item table is split by
  rows over `model` (each device holding a quarter), its moments alike, dense kernels whole."""
  script = textwrap.dedent("""
      import jax
      from fmx.configs import retrieval as rc
      from fmx.models.embeddings import padded_vocab
      from fmx.train import retrieval, sharding
      from fmx.train.state import make_optimizer
      import flax.linen as nn
      c = rc.get_config("ml-1m", "hstu", "base")
      mesh = sharding.make_mesh(2, 4)
      vocab = padded_vocab(3706, 4)
      task = retrieval.RetrievalTask(c, retrieval.build_model(c.model, vocab),
                                     make_optimizer(c.optimizer), 3706)
      rules = sharding.logical_rules(c.mesh)
      sh = sharding.tree_shardings(jax.eval_shape(task.init, jax.random.PRNGKey(0)), mesh, rules)
      init = jax.jit(lambda r: nn.meta.unbox(task.init(r)), out_shardings=sh)
      state = init(jax.random.PRNGKey(0))
      table = state.params["items"]["embedding"]
      assert {s.data.shape for s in table.addressable_shards} == {(vocab // 4, 50)}, table.sharding
      mu = state.opt_state[0].mu["items"]["embedding"]
      assert mu.sharding.spec == table.sharding.spec == jax.sharding.PartitionSpec("model", None)
      kernel = state.params["encoder"]["layers_0"]["uvqk"]["kernel"]
      assert {s.data.shape for s in kernel.addressable_shards} == {kernel.shape}
      print("ok", len(jax.devices()))
      """)
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu",
                          "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert p.returncode == 0 and "ok 8" in p.stdout, p.stderr[-3000:]
