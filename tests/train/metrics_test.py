"""Ranking metrics and the sampled-softmax loss on hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmx.models.embeddings import l2_normalize
from fmx.train import losses, metrics


def test_target_ranks_exclude_history_and_break_ties_by_id():
  # items 1..5 (column 0 is padding, column 6 is vocab padding)
  scores = jnp.array([[9.0, 0.5, 0.9, 0.7, 0.7, 0.1, 99.0],
                      [9.0, 0.5, 0.9, 0.7, 0.7, 0.1, 99.0]])
  targets = jnp.array([4, 4])
  seen = jnp.array([[0, 0], [2, 0]])  # user 2 already consumed item 2
  ranks = np.asarray(metrics.target_ranks(scores, targets, seen, num_items=5))
  # user 1: item 2 (0.9) and item 3 (0.7, tie with smaller id) rank ahead -> rank 2
  # user 2: item 2 is excluded -> rank 1
  np.testing.assert_array_equal(ranks, [2, 1])


def test_target_is_rankable_even_if_seen_before():
  scores = jnp.array([[0.0, 0.2, 0.1]])
  ranks = metrics.target_ranks(scores, jnp.array([1]), jnp.array([[1]]), num_items=2)
  assert int(ranks[0]) == 0


def test_ranking_metrics_hand_computed():
  m = metrics.ranking_metrics(np.array([0, 3, 12, 60]), ks=(10, 50))
  assert m["hr@10"] == pytest.approx(0.5)
  assert m["hr@50"] == pytest.approx(0.75)
  assert m["ndcg@10"] == pytest.approx((1.0 + 1.0 / np.log2(5)) / 4)
  assert m["ndcg@50"] == pytest.approx((1.0 + 1.0 / np.log2(5) + 1.0 / np.log2(14)) / 4)
  assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13 + 1 / 61) / 4)


def test_sampled_softmax_hand_computed_and_accidental_hits():
  q = jnp.array([[[1.0, 0.0]]])  # [B=1, N=1, d=2]
  table = jnp.zeros((8, 2)).at[3].set(jnp.array([0.0, 1.0])).at[7].set(jnp.array([1.0, 0.0]))
  # per-batch negatives 7 and 3; the positive is 3
  loss = losses.sampled_softmax(q, table, jnp.array([[3]]), jnp.array([7, 3]), jnp.ones((1, 1)),
                                temperature=0.5)
  # logits: positive 0/0.5 = 0; negative id 7: 1/0.5 = 2; negative id 3 is the positive (masked)
  assert float(loss) == pytest.approx(np.log(np.exp(0.0) + np.exp(2.0)), rel=1e-6)


def test_sampled_softmax_ignores_zero_weight_positions():
  q = jnp.ones((1, 2, 2)) / np.sqrt(2)
  table = jnp.zeros((8, 2)).at[1].set(q[0, 0]).at[2].set(-q[0, 1])
  args = (jnp.array([[1, 2]]), jnp.array([[4, 5, 6]]))
  full = losses.sampled_softmax(q, table, *args, jnp.array([[1.0, 0.0]]), 1.0)
  only_first = losses.sampled_softmax(q[:, :1], table, args[0][:, :1], args[1], jnp.ones((1, 1)),
                                      1.0)
  assert float(full) == pytest.approx(float(only_first))


@pytest.mark.parametrize("sharing", list(losses.NEGATIVE_SHARING))
def test_sampled_softmax_equals_gathered_vectors(sharing):
  """Every way of sharing negatives against the plain formula on gathered rows: the loss and
  its gradients (per-position logits come from `gathered_logits`, chunked, not a gather)."""
  rng = np.random.default_rng(0)
  b, n, k, v, d = 3, 300, 5, 40, 8  # 900 rows: several chunks of gathered_logits and a tail
  q = l2_normalize(jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32))
  table = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
  pos_ids = jnp.asarray(rng.integers(1, v, (b, n)))
  neg_ids = jnp.asarray(rng.integers(1, v, losses.negative_shape(sharing, b, n, k)))
  neg_ids = neg_ids.at[..., 0].set(3)  # some accidental hits
  pos_ids = pos_ids.at[:, ::7].set(3)
  w = jnp.asarray(rng.random((b, n)) < 0.8, jnp.float32)

  def plain(q, table):
    t = l2_normalize(table)
    nid = {3: neg_ids, 2: neg_ids[:, None], 1: neg_ids[None, None]}[neg_ids.ndim]
    neg = jnp.broadcast_to(t[nid], (b, n, k, d))
    pos_logit = jnp.sum(q * t[pos_ids], -1) / 0.1
    neg_logit = jnp.where(nid == pos_ids[..., None], -1e9, jnp.einsum("bnd,bnkd->bnk", q, neg) / 0.1)
    loss = jax.nn.logsumexp(jnp.concatenate([pos_logit[..., None], neg_logit], -1), -1) - pos_logit
    return jnp.sum(loss * w) / jnp.sum(w)

  fast = lambda q, table: losses.sampled_softmax(q, l2_normalize(table), pos_ids, neg_ids, w, 0.1)
  np.testing.assert_allclose(float(fast(q, table)), float(plain(q, table)), rtol=1e-5)
  for got, want in zip(jax.grad(fast, (0, 1))(q, table), jax.grad(plain, (0, 1))(q, table)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kept", [0, 256, 517, 900])
def test_gathered_logits_computes_only_kept_rows(kept):
  """Kept rows (scattered, any count: none, whole chunks, a tail, all) equal the dot products
  of gathered rows, with the same gradients; the others are 0 and get no gradient."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(3, 300, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 40, (3, 300, 5)))
  keep = jnp.asarray(rng.permutation(900) < kept).reshape(3, 300)
  cot = jnp.asarray(rng.normal(size=(3, 300, 5)), jnp.float32)
  plain = lambda q, t: jnp.where(keep[..., None], jnp.einsum("bnd,bnkd->bnk", q, t[ids]), 0.0)
  fast = lambda q, t: losses.gathered_logits(q, t, ids, keep)
  np.testing.assert_allclose(fast(q, table), plain(q, table), rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(fast(q, table))[~np.asarray(keep)])
  grads = lambda f: jax.grad(lambda q, t: jnp.sum(f(q, t) * cot), (0, 1))(q, table)
  for got, want in zip(grads(fast), grads(plain)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  mixed = losses.gathered_logits(q.astype(jnp.bfloat16), table, ids, keep)  # promotes
  assert mixed.dtype == jnp.float32


def test_normalized_entropy_hand_computed():
  p, y = np.array([0.8, 0.3, 0.6, 0.1]), np.array([1, 0, 1, 0])
  logloss = -(np.log(0.8) + np.log(0.7) + np.log(0.6) + np.log(0.9)) / 4
  assert metrics.normalized_entropy(p, y) == pytest.approx(logloss / np.log(2))
  assert metrics.normalized_entropy(np.full(4, 0.25), np.array([1, 0, 0, 0])) == pytest.approx(1.0)


def test_auc_hand_computed_with_ties():
  assert metrics.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
  assert metrics.auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)


