"""The one data-loading entry of every job: a dataset by name, in the view a job reads, and a
fingerprint of its content (recorded with checkpoints, so a resumed run notices changed data).

Views: "sequences" (`UserSequences`: ml-100k, ml-1m, synthetic; the retrieval job) and
"surfaces" (`CrossSurfaceData`: the cross-surface ml-1m view, synthetic surfaces; the FM,
the logging tier and the experts).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from fmx.data.raw import RawDataError

VIEWS = {"sequences": ("ml-100k", "ml-1m", "synthetic"), "surfaces": ("ml-1m", "synthetic")}


def load(c, view: str):
  """Loads `c.dataset` (an `input` config section) in `view`."""
  if c.dataset not in VIEWS[view]:
    raise RawDataError(f"--config.input.dataset={c.dataset!r}: this job reads one of {VIEWS[view]}")
  if c.dataset == "synthetic":
    from fmx.data import synthetic, synthetic_surfaces
    gen = synthetic.generate if view == "sequences" else synthetic_surfaces.generate
    return gen(**c.synthetic.to_dict())
  if view == "sequences":
    from fmx.data import movielens
    return movielens.load(c.dataset, c.data_dir, c.manual_dir, c.fetch_wheel)
  from fmx.data import cross_surface
  return cross_surface.load_ml1m(c.data_dir, c.manual_dir, c.fetch_wheel)


def fingerprint(data, extra=None) -> str:
  """sha256 of the per-user events (ids, times, labels or ratings, actions) and the item side
  tables of `data`; with `extra` (a JSON-able value), of that digest and `extra` together."""
  if extra is not None:
    return hashlib.sha256((fingerprint(data) + json.dumps(extra, sort_keys=True)).encode()
                          ).hexdigest()
  h = hashlib.sha256(f"{data.name}:{data.num_users}:{data.num_items}".encode())
  for field in ("item_ids", "timestamps", "ratings", "labels", "actions"):
    for a in getattr(data, field, ()):
      h.update(f"{field}{a.shape}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
  for field in ("years", "genres", "item_surface", "item_genres", "item_year", "item_content"):
    if hasattr(data, field):
      h.update(np.ascontiguousarray(getattr(data, field)).tobytes())
  return h.hexdigest()
