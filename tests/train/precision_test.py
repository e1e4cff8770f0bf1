"""bfloat16 compute with float32 master weights: the model's matmuls run in bfloat16, the
loss, the gradients, the optimizer moments and the parameters stay float32, and the loss is
the float32 loss within bfloat16's precision."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from fmx.configs import common, retrieval as retrieval_configs
from fmx.data import sequences as seqlib, synthetic
from fmx.models.embeddings import padded_vocab
from fmx.train import retrieval
from fmx.train.state import make_optimizer


def task_and_batch(dtype):
  c = retrieval_configs.get_config("synthetic", "hstu", "runlocal")
  c.model.compute_dtype = dtype
  data = synthetic.generate(num_users=32, num_items=90)
  task = retrieval.RetrievalTask(c, retrieval.build_model(c.model, padded_vocab(90)),
                                 make_optimizer(c.optimizer), 90)
  ds, _ = seqlib.train_batches(data, "official", c.input.max_len, 16, 0, 1)
  return task, ds[0]


def dot_dtypes(jaxpr) -> set:
  """The operand dtypes of every matmul in `jaxpr` and its sub-jaxprs."""
  out = {str(e.invars[0].aval.dtype) for e in jaxpr.eqns if e.primitive.name == "dot_general"}
  for sub in jax.extend.core.subjaxprs(jaxpr):
    out |= dot_dtypes(sub)
  return out


def test_bfloat16_compute_keeps_float32_master_weights():
  steps = {}
  for dtype in ("float32", "bfloat16"):
    task, batch = task_and_batch(dtype)
    state = jax.tree.map(lambda x: getattr(x, "value", x), task.init(jax.random.PRNGKey(0)),
                         is_leaf=lambda x: hasattr(x, "names"))
    rng = jax.random.PRNGKey(1)
    matmuls = dot_dtypes(jax.make_jaxpr(task.train_step)(state, batch, rng).jaxpr)
    new, scalars = jax.jit(task.train_step)(state, batch, rng)
    steps[dtype] = (matmuls, new, scalars)
  matmuls, new, scalars = steps["bfloat16"]
  assert "bfloat16" in matmuls and steps["float32"][0] == {"float32"}
  assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(new.opt_state) if x.ndim} == {jnp.dtype("float32")}
  assert scalars["loss"].dtype == jnp.float32
  np.testing.assert_allclose(scalars["loss"], steps["float32"][2]["loss"], rtol=2e-2)
  assert np.isfinite(float(scalars["grad_norm"]))


def test_an_unknown_compute_dtype_is_a_config_error():
  c = retrieval_configs.get_config("synthetic", "hstu", "runlocal")
  c.model.compute_dtype = "float16"
  with pytest.raises(common.ConfigError, match="expected 'float32' or 'bfloat16'"):
    common.check(c)
