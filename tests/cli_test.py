"""Bad input to `python -m fmx.main` ends in one line naming the problem and exit status 2,
before any data is read; the ML-100K `runlocal` run prints what the README shows."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNLOCAL = "--config=fmx/configs/ml100k_hstu.py:runlocal"

# The ML-100K runlocal results (commit cbc0f62, jax 0.10.2, 2-core x86-64 CPU). Float summation
# order (a tiled attention, a fused loss) and the host CPU's vector width move the last digits,
# and with them, now and then, one user's target across a cut-off: each of the 943 users weighs
# 1/943 in every metric, so the results must match within two users' weight.
USERS = 943
GOLDEN = {"hr@10": 0.14634146341463414, "ndcg@10": 0.0737511164020249,
          "hr@50": 0.3860021208907741, "ndcg@50": 0.12543168253807668,
          "hr@200": 0.6998939554612937, "ndcg@200": 0.17250284090160076, "mrr": 0.06640041333692034,
          "hr@10_popular": 0.08589607635206786, "steps": 180, "epoch": 12}


def run(*args, env=None):
  return subprocess.run([sys.executable, "-m", "fmx.main", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=env)


@pytest.mark.parametrize("args, needle", [
    ([RUNLOCAL, "--config.model.nonexistent=3"], "unknown config key 'nonexistent'"),
    (["--config=fmx/configs/nope.py"], "fmx/configs/nope.py: cannot load it"),
    (["--config=fmx/configs/ml100k_hstu.py:runlocl"], "unknown config variant(s) ['runlocl']"),
    (["--config=fmx/configs/ml1m_expert.py:tae,ue"], "pick one knowledge carrier"),
    ([RUNLOCAL, "--config.input.batch_size=0"], "--config.input.batch_size=0: expected an integer >= 1"),
    ([RUNLOCAL, "--config.evals.every_epochs=0"], "--config.evals.every_epochs=0"),
    ([RUNLOCAL, "--config.input.batch_size=abc"], "--config.input.batch_size=abc"),
    ([RUNLOCAL, "--config.optimizer.lr=nan"], "--config.optimizer.lr=nan: expected a finite number"),
    ([RUNLOCAL, "--config.input.dataset=ml-2m"], "--config.input.dataset='ml-2m'"),
    ([RUNLOCAL, "--config.job=nope"], "config.job='nope'"),
    ([RUNLOCAL, "extra"], "unexpected arguments"),
    (["--config=fmx/configs/logging_tier.py:synthetic", "--config.fm_version=../v1"],
     "'../v1'"),
    (["--config=fmx/configs/logging_tier.py:synthetic", "--config.fm_workdir=/nonexistent"],
     "no FM checkpoint in /nonexistent/checkpoints: train the FM first"),
    ([RUNLOCAL, "--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
     "cannot join the run's processes: --coordinator_address needs"),
    ([RUNLOCAL, "--config.model.compute_dtype=float16"],
     "--config.model.compute_dtype='float16': expected 'float32' or 'bfloat16'"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
  p = run(*args, f"--workdir={tmp_path / 'w'}")
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert p.stderr.strip().count("\n") == 0 and needle in p.stderr, p.stderr


@pytest.mark.parametrize("workdir, needle", [("", "--workdir is empty"),
                                              ("FILE", "cannot create it"),
                                              (None, "--workdir is required")])
def test_unusable_workdir(tmp_path, workdir, needle):
  (tmp_path / "FILE").write_text("")
  args = [RUNLOCAL] + ([] if workdir is None else
                       [f"--workdir={tmp_path / workdir if workdir else ''}"])
  p = run(*args)
  assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_ml100k_runlocal_metrics_unchanged(tmp_path, manual_dir, data_dir):
  import os
  env = {**os.environ, "FMX_MANUAL_DIR": manual_dir, "FMX_DATA_DIR": data_dir}
  p = run(RUNLOCAL, f"--workdir={tmp_path}", "--config.progress=False", env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads((tmp_path / "results.json").read_text())
  assert {k: r[k] for k in GOLDEN} == pytest.approx(GOLDEN, abs=2 / USERS)
  assert (r["steps"], r["epoch"]) == (180, 12)
  assert "step 60 (epoch 4): hr@10=" in p.stdout
  printed = dict(kv.split("=") for kv in p.stdout.split("results: ")[1].splitlines()[0].split())
  assert sorted(printed) == ["hr@10", "hr@10_popular", "mrr", "mrr_popular", "ndcg@10",
                             "ndcg@10_popular"]
  assert all(printed[k] == f"{r[k]:.4f}" for k in printed)
