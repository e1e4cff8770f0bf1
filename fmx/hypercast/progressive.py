"""Progressive validation, as streaming recommenders are evaluated: every model scores each new
window before it trains on it, so every prediction is on data the model has not seen.

A stage writes one record per window, `window-<w:06d>.npz`, atomically and at most once (a
restarted stage finds it and moves on): arrays `probs/<model> [M, num_tasks]` for each model it
trains, the shared `labels`, `valid` (bool) `[M, num_tasks]` and `surfaces [M]`, plus `info`, a
JSON object (wall time of the evaluation, events, FM version...).
"""

from __future__ import annotations

import io
import json
import os
import pathlib

import numpy as np

from fmx import files
from fmx.train import metrics


def path(root: os.PathLike | str, window: int) -> pathlib.Path:
  return pathlib.Path(root) / f"window-{window:06d}.npz"


def done(root: os.PathLike | str, window: int) -> bool:
  return path(root, window).is_file()


def write(root: os.PathLike | str, window: int, arrays: dict[str, np.ndarray], info: dict) -> None:
  pathlib.Path(root).mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, info=np.array(json.dumps(info)), **arrays)
  files.atomic_write(path(root, window), buf.getvalue())


def info(root: os.PathLike | str, window: int) -> dict:
  with np.load(path(root, window)) as z:
    return json.loads(str(z["info"]))


def read_all(root: os.PathLike | str) -> list[tuple[int, dict, dict]]:
  """(window, arrays, info) of every record in `root`, in window order."""
  out = []
  for p in sorted(pathlib.Path(root).glob("window-*.npz")):
    with np.load(p) as z:
      arrays = {k: z[k] for k in z.files if k != "info"}
      out.append((int(p.stem.split("-")[1]), arrays, json.loads(str(z["info"]))))
  return out


def models(records) -> list[str]:
  return sorted({k.split("/", 1)[1] for _, a, _ in records for k in a if k.startswith("probs/")})


def concat(records, model: str) -> dict[str, np.ndarray] | None:
  """The records holding `model`, concatenated: probs, labels, valid, surfaces."""
  parts = [a for _, a, _ in records if f"probs/{model}" in a]
  if not parts:
    return None
  return {"probs": np.concatenate([a[f"probs/{model}"] for a in parts]),
          **{k: np.concatenate([a[k] for a in parts]) for k in ("labels", "valid", "surfaces")}}


def scores(records, model: str, spec, tasks=None) -> dict[str, float]:
  """NE, AUC, calibration and counts per surface and task of `model` over `records`."""
  c = concat(records, model)
  if c is None:
    return {}
  return metrics.surface_task_metrics(c["probs"], c["labels"], c["valid"], c["surfaces"], spec,
                                      tasks)
