"""The Foundation Model (arXiv 2508.02929) on HSTU, in ranking mode.

Tokens are history events followed by candidates. Every token's input is the SUM of projected
features: item id, surface, genres, release-year bucket, the dense content vector, the age of
the event relative to the request (log buckets), a position embedding, and, for history tokens
only, the action embedding (candidates carry none). This is the paper's summation, not HSTU's
action interleaving. The HSTU output at a candidate's position is its target-aware embedding
(TAE); MTML heads on the TAE (plus the candidate's surface) give one logit per task.

Public API (pure functions of `params`): `FoundationModel.__call__` (training, full sequence)
and `MFalcon.target_aware_embeddings / user_embedding / predict` (M-FALCON: the history is
encoded once, candidates come in micro-batches against its key/value cache).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmx.models.hstu import HSTU

NUM_ACTIONS = 4  # 0: none (candidates, padding), 1..3 from the event's labels
YEAR_BUCKETS = 26  # 5-year buckets from 1900; 0 is unknown
AGE_BUCKETS = 64


def year_bucket(year):
  return jnp.where(year > 0, jnp.clip((year - 1900) // 5 + 1, 1, YEAR_BUCKETS - 1), 0)


def age_bucket(request_time, ts):
  dt = jnp.maximum(request_time - ts, 1).astype(jnp.float32)
  return jnp.clip(jnp.floor(jnp.log(dt) / 0.301), 0, AGE_BUCKETS - 1).astype(jnp.int32)


class FoundationModel(nn.Module):
  """`__call__(tokens, items) -> (tae [B, T, d], logits [B, T, num_tasks])`.

  `tokens`: ids, surfaces, actions, timestamps, query_times, positions `[B, N]`; lengths and
  num_targets `[B]` (candidates are the last `num_targets` of `lengths` tokens).
  `items`: the item table: genres `[V, G]`, year `[V]`, content `[V, C]` (constants).
  """

  config: ml_collections.ConfigDict  # the `model` sub-config
  vocab_size: int
  num_surfaces: int
  num_tasks: int

  def setup(self):
    c = self.config
    d = c.dim
    emb = lambda n: nn.Embed(n, d, embedding_init=nn.initializers.truncated_normal(0.02))
    self.item = emb(self.vocab_size)
    self.surface = emb(self.num_surfaces)
    self.action = emb(NUM_ACTIONS)
    self.year = emb(YEAR_BUCKETS)
    self.age = emb(AGE_BUCKETS)
    self.position = emb(c.max_len)
    self.genres = nn.Dense(d, use_bias=False)
    self.content = nn.Dense(d, use_bias=False)
    self.drop = nn.Dropout(c.input_dropout)
    self.encoder = HSTU(c.num_layers, d, c.num_heads, c.dqk, c.dv, c.max_len, c.dropout,
                        c.num_time_buckets, c.alpha, c.get("scale_len") or None, c.use_rab,
                        c.attention_impl)
    self.head_hidden = nn.Dense(c.head_dim)
    self.head_out = nn.Dense(self.num_tasks)

  def embed(self, ids, surfaces, actions, timestamps, request_time, positions, items, *, train):
    x = (self.item(ids) * math.sqrt(self.config.dim) + self.surface(surfaces)
         + self.genres(jnp.take(items["genres"], ids, axis=0).astype(jnp.float32))
         + self.year(year_bucket(jnp.take(items["year"], ids, axis=0)))
         + self.content(jnp.take(items["content"], ids, axis=0))
         + self.age(age_bucket(request_time[:, None], timestamps))
         + self.position(positions))
    x = x + jnp.where((actions > 0)[..., None], self.action(actions), 0.0)
    return self.drop(x, deterministic=not train)

  def heads(self, tae, cand_surfaces):
    h = jnp.concatenate([tae, self.surface(cand_surfaces)], axis=-1)
    return self.head_out(jax.nn.silu(self.head_hidden(h)))

  def __call__(self, tokens, items, *, train: bool = False, return_user: bool = False):
    """(tae, logits), plus the user embedding `[B, d]` (the output at the last history
    position, which never sees a candidate) when `return_user`."""
    t = tokens
    b, n = t["ids"].shape
    num_cand = t["cand_index"].shape[1]
    x = self.embed(t["ids"], t["surfaces"], t["actions"], t["timestamps"], t["request_time"],
                   t["positions"], items, train=train)
    valid = jnp.arange(n)[None, :] < t["lengths"][:, None]
    x = jnp.where(valid[..., None], x, 0.0)
    out = self.encoder(x, t["lengths"], t["timestamps"], t["query_times"], positions=t["positions"],
                       num_targets=t["num_targets"], train=train)
    tae = jnp.take_along_axis(out, t["cand_index"][..., None], axis=1)  # [B, T, d]
    tae = jnp.where((jnp.arange(num_cand)[None, :] < t["num_targets"][:, None])[..., None], tae, 0.0)
    cand_surfaces = jnp.take_along_axis(t["surfaces"], t["cand_index"], axis=1)
    logits = self.heads(tae, cand_surfaces)
    if not return_user:
      return tae, logits
    last = jnp.maximum(t["lengths"] - t["num_targets"] - 1, 0)
    return tae, logits, jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0]

  # ---- M-FALCON inference: history once, candidates in micro-batches -------------------------

  def encode_history(self, hist, items):
    """Encodes histories `[B, H]` once: returns (outputs `[B, H, d]`, per-layer k/v cache)."""
    h = hist["ids"].shape[1]
    positions = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32), hist["ids"].shape)
    x = self.embed(hist["ids"], hist["surfaces"], hist["actions"], hist["timestamps"],
                   hist["request_time"], positions, items, train=False)
    x = jnp.where((jnp.arange(h)[None, :] < hist["lengths"][:, None])[..., None], x, 0.0)
    return self.encoder(x, hist["lengths"], hist["timestamps"], hist["query_times"],
                        positions=positions, train=False, return_cache=True)

  def extend(self, hist, cache, cand, items):
    """TAEs `[B, M, d]` and logits of candidates `[B, M]` (ids, surfaces) against the cache."""
    b, m = cand["ids"].shape
    h = hist["ids"].shape[1]
    new_pos = jnp.broadcast_to(hist["lengths"][:, None], (b, m)).astype(jnp.int32)
    times = jnp.broadcast_to(hist["request_time"][:, None], (b, m))
    x = self.embed(cand["ids"], cand["surfaces"], jnp.zeros((b, m), jnp.int32), times,
                   hist["request_time"], new_pos, items, train=False)
    positions = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32), (b, h))
    tae = self.encoder.extend(x, cache, hist["lengths"], hist["timestamps"], times, new_pos, positions)
    return tae, self.heads(tae, cand["surfaces"])


def history_inputs(ids, surfaces, actions, timestamps, request_time, max_len: int) -> dict:
  """One user's history (1-D arrays, chronological) as a `[1, H]` batch for `encode_history`:
  the most recent `max_len` events, query times = next event's time (the request for the last)."""
  ids, surfaces, actions, timestamps = (np.asarray(a)[-max_len:] for a in (ids, surfaces, actions, timestamps))
  h = len(ids)
  pad = lambda a: np.pad(a, (0, max_len - h))[None]
  query = np.append(timestamps[1:], request_time)
  return {"ids": pad(ids).astype(np.int32), "surfaces": pad(surfaces).astype(np.int32),
          "actions": pad(actions).astype(np.int32), "timestamps": pad(timestamps).astype(np.int64),
          "query_times": pad(query).astype(np.int64), "lengths": np.array([h], np.int32),
          "request_time": np.array([request_time], np.int64)}


