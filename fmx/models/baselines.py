"""A per-surface non-sequential ranking baseline: no history, one MLP head per surface over the
candidate's features (item id, genres, year, content) and a learned user-id embedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmx.models.foundation import YEAR_BUCKETS, year_bucket


class NonSequential(nn.Module):
  """`__call__(tokens, items) -> (None, logits [B, T, num_tasks])`, the same interface as the FM."""

  dim: int
  vocab_size: int
  num_surfaces: int
  num_tasks: int
  num_users: int
  input_dropout: float = 0.0
  head_dim: int = 64

  @nn.compact
  def __call__(self, tokens, items, *, train: bool = False):
    d = self.dim
    ids = jnp.take_along_axis(tokens["ids"], tokens["cand_index"], axis=1)
    surf = jnp.take_along_axis(tokens["surfaces"], tokens["cand_index"], axis=1)
    emb = lambda n, name: nn.Embed(n, d, embedding_init=nn.initializers.truncated_normal(0.02), name=name)
    x = (emb(self.vocab_size, "item")(ids)
         + emb(YEAR_BUCKETS, "year")(year_bucket(jnp.take(items["year"], ids, axis=0)))
         + nn.Dense(d, use_bias=False, name="genres")(jnp.take(items["genres"], ids, axis=0).astype(jnp.float32))
         + nn.Dense(d, use_bias=False, name="content")(jnp.take(items["content"], ids, axis=0)))
    user = emb(self.num_users, "user")(tokens["user"])[:, None, :]
    h = jnp.concatenate([x, jnp.broadcast_to(user, x.shape)], axis=-1)
    h = nn.Dropout(self.input_dropout, deterministic=not train)(h)
    hidden = nn.DenseGeneral((self.num_surfaces, self.head_dim), name="hidden")(h)
    w = self.param("out_kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                   (self.num_surfaces, self.head_dim, self.num_tasks))
    b = self.param("out_bias", nn.initializers.zeros, (self.num_surfaces, self.num_tasks))
    logits = jnp.einsum("btsh,sho->btso", jax.nn.silu(hidden), w) + b
    return None, jnp.take_along_axis(logits, surf[..., None, None], axis=2)[:, :, 0]  # [B, T, tasks]
