"""`python -m fmx.main` end to end on real ML-100K: train, evaluate, resume; and bad input."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.input.max_len=20", "--config.evals.every_epochs=1", "--config.progress=False"]


def run(args, env_extra, check=True):
  env = {**os.environ, **env_extra}
  p = subprocess.run([sys.executable, "-m", "fmx.main", *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
  return p


@pytest.fixture
def env(manual_dir, data_dir):
  return {"FMX_MANUAL_DIR": manual_dir, "FMX_DATA_DIR": data_dir}


def test_train_evaluate_resume(tmp_path, env):
  workdir = tmp_path / "run"
  cfg = "--config=fmx/configs/ml100k_hstu.py:runlocal"
  first = run([cfg, f"--workdir={workdir}", "--config.num_epochs=2", *TINY], env)
  assert "results: hr@10=" in first.stdout
  r1 = json.loads((workdir / "results.json").read_text())
  steps_per_epoch = r1["steps"] // 2
  assert steps_per_epoch == 15  # ceil(943 / 64)
  second = run([cfg, f"--workdir={workdir}", "--config.num_epochs=3", *TINY], env)
  assert f"resumed from step {2 * steps_per_epoch}" in second.stderr
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  r2 = json.loads((workdir / "results.json").read_text())
  assert r2["steps"] == 3 * steps_per_epoch and r2["epoch"] == 3
  for key in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr",
              "hr@10_popular", "config", "dataset", "wall_s", "steps"):
    assert key in r2
  assert 0.0 <= r2["hr@10"] <= 1.0 and r2["dataset"] == "ml-100k"
  assert list((workdir / "tensorboard").iterdir())


def test_validation_protocol_selects_best_epoch(tmp_path, env):
  workdir = tmp_path / "val"
  run(["--config=fmx/configs/ml100k_sasrec.py:runlocal,validation", f"--workdir={workdir}",
       "--config.num_epochs=2", *TINY], env)
  r = json.loads((workdir / "results.json").read_text())
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  best = max(rows, key=lambda row: row["valid/ndcg@10"])
  assert r["epoch"] == best["epoch"] and r["hr@10"] == best["hr@10"]
  assert r["selected_by"].startswith("valid/ndcg@10")




def test_missing_dataset_is_one_clear_message(tmp_path, env):
  p = run(["--config=fmx/configs/ml100k_hstu.py:runlocal", f"--workdir={tmp_path / 'w'}",
           "--config.input.fetch_wheel=False"],
          {**env, "FMX_MANUAL_DIR": str(tmp_path / "empty"), "FMX_DATA_DIR": str(tmp_path / "d")},
          check=False)
  assert p.returncode == 2
  assert "pip download --no-deps recbole==1.2.1" in p.stderr
  assert "Traceback" not in p.stderr


@pytest.mark.parametrize("config", ["synthetic_fm", "ml1m_fm"])
def test_foundation_model_end_to_end(tmp_path, env, config, ml1m_cross_surface):
  workdir = tmp_path / config
  run([f"--config=fmx/configs/{config}.py:runlocal", f"--workdir={workdir}", "--config.progress=False"], env)
  r = json.loads((workdir / "results.json").read_text())
  spec_tasks, surfaces = r["fm_tasks"], r["surfaces"]
  ne = {k for k in r if k.startswith("ne/")}
  assert ne and all(f"auc/{k[3:]}" in r and f"rel_ne/{k[3:]}" in r for k in ne)
  assert {k.split("/")[1] for k in ne} == set(surfaces)  # every surface reported
  assert all(k.split("/")[2] in spec_tasks for k in ne)  # never the held-out task
  if config == "synthetic_fm":  # known structure: the sequential FM beats the baseline on average
    assert np.mean([v for k, v in r.items() if k.startswith("rel_ne/")]) < 0

  # the logging tier materialises the FM's TAEs once; a second run finds the version committed
  dataset = "ml-1m" if config == "ml1m_fm" else "synthetic"
  log_args = [f"--config=fmx/configs/logging_tier.py:{dataset}", f"--workdir={tmp_path / 'log'}",
              f"--config.fm_workdir={workdir}", f"--config.store={tmp_path / 'taes'}"]
  logged = run(log_args, env)
  assert "rows=" in logged.stdout and "rows=0" not in logged.stdout
  assert "already holds FM version 'v1'" in run(log_args, env).stderr

  # surface experts on this FM's materialised TAEs (the TAE carrier on ML-1M, KD on synthetic)
  variant = "tae" if config == "ml1m_fm" else "kd"
  expert_cfg = config.replace("_fm", "_expert")
  args = [f"--config=fmx/configs/{expert_cfg}.py:{variant},runlocal", f"--workdir={tmp_path / 'expert'}",
          f"--config.tae.store={tmp_path / 'taes'}", "--config.num_epochs=2", "--config.progress=False"]
  run(args, env)
  e = json.loads((tmp_path / "expert" / "results.json").read_text())
  unseen = set(e["tasks"]) - set(e["fm_tasks"])
  ne = {k[3:] for k in e if k.startswith("ne/")}
  assert {k.split("/")[0] for k in ne} == set(surfaces)  # one expert per surface
  assert {k.split("/")[1] for k in ne} >= unseen  # ...that also learns the task the FM never saw
  assert {k[6:] for k in e if k.startswith("fm/ne/")} == {k for k in ne if k.split("/")[1] not in unseen}
  assert all(0 < e[f"ne/{k}"] < 2 and 0 <= e[f"auc/{k}"] <= 1 for k in ne)
  assert e["carrier"] == ("tae" if variant == "tae" else "none") and e["kd_weight"] == (variant == "kd")
  again = run(args, env)  # finished: every surface resumes after its last step
  assert again.stderr.count("resumed from step") == len(surfaces)
  missing = run(args[:1] + [f"--workdir={tmp_path / 'x'}", f"--config.tae.store={tmp_path / 'none'}"],
                env, check=False)
  assert missing.returncode == 2 and "materialise them with the logging tier" in missing.stderr
  assert "Traceback" not in missing.stderr


def test_sharded_mesh_on_simulated_devices(tmp_path, env):
  """Batches over `data`, the item table row-sharded over `model`, on 4 simulated CPU devices."""
  workdir = tmp_path / "mesh"
  flags = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  run(["--config=fmx/configs/ml100k_hstu.py:runlocal", f"--workdir={workdir}", "--config.num_epochs=1",
       "--config.mesh.data=2", "--config.mesh.model=2", *TINY], flags)
  r = json.loads((workdir / "results.json").read_text())
  assert r["config"]["mesh"]["model"] == 2 and r["steps"] == 15 and 0 < r["hr@10"] <= 1
