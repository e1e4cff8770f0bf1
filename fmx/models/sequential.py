"""Next-item retrieval model: item embeddings + positional input + an encoder (HSTU or SASRec),
L2-normalised outputs scored by cosine against the same (normalised) item table."""

from __future__ import annotations

import flax.linen as nn
import jax

from fmx.models.embeddings import ItemEmbedding, PositionalInput, l2_normalize
from fmx.models.hstu import HSTU, HSTUConfig
from fmx.models.sasrec import SASRec

ENCODERS = ("hstu", "sasrec")


class SequentialRetrieval(nn.Module):
  """`__call__(ids, lengths, timestamps, query_times) -> [B, N, d]` normalised query embeddings.

  `encoder` "sasrec" reads only the stack's layers, width, heads and dropout from `config`."""

  config: HSTUConfig
  vocab_size: int
  encoder_name: str = "hstu"
  input_dropout: float = 0.0  # on item + position embeddings

  def setup(self):
    c = self.config
    self.items = ItemEmbedding(self.vocab_size, c.dim)
    self.inputs = PositionalInput(c.max_len, c.dim, self.input_dropout)
    if self.encoder_name == "hstu":
      self.encoder = HSTU(c)
    elif self.encoder_name == "sasrec":
      self.encoder = SASRec(c.num_layers, c.dim, c.num_heads, c.dropout)
    else:
      raise ValueError(f"model.encoder={self.encoder_name!r}: expected one of {ENCODERS}")

  def __call__(self, ids, lengths, timestamps, query_times, *, train: bool = False):
    x = self.inputs(self.items(ids), lengths, train=train)
    return l2_normalize(self.encoder(x, lengths, timestamps, query_times, train=train))

  def item_embeddings(self, ids: jax.Array | None = None) -> jax.Array:
    """Normalised item embeddings (all of them when `ids` is None)."""
    table = self.items.embedding if ids is None else self.items(ids)
    return l2_normalize(table)
