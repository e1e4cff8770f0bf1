"""Next-item retrieval model: item embeddings + positional input + an encoder (HSTU or SASRec),
L2-normalised outputs scored by cosine against the same (normalised) item table."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from fmx.models.embeddings import ItemEmbedding, PositionalInput, l2_normalize
from fmx.models.hstu import HSTU
from fmx.models.sasrec import SASRec


class SequentialRetrieval(nn.Module):
  """`__call__(ids, lengths, timestamps, query_times) -> [B, N, d]` normalised query embeddings."""

  config: ml_collections.ConfigDict  # the `model` sub-config
  vocab_size: int

  def setup(self):
    c = self.config
    self.items = ItemEmbedding(self.vocab_size, c.dim)
    self.inputs = PositionalInput(c.max_len, c.dim, c.input_dropout)
    if c.encoder == "hstu":
      self.encoder = HSTU(c.num_layers, c.dim, c.num_heads, c.dqk, c.dv, c.max_len, c.dropout,
                          c.num_time_buckets, c.alpha, c.get("scale_len") or None, c.use_rab,
                          c.attention_impl)
    elif c.encoder == "sasrec":
      self.encoder = SASRec(c.num_layers, c.dim, c.num_heads, c.dropout)
    else:
      raise ValueError(f"model.encoder={c.encoder!r}: expected 'hstu' or 'sasrec'")

  def __call__(self, ids, lengths, timestamps, query_times, *, train: bool = False):
    x = self.inputs(self.items(ids), lengths, train=train)
    return l2_normalize(self.encoder(x, lengths, timestamps, query_times, train=train))

  def item_embeddings(self, ids: jax.Array | None = None) -> jax.Array:
    """Normalised item embeddings (all of them when `ids` is None)."""
    table = self.items.embedding if ids is None else self.items(ids)
    return l2_normalize(table)
