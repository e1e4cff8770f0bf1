"""`experiments.sweep` end to end on synthetic data: a sweep over three sittings, one killed."""

import csv
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

SWEEP = """
SMALL = {"input.dataset": "synthetic", "num_epochs": 2, "evals.every_epochs": 1}
def get_sweep():
  return dict(name="tiny", title="Tiny sweep", metrics=("hr@10", "ndcg@10"), plot=("hr@10",),
              reference="hstu", notes="Synthetic sequences, two epochs.",
              rows=[dict(name="hstu", label="HSTU", config="fmx/configs/ml100k_hstu.py:runlocal",
                         seeds=(0, 1), overrides=SMALL, published={"hr@10": 0.5}),
                    dict(name="sasrec", label="SASRec",
                         config="fmx/configs/ml100k_sasrec.py:runlocal", seeds=(0,),
                         overrides={**SMALL, "input.length_buckets": ()})])
"""


def sweep(tmp_path, *args, env=None, workdir="w"):
  cmd = [sys.executable, "-m", "experiments.sweep", str(tmp_path / "tiny.py"),
         f"--workdir={tmp_path / workdir}", f"--out={tmp_path / 'out'}", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, **(env or {})})


def test_a_half_finished_sweep_resumes_without_rerunning_finished_runs(tmp_path):
  (tmp_path / "tiny.py").write_text(SWEEP)
  first = sweep(tmp_path, "--only=^hstu$")  # sitting 1: the HSTU rows only
  assert first.returncode == 0, first.stderr[-3000:]
  assert "0 run(s) finished before, 2 to run" in first.stdout
  finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "hstu").glob("seed*/results.json")}
  assert len(finished) == 2

  # sitting 2: the SASRec run is killed while saving its last checkpoint (step 8; the
  # one of its first epoch, step 4, is complete)
  second = sweep(tmp_path, env={"FMX_FAULT": "checkpoint:8"})
  assert second.returncode == 1
  assert "2 run(s) finished before, 1 to run" in second.stdout
  assert "FAIL  sasrec seed 0" in second.stdout and "sasrec/seed0/sweep.log" in second.stderr
  md = (tmp_path / "out" / "tiny.md").read_text()
  assert "Not finished yet (1): sasrec seed 0." in md and "| HSTU | 2 |" in md

  third = sweep(tmp_path)  # sitting 3: only the killed run, resumed from its checkpoint
  assert third.returncode == 0, third.stderr[-3000:]
  assert "2 run(s) finished before, 1 to run" in third.stdout
  assert "done  sasrec seed 0 (resumed from step 4," in third.stdout and "hstu seed" not in third.stdout
  assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not rerun
  log = (tmp_path / "w" / "sasrec" / "seed0" / "sweep.log").read_text()
  assert log.count("# ") == 2 and "fmx: resumed from step" in log

  md = (tmp_path / "out" / "tiny.md").read_text()
  assert "Not finished" not in md
  assert "| SASRec | 1 |" in md and "| ↳ published |  | 0.5000 |" in md
  assert "![learning curves](tiny.png)" in md and (tmp_path / "out" / "tiny.png").stat().st_size > 5000
  rows = list(csv.DictReader(open(tmp_path / "out" / "tiny.csv")))
  assert [(r["row"], r["seeds"]) for r in rows] == [("hstu", "2"), ("sasrec", "1")]
  hstu = rows[0]
  assert float(hstu["hr@10_std"]) > 0  # two different seeds
  runs = list(csv.DictReader(open(tmp_path / "out" / "tiny.runs.csv")))
  assert sorted((r["row"], r["seed"]) for r in runs) == [("hstu", "0"), ("hstu", "1"), ("sasrec", "0")]
  assert all(r["epoch"] == "2" for r in runs)

  # the record (committed beside the table) stands in for a lost workdir: nothing reruns
  assert sorted(p.parent.name for p in (tmp_path / "out" / "tiny_runs").glob("*/seed*/results.json")) == [
      "seed0", "seed0", "seed1"]
  elsewhere = sweep(tmp_path, workdir="w2")
  assert elsewhere.returncode == 0 and "3 run(s) finished before, 0 to run" in elsewhere.stdout
  assert (tmp_path / "out" / "tiny.md").read_text() == md


def test_bad_input_is_one_line_and_exit_2(tmp_path):
  (tmp_path / "bad.py").write_text("def get_sweep():\n  return dict(name='x')\n")
  for args in ([str(tmp_path / "missing.py")], [str(tmp_path / "bad.py")]):
    p = subprocess.run([sys.executable, "-m", "experiments.sweep", *args,
                        f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("sweep: error:")
