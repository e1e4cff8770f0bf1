"""What every run writes into its workdir: metrics.jsonl, results.json and TensorBoard events."""

from __future__ import annotations

import json
import os
import time

import tensorboardX

from fmx import distributed, files


class RunReporter:
  """Writes one run's reports. `resume_step` rewinds them to a restored checkpoint: rows of
  metrics.jsonl past it are dropped and TensorBoard hides events past it, so no row repeats.
  In a run of several processes the primary reports; the others' reporters do nothing."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = distributed.is_primary()
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self.start = time.time()
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        rows = [line for line in f if _step(line) <= resume_step]
      files.atomic_write(path, "".join(rows))
    self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.active:
      return
    for k, v in values.items():
      self.tb.add_scalar(k, v, step)

  def evaluation(self, step: int, epoch: int, wall_s: float, metrics: dict[str, float]) -> None:
    """Appends one JSON line to metrics.jsonl and mirrors it to TensorBoard."""
    if not self.active:
      return
    row = {"step": step, "epoch": epoch, "wall_s": round(wall_s, 2), **metrics}
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
    self.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    self.tb.flush()

  def close(self) -> None:
    if self.active:
      self.tb.close()


def _step(line: str) -> float:
  """The step of a metrics.jsonl row; a torn last line (a killed write) counts as past any."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")


def write_results(workdir: str, results: dict) -> str:
  """Writes `workdir/results.json` atomically (the primary process of a run writes it)."""
  path = os.path.join(workdir, "results.json")
  if distributed.is_primary():
    files.atomic_write(path, json.dumps(results, indent=1, sort_keys=True))
  return path


def json_lines(path: str) -> list[dict]:
  """The JSON objects of a `.jsonl` file ([] if there is none), skipping a line a kill cut
  short."""
  out = []
  if os.path.exists(path):
    for line in open(path):
      try:
        out.append(json.loads(line))
      except ValueError:
        continue
  return out


def read_results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)
