"""Logical axis names of every parameter, and the initialisers that attach them.

Modules name each parameter's axes (`nn.with_logical_partitioning`); the config's `mesh` section
maps the names to mesh axes (`fmx.train.sharding.logical_rules`), so a sharding choice never
depends on a parameter's path. `model.init` returns the parameters boxed with their names;
`nn.meta.unbox` strips them (the train loop reads the names first).
"""

from __future__ import annotations

import flax.linen as nn

VOCAB = "vocab"  # rows of a large id table (items)
VOCAB_EMBED = "vocab_embed"  # columns of such a table
CATEGORY = "category"  # rows of a small table (actions, surfaces, buckets, positions, users)
EMBED = "embed"  # the model width d of dense layers and small tables
MLP = "mlp"  # a dense layer's other side (projections, heads)
TABLE = "table"  # the relative attention bias tables
REPLICATED = ()  # no names: every axis replicated


def names(init, *axes):
  """`init` with the logical names `axes` attached to what it creates."""
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, *, use_bias: bool = True, kernel_init=nn.initializers.lecun_normal(),
          axes=(EMBED, MLP), **kw) -> nn.Dense:
  """`nn.Dense` with its kernel named `axes` (input, output) and its bias `axes[1:]`."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=names(kernel_init, *axes),
                  bias_init=names(nn.initializers.zeros_init(), *axes[1:]), **kw)


def item_table(num: int, dim: int, **kw) -> nn.Embed:
  """An item-id table `[num, dim]`, truncated-normal(0.02): `(VOCAB, VOCAB_EMBED)`."""
  return nn.Embed(num, dim, embedding_init=names(nn.initializers.truncated_normal(0.02), VOCAB,
                                                 VOCAB_EMBED), **kw)


def small_table(num: int, dim: int, init=nn.initializers.truncated_normal(0.02), **kw) -> nn.Embed:
  """A small categorical table `[num, dim]`: `(CATEGORY, EMBED)`."""
  return nn.Embed(num, dim, embedding_init=names(init, CATEGORY, EMBED), **kw)


def layer_norm(**kw) -> nn.LayerNorm:
  return nn.LayerNorm(scale_init=names(nn.initializers.ones_init(), EMBED),
                      bias_init=names(nn.initializers.zeros_init(), EMBED), **kw)
