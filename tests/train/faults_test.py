"""Runs that never lie or lose work: `python -m fmx.main` killed at every moment of a run, with
damaged checkpoints, a shared workdir, a non-finite loss and a changed config. Each case ends
with the metrics of an uninterrupted run, or with one clear line and exit status 2.

A tiny synthetic retrieval run (200 users, 4 steps per epoch, 3 epochs) keeps each run short;
`FMX_FAULT=point:step[:SIGNAL]` (fmx.train.loop.fault_point) kills it at a chosen moment.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--config=fmx/configs/ml100k_hstu.py:runlocal", "--config.input.dataset=synthetic",
        "--config.input.max_len=20", "--config.evals.every_epochs=1", "--config.progress=False"]
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@200", "mrr", "epoch", "steps")


def run(workdir, *extra, epochs=3, fault=None, check=True, background=False):
  env = {k: v for k, v in os.environ.items() if k != "FMX_FAULT"}
  if fault:
    env["FMX_FAULT"] = fault
  cmd = [sys.executable, "-m", "fmx.main", *TINY, f"--workdir={workdir}",
         f"--config.num_epochs={epochs}", *extra]
  if background:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  if check and p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
  return p


def results(workdir):
  r = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  return {k: r[k] for k in METRICS}


def metric_steps(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["step"] for line in lines]


def one_error_line(p, *needles):
  assert p.returncode == 2, p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  line = [l for l in p.stderr.splitlines() if l.startswith("fmx: error:")]
  assert len(line) == 1, p.stderr
  for n in needles:
    assert n in line[0], line[0]
  return line[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  run(workdir)
  assert metric_steps(workdir) == [4, 8, 12]
  return results(workdir)


def damage(workdir, step, how):
  """Flips a byte in, or truncates, the largest array file of `step`'s parameters."""
  files = [f for f in (pathlib.Path(workdir) / "checkpoints" / str(step) / "params").rglob("*")
           if f.is_file() and "/d/" in str(f)]
  target = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(target.read_bytes())
  if how == "flip":
    data[len(data) // 2] ^= 0xFF
  else:
    data = data[: len(data) // 2]
  target.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["compile:0", "step:6", "after_eval:8", "checkpoint:8"])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, reference, fault):
  killed = run(tmp_path, fault=fault, check=False)
  assert killed.returncode == -signal.SIGKILL
  unfinished = [p.name.split(".")[0] for p in (tmp_path / "checkpoints").glob("*.orbax-checkpoint-tmp*")]
  again = run(tmp_path)
  for step in unfinished:  # a step killed while being written is named, then ignored
    assert f"checkpoint step {step} in" in again.stderr and "was never finished" in again.stderr
  assert results(tmp_path) == reference
  assert metric_steps(tmp_path) == [4, 8, 12]  # the row written before the kill is not repeated


def test_sigterm_saves_and_resumes(tmp_path, reference):
  stopped = run(tmp_path, fault="step:6:SIGTERM", check=False)
  assert stopped.returncode == 128 + signal.SIGTERM
  # the signal lands after step 6; step 7, already under way, finishes and is saved
  assert "stopped by SIGTERM at step 7; checkpoint saved" in stopped.stderr
  again = run(tmp_path)
  assert "resumed from step 7" in again.stderr
  assert results(tmp_path) == reference and metric_steps(tmp_path) == [4, 8, 12]


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_newest_step_falls_back_to_an_intact_one(tmp_path, reference, how):
  run(tmp_path, epochs=2)  # keeps steps 4 and 8
  damage(tmp_path, 8, how)
  p = run(tmp_path)
  assert "checkpoint step 8" in p.stderr and "is damaged" in p.stderr
  assert "resumed from step 4" in p.stderr
  assert len(list((tmp_path / "checkpoints").glob("damaged-8-*"))) == 1  # set aside, kept
  assert results(tmp_path) == reference and metric_steps(tmp_path) == [4, 8, 12]


def test_no_intact_step_is_one_message(tmp_path):
  run(tmp_path, epochs=2)
  damage(tmp_path, 8, "truncate")
  damage(tmp_path, 4, "flip")
  one_error_line(run(tmp_path, check=False), "no intact checkpoint", "damaged steps: [8, 4]")


def test_finished_run_reruns_without_new_rows(tmp_path, reference):
  run(tmp_path)
  again = run(tmp_path)
  assert "resumed from step 12" in again.stderr
  assert results(tmp_path) == reference and metric_steps(tmp_path) == [4, 8, 12]
  shorter = run(tmp_path, epochs=2, check=False)  # would report 3 epochs' weights as 2
  one_error_line(shorter, "checkpoint at step 12, past this config's 8 steps")


def test_second_run_on_a_workdir_is_refused(tmp_path):
  first = run(tmp_path, epochs=400, background=True)
  try:
    deadline = time.time() + 120
    while not (tmp_path / "checkpoints").is_dir() and time.time() < deadline:
      time.sleep(0.2)
    second = run(tmp_path, check=False)
    one_error_line(second, f"in use by process {first.pid}")
  finally:
    first.kill()
    first.wait()


@pytest.mark.parametrize("override", ["--config.loss.temperature=0", "--config.optimizer.lr=1e30"])
def test_non_finite_loss_stops_the_run(tmp_path, override):
  p = run(tmp_path, override, check=False)
  one_error_line(p, "non-finite training loss", "at step")
  assert not (tmp_path / "results.json").exists()
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # nothing non-finite is saved


def test_resume_checks_the_config(tmp_path, reference):
  run(tmp_path, epochs=2)
  one_error_line(run(tmp_path, "--config.seed=3", check=False), "seed=42 (now 3)",
                 "resume_anyway")
  one_error_line(run(tmp_path, "--config.input.batch_size=32", check=False),
                 "input.batch_size=64 (now 32)")
  one_error_line(run(tmp_path, "--config.model.dim=32", check=False), "other shapes",
                 "model.dim (50 -> 32)")
  run(tmp_path)  # only the length changed: resumes
  assert results(tmp_path) == reference
  run(tmp_path, "--config.seed=3", "--config.resume_anyway=True", epochs=4)
  r = json.loads((tmp_path / "results.json").read_text())
  assert r["config"]["seed"] == 3
  assert r["config_changes"] == [{"step": 12, "changed": {"seed": [42, 3]}}]


def test_step_cadence_checkpoints_and_evaluates_mid_epoch(tmp_path, reference):
  cadence = ("--config.checkpoint_every_steps=3", "--config.evals.every_steps=6")
  run(tmp_path, *cadence)
  assert metric_steps(tmp_path) == [4, 6, 8, 12]
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [9, 12]
  shutil.rmtree(tmp_path / "checkpoints" / "12")  # lose the newest: resume mid-epoch from 9
  again = run(tmp_path, *cadence)
  assert "resumed from step 9" in again.stderr  # a mid-epoch checkpoint, with its position
  assert results(tmp_path) == reference
  assert metric_steps(tmp_path) == [4, 6, 8, 12]
