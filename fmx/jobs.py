"""The one registry of what `python -m fmx.main` can run: `config.job` -> the module whose
`train_and_evaluate(config, workdir) -> results` runs it. Modules load on use, so a bad flag
fails before JAX and TensorFlow Datasets are imported."""

from __future__ import annotations

import importlib
import os

JOBS = {
    "retrieval": "fmx.train.retrieval",  # HSTU / SASRec next-item retrieval
    "fm": "fmx.train.fm",  # the foundation model (ranking, MTML, TAEs) and its baseline
    "expert": "fmx.train.expert",  # surface experts on materialised TAEs
    "logging": "fmx.hypercast.logging_tier",  # materialise an FM checkpoint's TAEs
    "event_log": "fmx.hypercast.event_log",  # replay a dataset into the HyperCast event log
    "fm_stream": "fmx.hypercast.fm_stream",  # the FM trained on the event log as it grows
    "logging_stream": "fmx.hypercast.logging_stream",  # log each new window's TAEs
    "logging_beam": "fmx.hypercast.logging_beam",  # log a range of windows with Apache Beam
    "expert_stream": "fmx.hypercast.expert_stream",  # experts trained on each new logged window
    "hypercast": "fmx.hypercast.pipeline",  # all four stages as processes, one supervisor
    "serve": "fmx.serving.service",  # the online FM and expert tiers as an HTTP service
}


def run(config, workdir: str) -> dict:
  """Runs `config.job` in `workdir` (created if needed) and returns its results."""
  if config.job not in JOBS:
    raise KeyError(config.job)
  os.makedirs(workdir, exist_ok=True)
  return importlib.import_module(JOBS[config.job]).train_and_evaluate(config, workdir)
