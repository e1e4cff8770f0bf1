"""A per-surface non-sequential ranking baseline: no history, one MLP head per surface over the
candidate's features (item id, genres, year, content) and a learned user-id embedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmx.models import axes
from fmx.models.dropout import Dropout
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
    side = lambda name: axes.dense(d, use_bias=False, axes=(axes.MLP, axes.EMBED), name=name)
    x = (axes.item_table(self.vocab_size, d, name="item")(ids)
         + axes.small_table(YEAR_BUCKETS, d, name="year")(
             year_bucket(jnp.take(items["year"], ids, axis=0)))
         + side("genres")(jnp.take(items["genres"], ids, axis=0).astype(jnp.float32))
         + side("content")(jnp.take(items["content"], ids, axis=0)))
    user = axes.small_table(self.num_users, d, name="user")(tokens["user"])[:, None, :]
    h = jnp.concatenate([x, jnp.broadcast_to(user, x.shape)], axis=-1)
    h = Dropout(self.input_dropout, deterministic=not train)(h)
    hidden = nn.DenseGeneral(
        (self.num_surfaces, self.head_dim), name="hidden",
        kernel_init=axes.names(nn.initializers.lecun_normal(), axes.EMBED, None, axes.MLP),
        bias_init=axes.names(nn.initializers.zeros_init(), None, axes.MLP))(h)
    w = self.param("out_kernel", axes.names(nn.initializers.lecun_normal(batch_axis=(0,)), None,
                                            axes.MLP, None),
                   (self.num_surfaces, self.head_dim, self.num_tasks))
    b = self.param("out_bias", axes.names(nn.initializers.zeros, None, None),
                   (self.num_surfaces, self.num_tasks))
    logits = jnp.einsum("btsh,sho->btso", jax.nn.silu(hidden), w) + b
    return None, jnp.take_along_axis(logits, surf[..., None, None], axis=2)[:, :, 0]  # [B, T, tasks]
