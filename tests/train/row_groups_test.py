"""Row groups (`input.row_groups`): a batch's rows sorted by length in groups, each cut to its
own bucket, give the loss and gradients of the same batch ungrouped, with the same negatives."""

import jax
import numpy as np
import pytest

from fmx.configs import common, retrieval as retrieval_configs
from fmx.data import sequences as seqlib, synthetic
from fmx.models.embeddings import padded_vocab
from fmx.train import retrieval
from fmx.train.state import make_optimizer

BUCKETS = (8, 16, 24, 32, 40)


@pytest.mark.parametrize("negatives,groups,step,norm", [
    ("per_position", 2, 1, None),
    ("per_sequence", 4, 2, 100.0),  # 4 groups, empty rows, a fixed divisor (sorted batches')
])
def test_grouped_batch_equals_the_batch(negatives, groups, step, norm):
  c = retrieval_configs.get_config("synthetic", "hstu", "runlocal")
  c.model.dropout = c.model.input_dropout = 0.0
  c.loss.negatives = negatives
  data = synthetic.generate(num_users=40, num_items=90)
  task = retrieval.RetrievalTask(c, retrieval.build_model(c.model, padded_vocab(90)),
                                 make_optimizer(c.optimizer), 90, norm)
  params = jax.tree.map(lambda x: getattr(x, "value", x), task.init(jax.random.PRNGKey(0)),
                        is_leaf=lambda x: hasattr(x, "names")).params
  batch_of = lambda groups: seqlib.train_batches(data, "official", c.input.max_len, 16, 3, 1,
                                                 BUCKETS, 0, groups)[0][step]
  plain, grouped = batch_of(1), batch_of(groups)
  parts = seqlib.row_groups(grouped)
  assert len(parts) == groups
  assert sorted(np.concatenate([g["rows"] for g in parts])) == list(range(16))
  widths = [g["ids"].shape[1] for g in parts]
  assert widths == sorted(widths) and widths[0] < widths[-1] == plain["ids"].shape[1]
  for g in parts:
    np.testing.assert_array_equal(g["ids"], plain["ids"][g["rows"], :g["ids"].shape[1]])
  if step == 2:
    assert not parts[0]["lengths"].all()  # empty rows (the epoch's filler) sort first
  rng = jax.random.PRNGKey(5)
  value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: task.loss(p, b, rng)[0]))
  (want, want_grads), (got, got_grads) = value_and_grad(params, plain), value_and_grad(params, grouped)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_row_groups_must_divide_the_batch_and_have_buckets():
  c = retrieval_configs.get_config("synthetic", "hstu", "runlocal")
  c.input.batch_size, c.input.row_groups = 16, 3
  with pytest.raises(common.ConfigError, match="row_groups=3: expected a divisor of "
                                               "input.batch_size=16"):
    common.check(c)
  c.input.row_groups, c.input.length_buckets = 2, ()
  with pytest.raises(common.ConfigError, match="set input.length_buckets"):
    common.check(c)
