"""The streaming FM trainer through `python -m fmx.main`: killed at any moment, restarted, it has
trained every event of the log exactly once (the events counter and the weights say so)."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = ["--config.input.synthetic.num_users=60"]


def main(*args, fault=None):
  env = {k: v for k, v in os.environ.items() if k != "FMX_FAULT"}
  if fault:
    env["FMX_FAULT"] = fault
  return subprocess.run([sys.executable, "-m", "fmx.main", *args, *SMALL], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def stream(workdir, log, fault=None):
  return main("--config=fmx/configs/stream_fm.py:synthetic,runlocal", f"--workdir={workdir}",
              f"--config.stream.log_dir={log}", "--config.progress=False",
              "--config.checkpoint_every_steps=6", fault=fault)


@pytest.fixture(scope="module")
def log_and_reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("stream")
  p = main("--config=fmx/configs/event_log.py:synthetic", f"--workdir={root / 'log'}")
  assert p.returncode == 0, p.stderr[-2000:]
  log = json.loads((root / "log" / "results.json").read_text())
  assert log["closed"] and log["windows"] > 10
  p = stream(root / "ref", root / "log")
  assert p.returncode == 0, p.stderr[-2000:]
  ref = json.loads((root / "ref" / "results.json").read_text())
  assert ref["events"] == log["events"] - 60  # every event but each user's first (history only)
  return root / "log", ref


@pytest.mark.parametrize("fault", ["compile:0", "step:13", "checkpoint:18", "step:39"])
def test_killed_stream_trainer_trains_every_event_once(tmp_path, log_and_reference, fault):
  log, ref = log_and_reference
  killed = stream(tmp_path, log, fault=fault)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  again = stream(tmp_path, log)
  assert again.returncode == 0, again.stderr[-2000:]
  r = json.loads((tmp_path / "results.json").read_text())
  assert r["events"] == ref["events"] and r["steps"] == ref["steps"]
  assert r["params_sha256"] == ref["params_sha256"]  # the same events, in the same order, once
