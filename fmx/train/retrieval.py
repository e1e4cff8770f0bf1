"""Next-item retrieval trainer: sampled-softmax training, full-ranking leave-one-out evaluation.

`train_and_evaluate(config, workdir)` is what `python -m fmx.main` runs for `job="retrieval"`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fmx.configs import common
from fmx.data import load as data_load, sequences as seqlib
from fmx.data.source import EpochSource
from fmx.models.embeddings import padded_vocab
from fmx.models.hstu import HSTUConfig
from fmx.models.sequential import SequentialRetrieval
from fmx.train import losses, metrics, reporting, sharding
from fmx.train.loop import NonFiniteError, train_loop
from fmx.train.state import TrainState, gradient_step, init_state, make_optimizer


def build_model(m: ml_collections.ConfigDict, vocab: int) -> SequentialRetrieval:
  """The retrieval model of a `model` config section."""
  return SequentialRetrieval(HSTUConfig.from_model_config(m), vocab, m.encoder, m.input_dropout)


def position_norm(data: seqlib.UserSequences, c: ml_collections.ConfigDict) -> float | None:
  """Loss divisor for length-sorted batches (`input.sort_chunk > 0`): the expected number of
  real positions per batch, so every position weighs the same whatever its batch. None (the
  official per-batch mean) for uniform batches."""
  if not c.input.sort_chunk:
    return None
  cuts = seqlib.train_cut(data, c.input.protocol)
  return c.input.batch_size * float(np.mean(np.clip(cuts - 1, 0, c.input.max_len)))


@dataclasses.dataclass
class RetrievalTask:
  """Pure step functions of one (config, dataset): no state lives here but constants."""

  config: ml_collections.ConfigDict
  model: SequentialRetrieval
  tx: optax.GradientTransformation
  num_items: int
  position_norm: float | None = None  # loss divisor; None: the batch's count of real positions

  def init(self, rng: jax.Array) -> TrainState:
    n = self.config.input.max_len
    z = jnp.zeros((1, n), jnp.int32)
    params = self.model.init(rng, z, jnp.ones((1,), jnp.int32), z, z)["params"]
    return init_state(params, self.tx)

  def loss(self, params, batch, rng):
    """Sampled softmax over a batch, or over its row groups (`input.row_groups`) together: one
    mean over every real position of the batch, and every row scored against the negatives it
    would draw in the ungrouped batch (`rows`: its place there)."""
    c = self.config.loss
    groups = seqlib.row_groups(batch)
    table = self.model.apply({"params": params}, method="item_embeddings")  # normalised once
    drop_rng, neg_rng = jax.random.split(rng)
    b, n = sum(g["ids"].shape[0] for g in groups), max(g["ids"].shape[1] for g in groups)
    neg_ids = jax.random.randint(neg_rng, losses.negative_shape(c.negatives, b, n, c.num_negatives),
                                 1, self.num_items + 1)
    weights = [(jnp.arange(g["ids"].shape[1])[None, :] < g["lengths"][:, None]).astype(jnp.float32)
               for g in groups]
    norm = self.position_norm or sum(jnp.sum(w) for w in weights)
    loss = 0.0
    for i, (g, w) in enumerate(zip(groups, weights)):
      query = self.model.apply({"params": params}, g["ids"], g["lengths"], g["timestamps"],
                               g["query_times"], train=True,
                               rngs={"dropout": jax.random.fold_in(drop_rng, i) if i else drop_rng})
      negs = neg_ids
      if "rows" in g and neg_ids.ndim > 1:
        negs = neg_ids[g["rows"]]
        negs = negs[:, :g["ids"].shape[1]] if negs.ndim == 3 else negs
      loss += losses.sampled_softmax(query, table, g["targets"], negs, w, c.temperature, norm)
    return loss, {}

  def train_step(self, state: TrainState, batch, rng):
    return gradient_step(state, self.tx, self.loss, batch, rng, self.config.model.compute_dtype)

  def scores(self, params, batch):
    """`[B, V]` cosine scores of every item against the last history position."""
    query = self.model.apply({"params": params}, batch["ids"], batch["lengths"],
                             batch["timestamps"], batch["query_times"])
    last = jnp.take_along_axis(query, jnp.maximum(batch["lengths"] - 1, 0)[:, None, None], axis=1)[:, 0]
    return last @ self.model.apply({"params": params}, method="item_embeddings").T

  def eval_ranks(self, params, batch):
    """(target ranks `[B]`, count of non-finite scores)."""
    scores = self.scores(params, batch)
    return (metrics.target_ranks(scores, batch["targets"], batch["seen"], self.num_items),
            jnp.sum(~jnp.isfinite(scores[:, 1:self.num_items + 1])))


def evaluate_ranks(rank_fn, params, arrays, batch_size: int, buckets=(), max_len=0) -> np.ndarray:
  """Ranks of every row of `arrays`, in order; stops on a non-finite score."""
  ranks = np.empty(len(arrays["lengths"]), np.int64)
  for rows, batch in seqlib.eval_batches(arrays, batch_size, buckets, max_len):
    r, nonfinite = rank_fn(params, batch)
    if int(nonfinite):
      raise NonFiniteError(f"{int(nonfinite)} non-finite scores")
    ranks[rows] = np.asarray(r)[: len(rows)]
  return ranks


def popularity_metrics(data, protocol, split_arrays, ks, batch_size) -> dict[str, float]:
  """The most-popular baseline ranked under exactly the same protocol."""
  counts = jnp.asarray(seqlib.train_item_counts(data, protocol), jnp.float32)
  fn = jax.jit(lambda _, b: (metrics.target_ranks(
      jnp.broadcast_to(counts, (b["targets"].shape[0], counts.shape[0])), b["targets"], b["seen"],
      data.num_items), 0))
  ranks = evaluate_ranks(fn, None, split_arrays, batch_size)
  return {f"{k}_popular": v for k, v in metrics.ranking_metrics(ranks, ks).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c = config
  data = data_load.load(c.input, "sequences")
  protocol, n = c.input.protocol, c.input.max_len
  ks = tuple(c.evals.ks)
  buckets = tuple(c.input.length_buckets)
  vocab = padded_vocab(data.num_items, c.mesh.model)
  task = RetrievalTask(c, build_model(c.model, vocab),
                       make_optimizer(c.optimizer), data.num_items, position_norm(data, c))
  splits = ["test"] + (["valid"] if protocol == "validation" else [])
  eval_arrays = {s: seqlib.eval_arrays(data, protocol, s, n) for s in splits}
  layout = sharding.Layout.of(c.mesh)
  if (c.input.batch_size // c.input.row_groups) % layout.batch_devices:
    raise common.ConfigError(
        f"--config.input.batch_size={c.input.batch_size} in input.row_groups="
        f"{c.input.row_groups} leaves groups of rows that do not split over the "
        f"{layout.batch_devices} devices of the mesh's data axis; change one of them")
  rows = layout.process_rows(c.input.batch_size // c.input.row_groups)  # of each group
  batches, steps_per_epoch = seqlib.train_batches(data, protocol, n, c.input.batch_size, c.seed,
                                                  c.num_epochs, buckets, c.input.sort_chunk,
                                                  c.input.row_groups, rows)
  eval_ranks = layout.jit_eval(task.eval_ranks, layout.params(task.init))

  def evaluate(params, epoch):
    out = {}
    for s in splits:
      ranks = evaluate_ranks(eval_ranks, params, eval_arrays[s], c.evals.batch_size, buckets, n)
      out.update({(k if s == "test" else f"valid/{k}"): v
                  for k, v in metrics.ranking_metrics(ranks, ks).items()})
    return out

  _, final, report = train_loop(
      c, workdir, init=task.init, train_step=task.train_step,
      source=EpochSource(batches, steps_per_epoch, rows=rows), evaluate=evaluate,
      select=("valid/ndcg@10", "max") if protocol == "validation" else None,
      desc=f"{c.input.dataset} {c.model.encoder}", fingerprint=data_load.fingerprint(data))
  results = {
      **final,
      **popularity_metrics(data, protocol, eval_arrays["test"], ks, c.evals.batch_size),
      "selected_by": "valid/ndcg@10 (best epoch)" if protocol == "validation" else "last epoch",
      "protocol": protocol, "dataset": c.input.dataset, "model": c.model.encoder,
      "config": c.to_dict(),
  }
  report.close()
  reporting.write_results(workdir, results)
  return results
