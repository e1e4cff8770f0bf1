"""`experiments.transfer` end to end on tiny synthetic data: every stage, tables, resume."""

import csv
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_transfer_study_end_to_end(tmp_path):
  cmd = [sys.executable, "-m", "experiments.transfer", f"--workdir={tmp_path / 'w'}",
         f"--out={tmp_path / 'out'}", "--datasets=synthetic", "--seeds=2", "--fm-variant=runlocal",
         "--early-epochs=1", "--late-epochs=2", "--surfaces=s1", "--kd-weights=0.5,1", "--quick"]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  md = (tmp_path / "out" / "transfer.md").read_text()
  for section in ("Knowledge carriers", "Transfer ratios", "Unseen tasks"):
    assert f"### {section}" in md
  assert "| s1/comment |" in md and "| s1/click |" in md
  assert "KD weight, picked by the held-out users' NE (seed 0)" in md
  assert (tmp_path / "out" / "transfer.png").stat().st_size > 10_000
  rows = list(csv.DictReader(open(tmp_path / "out" / "transfer.csv")))
  runs = {(r["fm"], r["carrier"], r["seed"]) for r in rows}
  assert len(runs) == 2 * 6  # 2 seeds x (5 carriers on the late FM + TAE on the early FM)
  assert {r["task"] for r in rows} == {"click", "like", "s1_share", "comment"}
  store = tmp_path / "w" / "synthetic" / "taes"
  assert sorted(f.relative_to(store).as_posix() for f in store.rglob("*.array_record")) == [
      f"{v}/shard-{i:05d}.array_record" for v in ("early", "late") for i in range(2)]
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "] expert " not in again.stdout and "] FM " not in again.stdout  # nothing retrained