class MFalcon:
  """Request-level inference (M-FALCON): the history is encoded once per request and candidates
  are scored in micro-batches of `micro_batch` (the last one padded) against its k/v cache.
  Holds only the jitted pure functions; `params` are passed to every call."""

  def __init__(self, model: FoundationModel, items: dict, micro_batch: int = 256):
    self.items, self.micro_batch = items, micro_batch
    self._encode = jax.jit(lambda p, h, it: model.apply({"params": p}, h, it, method="encode_history"))
    self._extend = jax.jit(lambda p, h, c, cd, it: model.apply({"params": p}, h, c, cd, it,
                                                               method="extend"))

  def target_aware_embeddings(self, params, history: dict, candidates: dict) -> np.ndarray:
    """`[num_candidates, d]` TAEs; `history` from `history_inputs`, candidates: ids, surfaces."""
    return self._score(params, history, candidates)[0]

  def predict(self, params, history: dict, candidates: dict) -> np.ndarray:
    """`[num_candidates, num_tasks]` task probabilities."""
    return np.asarray(jax.nn.sigmoid(self._score(params, history, candidates)[1]))

  def user_embedding(self, params, history: dict) -> np.ndarray:
    """`[d]`: the output at the last history position (the non-target-aware baseline)."""
    out, _ = self._encode(params, history, self.items)
    return np.asarray(out[0, int(history["lengths"][0]) - 1])

  def _score(self, params, history, candidates):
    _, cache = self._encode(params, history, self.items)
    m, mb = len(candidates["ids"]), self.micro_batch
    taes, logits = [], []
    for start in range(0, m, mb):
      chunk = {k: np.asarray(v)[start:start + mb] for k, v in candidates.items()}
      size = len(chunk["ids"])
      chunk = {k: np.pad(v, (0, mb - size))[None] for k, v in chunk.items()}
      t, l = self._extend(params, history, cache, chunk, self.items)
      taes.append(np.asarray(t[0, :size]))
      logits.append(np.asarray(l[0, :size]))
    return np.concatenate(taes), np.concatenate(logits)
