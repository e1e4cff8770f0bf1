"""A surface expert (arXiv 2508.02929): a small model per surface on top of frozen FM knowledge.

  FM embedding module:  LayerNorm -> dropout -> projection of the frozen TAE (and/or UE)
  short-term HSTU:      1-2 HSTU layers over the surface's last T events, the candidate appended
                        as the single target (its output is the short-term representation)
  FM fusion:            MLP over [projected FM knowledge, short-term representation]
  expert fusion:        MLP over [FM fusion, the candidate's surface features]
  heads:                one logit per task of this surface (including tasks the FM never saw)

The FM inputs arrive as arrays (materialised TAEs from `fmx.data.tae_store`) and pass through
`stop_gradient`: no gradient can reach the FM. `carrier` selects the knowledge carrier:
"none" (the expert alone), "tae", "ue" (user embedding) or "tae+ue".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmx.configs.common import CARRIERS
from fmx.models import axes
from fmx.models.dropout import Dropout
from fmx.models.hstu import HSTU, HSTUConfig


class FMEmbedding(nn.Module):
  dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = axes.layer_norm()(jax.lax.stop_gradient(x))
    return axes.dense(self.dim)(Dropout(self.dropout, deterministic=not train)(x))


def example_batch(n: int, short_len: int, fm_dim: int) -> dict:
  """`n` rows of zeros in the shapes `Expert.__call__` takes (to initialise parameters)."""
  z = lambda *s: jnp.zeros(s, jnp.int32)
  return {"ids": z(n, short_len), "actions": z(n, short_len), "timestamps": z(n, short_len),
          "lengths": z(n), "cand": jnp.ones((n,), jnp.int32), "request_time": z(n),
          "tae": jnp.zeros((n, fm_dim)), "ue": jnp.zeros((n, fm_dim))}


def from_config(c, vocab: int, num_tasks: int, carrier: str | None = None) -> "Expert":
  """The expert of an expert config `c` (its `model` section and `input.short_len`); `carrier`
  defaults to `c.model.carrier`."""
  hstu = HSTUConfig.from_model_config(c.model, max_len=c.input.short_len + 1)
  return Expert(hstu, vocab, num_tasks, c.model.carrier if carrier is None else carrier)


class Expert(nn.Module):
  """`__call__(batch, items) -> logits [B, num_tasks]`.

  batch: `ids, actions, timestamps [B, T]` (the surface's last T events before the request,
  right-padded), `lengths [B]`, `cand [B]`, `request_time [B]`, and `tae` / `ue` `[B, d_fm]`
  when the carrier uses them; `content [B, C]`, if given, replaces the candidate's content
  vector from the item table (a request's fresh features). items: `genres [V, G]`,
  `content [V, C]`. `fm_table`, if given, is a frozen FM embedding table `[V_fm, d_fm]` (the
  item-id table of a published snapshot): the candidate's row is another FM input, behind
  `stop_gradient` like the TAE. `config.max_len` must be T + 1 (the events and the candidate).

  Serving scores many candidates of one request the M-FALCON way: `encode_events` once, then
  `score` for candidates `[B, M]` against its cache, equal to `__call__` row by row.
  """

  config: HSTUConfig  # the short-term HSTU; its width is the expert's width
  vocab_size: int
  num_tasks: int
  carrier: str = "tae"

  def setup(self):
    c = self.config
    if self.carrier not in CARRIERS:
      raise ValueError(f"expert carrier={self.carrier!r}: expected one of {CARRIERS}")
    d = c.dim
    self.item = axes.item_table(self.vocab_size, d)
    self.action = axes.small_table(4, d, init=nn.linear.default_embed_init)
    self.short_term = HSTU(c)
    self.fm_tae = FMEmbedding(d, c.dropout)
    self.fm_ue = FMEmbedding(d, c.dropout)
    self.fm_item = FMEmbedding(d, c.dropout)
    self.fm_fusion = axes.dense(2 * d)
    self.fm_fusion_out = axes.dense(d, axes=(axes.MLP, axes.EMBED))
    self.genres = axes.dense(d, use_bias=False, axes=(axes.MLP, axes.EMBED))
    self.content = axes.dense(d, use_bias=False, axes=(axes.MLP, axes.EMBED))
    self.expert_fusion = axes.dense(d, axes=(axes.MLP, axes.EMBED))
    self.heads = axes.dense(self.num_tasks, axes=(axes.EMBED, None))

  def _events(self, batch):
    """Inputs, timestamps and query times of the events `[B, T]` (the last one's query time is
    the request's)."""
    b, t = batch["ids"].shape
    x = self.item(batch["ids"]) + jnp.where((batch["actions"] > 0)[..., None],
                                            self.action(batch["actions"]), 0.0)
    rt = batch["request_time"][:, None]
    qt = jnp.concatenate([batch["timestamps"][:, 1:], rt], 1)
    qt = jnp.where(jnp.arange(t)[None] >= batch["lengths"][:, None] - 1, rt, qt)
    return x, batch["timestamps"], qt

  def __call__(self, batch, items, *, train: bool = False, fm_table=None):
    b, t = batch["ids"].shape
    lengths = batch["lengths"]
    x, ts, qt = self._events(batch)
    # short-term sequence: [events, candidate, padding]; the candidate carries no action
    pos = jnp.arange(t + 1)[None, :]
    at_cand = pos == lengths[:, None]
    pad = lambda a, fill: jnp.concatenate([a, jnp.broadcast_to(fill, (b, 1) + a.shape[2:])], 1)
    x = jnp.where(at_cand[..., None], self.item(batch["cand"])[:, None], pad(x, 0.0))
    rt = batch["request_time"][:, None]
    ts = jnp.where(at_cand, rt, pad(ts, 0))
    qt = jnp.where(pos >= lengths[:, None], rt, pad(qt, 0))
    out = self.short_term(x, lengths + 1, ts, qt, num_targets=jnp.ones_like(lengths), train=train)
    short = jnp.take_along_axis(out, lengths[:, None, None], axis=1)[:, 0]
    return self._head(short, batch, items, train=train, fm_table=fm_table)

  def encode_events(self, batch):
    """The short-term HSTU's per-layer key/value cache of the events (inference)."""
    x, ts, qt = self._events(batch)
    return self.short_term(x, batch["lengths"], ts, qt, train=False, return_cache=True)[1]

  def score(self, batch, cache, items, fm_table=None):
    """Logits `[B, M, num_tasks]` of candidates `cand [B, M]` (with `tae [B, M, d_fm]`, and
    `ue [B, d_fm]`, `content [B, M, C]` as the carrier and request give them) against the
    cache of `encode_events(batch)`: what `__call__` gives each (events, candidate) row."""
    b, m = batch["cand"].shape
    t = batch["ids"].shape[1]
    rt = jnp.broadcast_to(batch["request_time"][:, None], (b, m))
    new_pos = jnp.broadcast_to(batch["lengths"][:, None], (b, m)).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    short = self.short_term.extend(self.item(batch["cand"]), cache, batch["lengths"],
                                   batch["timestamps"], rt, new_pos, positions)
    rows = {"cand": batch["cand"].reshape(-1)}
    if "tae" in batch:
      rows["tae"] = batch["tae"].reshape(b * m, -1)
    if "ue" in batch:
      rows["ue"] = jnp.repeat(batch["ue"], m, axis=0)
    if "content" in batch:
      rows["content"] = batch["content"].reshape(b * m, -1)
    logits = self._head(short.reshape(b * m, -1), rows, items, train=False, fm_table=fm_table)
    return logits.reshape(b, m, -1)

  def _head(self, short, rows, items, *, train: bool, fm_table):
    """FM fusion of [short-term, FM knowledge], expert fusion with the candidate's surface
    features, and the task heads, per row."""
    parts = [short]
    if "tae" in self.carrier:
      parts.append(self.fm_tae(rows["tae"], train=train))
    if "ue" in self.carrier:
      parts.append(self.fm_ue(rows["ue"], train=train))
    cand = rows["cand"]
    if fm_table is not None:  # the FM's frozen item-id table, the candidate's row
      parts.append(self.fm_item(jnp.take(fm_table, cand, axis=0), train=train))
    fused = self.fm_fusion_out(jax.nn.silu(self.fm_fusion(jnp.concatenate(parts, -1))))
    content = rows["content"] if "content" in rows else jnp.take(items["content"], cand, axis=0)
    surface = (self.item(cand) + self.genres(jnp.take(items["genres"], cand, axis=0).astype(jnp.float32))
               + self.content(content))
    h = jax.nn.silu(self.expert_fusion(jnp.concatenate([fused, surface], -1)))
    return self.heads(h)
