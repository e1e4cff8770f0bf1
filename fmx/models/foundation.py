"""The Foundation Model (arXiv 2508.02929) on HSTU, in ranking mode.

Tokens are history events followed by candidates. Every token's input is the SUM of projected
features: item id, surface, genres, release-year bucket, the dense content vector, the age of
the event relative to the request (log buckets), a position embedding, and, for history tokens
only, the action embedding (candidates carry none). This is the paper's summation, not HSTU's
action interleaving. The HSTU output at a candidate's position is its target-aware embedding
(TAE); MTML heads on the TAE (plus the candidate's surface) give one logit per task.

Pure functions of `params`: `FoundationModel.__call__` (training, full sequence), and
`encode_history` + `extend` (M-FALCON: the history is encoded once, candidates come in
micro-batches against its key/value cache; `fmx.runtime.mfalcon` serves requests with them);
`append_history` updates a cached encoding when events are appended to the history.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmx.models import axes
from fmx.models.dropout import Dropout
from fmx.models.hstu import HSTU, HSTUConfig

NUM_ACTIONS = 4  # 0: none (candidates, padding), 1..3 from the event's labels
YEAR_BUCKETS = 26  # 5-year buckets from 1900; 0 is unknown
AGE_BUCKETS = 64


def probabilities(logits):
  """Task probabilities from task logits: the one sigmoid of the FM's and experts' outputs."""
  return jax.nn.sigmoid(logits)


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

  config: HSTUConfig
  vocab_size: int
  num_surfaces: int
  num_tasks: int
  input_dropout: float = 0.0  # on the summed token inputs
  head_dim: int = 64  # MTML head hidden width

  def setup(self):
    c = self.config
    d = c.dim
    self.item = axes.item_table(self.vocab_size, d)
    self.surface = axes.small_table(self.num_surfaces, d)
    self.action = axes.small_table(NUM_ACTIONS, d)
    self.year = axes.small_table(YEAR_BUCKETS, d)
    self.age = axes.small_table(AGE_BUCKETS, d)
    self.position = axes.small_table(c.max_len, d)
    self.genres = axes.dense(d, use_bias=False, axes=(axes.MLP, axes.EMBED))
    self.content = axes.dense(d, use_bias=False, axes=(axes.MLP, axes.EMBED))
    self.drop = Dropout(self.input_dropout)
    self.encoder = HSTU(c)
    self.head_hidden = axes.dense(self.head_dim)
    self.head_out = axes.dense(self.num_tasks, axes=(axes.MLP, None))

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

  def append_history(self, hist, cache, start, rows: int, items):
    """`encode_history` of `hist` from the cache of an earlier history that has the same inputs
    (event, age bucket, query time) on rows `< start [B]`: only rows start .. start + rows - 1
    (`rows` static) are encoded. Needs start <= the earlier length and `lengths <= start + rows`.
    Returns (outputs of those rows `[B, rows, d]`, zero from `lengths` on; the new cache)."""
    b, h = hist["ids"].shape
    pos = start[:, None] + jnp.arange(rows, dtype=jnp.int32)[None]  # [B, rows]
    idx = jnp.minimum(pos, h - 1)  # rows past the end are padding
    at = lambda a: jnp.take_along_axis(a, idx, axis=1)
    x = self.embed(at(hist["ids"]), at(hist["surfaces"]), at(hist["actions"]),
                   at(hist["timestamps"]), hist["request_time"], idx, items, train=False)
    x = jnp.where((pos < hist["lengths"][:, None])[..., None], x, 0.0)
    positions = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32), (b, h))
    return self.encoder.append(x, cache, start, hist["lengths"], hist["timestamps"],
                               hist["query_times"], positions)

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
