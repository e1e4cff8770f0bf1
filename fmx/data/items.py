"""The item side table the ranking models read: genres, release year and content vector per
item id, padded to the model's vocabulary (row 0 and rows past the last item are zero)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fmx.data.cross_surface import CrossSurfaceData


def item_table(data: CrossSurfaceData, vocab: int) -> dict:
  pad = lambda a: np.concatenate([a, np.zeros((vocab - len(a),) + a.shape[1:], a.dtype)])
  return {"genres": jnp.asarray(pad(data.item_genres), jnp.float32),
          "year": jnp.asarray(pad(data.item_year)), "content": jnp.asarray(pad(data.item_content))}
