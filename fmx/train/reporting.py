"""What every run writes into its workdir: metrics.jsonl, results.json and TensorBoard events."""

from __future__ import annotations

import json
import os
import time

import tensorboardX


class RunReporter:

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self.start = time.time()
    self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    for k, v in values.items():
      self.tb.add_scalar(k, v, step)

  def evaluation(self, step: int, epoch: int, wall_s: float, metrics: dict[str, float]) -> None:
    """Appends one JSON line to metrics.jsonl and mirrors it to TensorBoard."""
    row = {"step": step, "epoch": epoch, "wall_s": round(wall_s, 2), **metrics}
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
    self.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    self.tb.flush()

  def close(self) -> None:
    self.tb.close()


def write_results(workdir: str, results: dict) -> str:
  """Writes `workdir/results.json` atomically (write, then rename)."""
  path = os.path.join(workdir, "results.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return path


def read_results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)