def test_distillation_only_on_the_teachers_tasks_and_only_when_weighted():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 2, (6, 3)))
  valid = jnp.ones((6, 3), bool)
  w = jnp.array([1.0, 0.5, 1.0])
  soft = jnp.asarray(rng.uniform(size=(6, 3)), jnp.float32)
  known = jnp.array([True, True, False])  # the last task is unseen by the teacher
  grad = lambda kd_weight: jax.grad(
      lambda s: losses.distilled_bce(logits, labels, valid, w, s, known, kd_weight)[0])(soft)
  assert np.all(np.asarray(grad(0.0)) == 0)  # the expert alone never sees the FM's predictions
  g = np.asarray(grad(2.0))
  assert np.all(g[:, 2] == 0) and np.all(g[:, :2] != 0)
  loss, per_task, kd = losses.distilled_bce(logits, labels, valid, w, soft, known, 2.0)
  bce = lambda y: -(y * np.log(jax.nn.sigmoid(logits)) + (1 - y) * np.log(1 - jax.nn.sigmoid(logits)))
  expect_kd = float(np.sum(np.asarray(w)[:2] * bce(np.asarray(soft)).mean(0)[:2]))
  np.testing.assert_allclose(kd, expect_kd, rtol=1e-5)
  np.testing.assert_allclose(loss, float(losses.mtml_bce(logits, labels, valid, w)[0]) + 2 * expect_kd,
                             rtol=1e-5)


def test_nan_scores_rank_last_never_first():
  scores = jnp.array([[0.0, jnp.nan, 0.5, 0.2, jnp.nan],   # target 1 is NaN: last of 4 items
                      [0.0, 0.1, jnp.nan, 0.3, 0.2]])      # a NaN item never ranks ahead
  ranks = metrics.target_ranks(scores, jnp.array([1, 4]), jnp.zeros((2, 1), jnp.int32), 4)
  np.testing.assert_array_equal(np.asarray(ranks), [3, 1])
