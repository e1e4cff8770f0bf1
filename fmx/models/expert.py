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

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmx.configs.common import CARRIERS
from fmx.models.hstu import HSTU, HSTUConfig


class FMEmbedding(nn.Module):
  dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.LayerNorm()(jax.lax.stop_gradient(x))
    return nn.Dense(self.dim)(nn.Dropout(self.dropout, deterministic=not train)(x))


class Expert(nn.Module):
  """`__call__(batch, items) -> logits [B, num_tasks]`.

  batch: `ids, actions, timestamps [B, T]` (the surface's last T events before the request,
  right-padded), `lengths [B]`, `cand [B]`, `request_time [B]`, and `tae` / `ue` `[B, d_fm]`
  when the carrier uses them; `content [B, C]`, if given, replaces the candidate's content
  vector from the item table (a request's fresh features). items: `genres [V, G]`, `content [V, C]`. `fm_table`, if given,
  is a frozen FM embedding table `[V_fm, d_fm]` (the item-id table of a published snapshot):
  the candidate's row is another FM input, behind `stop_gradient` like the TAE.
  """

  config: HSTUConfig  # the short-term HSTU; its width is the expert's width
  vocab_size: int
  num_tasks: int
  carrier: str = "tae"

  @nn.compact
  def __call__(self, batch, items, *, train: bool = False, fm_table=None):
    c = self.config
    if self.carrier not in CARRIERS:
      raise ValueError(f"expert carrier={self.carrier!r}: expected one of {CARRIERS}")
    d = c.dim
    item = nn.Embed(self.vocab_size, d, embedding_init=nn.initializers.truncated_normal(0.02), name="item")
    action = nn.Embed(4, d, name="action")
    b, t = batch["ids"].shape
    lengths = batch["lengths"]
    # short-term sequence: [events, candidate, padding]; the candidate carries no action
    pos = jnp.arange(t + 1)[None, :]
    ids = jnp.concatenate([batch["ids"], jnp.zeros((b, 1), jnp.int32)], 1)
    ids = jnp.where(pos == lengths[:, None], batch["cand"][:, None], ids)
    act = jnp.concatenate([batch["actions"], jnp.zeros((b, 1), jnp.int32)], 1)
    x = item(ids) + jnp.where((act > 0)[..., None], action(act), 0.0)
    ts = jnp.concatenate([batch["timestamps"], jnp.zeros((b, 1), batch["timestamps"].dtype)], 1)
    ts = jnp.where(pos == lengths[:, None], batch["request_time"][:, None], ts)
    qt = jnp.concatenate([ts[:, 1:], batch["request_time"][:, None]], 1)
    qt = jnp.where(pos >= lengths[:, None] - 1, batch["request_time"][:, None], qt)
    out = HSTU(dataclasses.replace(c, max_len=t + 1), name="short_term")(
        x, lengths + 1, ts, qt, num_targets=jnp.ones_like(lengths), train=train)
    short = jnp.take_along_axis(out, lengths[:, None, None], axis=1)[:, 0]
    parts = [short]
    if "tae" in self.carrier:
      parts.append(FMEmbedding(d, c.dropout, name="fm_tae")(batch["tae"], train=train))
    if "ue" in self.carrier:
      parts.append(FMEmbedding(d, c.dropout, name="fm_ue")(batch["ue"], train=train))
    if fm_table is not None:  # the FM's frozen item-id table, the candidate's row
      parts.append(FMEmbedding(d, c.dropout, name="fm_item")(
          jnp.take(fm_table, batch["cand"], axis=0), train=train))
    fused = nn.Dense(d, name="fm_fusion_out")(jax.nn.silu(nn.Dense(2 * d, name="fm_fusion")(
        jnp.concatenate(parts, -1))))
    cand = batch["cand"]
    surface = (item(cand) + nn.Dense(d, use_bias=False, name="genres")(
        jnp.take(items["genres"], cand, axis=0).astype(jnp.float32))
               + nn.Dense(d, use_bias=False, name="content")(
                   batch["content"] if "content" in batch else jnp.take(items["content"], cand, axis=0)))
    h = jax.nn.silu(nn.Dense(d, name="expert_fusion")(jnp.concatenate([fused, surface], -1)))
    return nn.Dense(self.num_tasks, name="heads")(h)
