"""Throughput and peak memory of the offline logging tier: the in-process tier and Apache Beam
(DirectRunner, multi-processing) with 1 and 2 workers, on the same windows of a HyperCast run.

  python experiments/bench/logging_throughput.py --hypercast=DIR [--workers=1,2] [--tmp=/tmp/lt]

DIR is a finished `hypercast_ml1m.py` run whose FM kept every version it published
(--config.fm.stream.keep_versions=1000), so every window can be logged again. Each path logs
every window of the run into a fresh store of its own, as the real job
(`python -m fmx.main`, the run's own logging stage config for the in-process tier, and
`fmx/configs/logging_beam.py` for Beam), in a subprocess whose peak resident memory is read
from `getrusage` (the largest process, workers included). Rows are store rows (one per
impression and follower); the wall time is the whole job, start-up included. It checks that
every store equals the run's own, shard for shard. Run it alone: it times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from fmx.data import tae_store  # noqa: E402


def measured(cmd: list[str], log: str) -> tuple[float, float]:
  """(wall seconds, peak RSS in MB of the largest process) of `cmd`, run in a fresh parent."""
  probe = ("import resource, subprocess, sys, time; t = time.time(); "
           f"p = subprocess.run({cmd!r}, cwd={ROOT!r}, stdout=open({log!r}, 'w'), "
           "stderr=subprocess.STDOUT); "
           "print(p.returncode, time.time() - t, "
           "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
  code, wall, rss = out.stdout.split()
  if code != "0":
    sys.exit(f"logging_throughput: {' '.join(cmd[2:4])} failed (exit {code}); see {log}")
  return float(wall), float(rss)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--hypercast", required=True)
  ap.add_argument("--workers", default="1,2")
  ap.add_argument("--tmp", default="/tmp/logging_throughput")
  args = ap.parse_args()
  hc = os.path.abspath(args.hypercast)
  shutil.rmtree(args.tmp, ignore_errors=True)
  os.makedirs(args.tmp)
  dataset = json.load(open(os.path.join(hc, "results.json")))["dataset"]
  runs = [("in-process", 1, [
      sys.executable, "-m", "fmx.main", f"--config={hc}/stages/logging.py",
      f"--workdir={args.tmp}/inprocess", f"--config.stream.store={args.tmp}/store-inprocess",
      "--config.drift.enabled=False", "--config.stream.idle_seconds=1"])]
  for w in (int(x) for x in args.workers.split(",")):
    runs.append(("beam", w, [
        sys.executable, "-m", "fmx.main",
        f"--config=fmx/configs/logging_beam.py:{'synthetic' if dataset == 'synthetic' else 'ml-1m'}",
        f"--workdir={args.tmp}/beam{w}", f"--config.stream.log_dir={hc}/log",
        f"--config.stream.snapshots={hc}/snapshots", f"--config.stream.store={args.tmp}/store-beam{w}",
        f"--config.pipeline_options=('--direct_running_mode=multi_processing', "
        f"'--direct_num_workers={w}', '--default_sdk_harness_log_level=ERROR')"]))
  print(f"{'path':<12}{'workers':>8}{'windows':>9}{'rows':>9}{'wall s':>9}{'rows/s':>9}"
        f"{'peak RSS MB':>13}  same store as the run")
  for name, w, cmd in runs:
    tag = "inprocess" if name == "in-process" else f"beam{w}"
    wall, rss = measured(cmd, f"{args.tmp}/{tag}.log")
    store = f"{args.tmp}/store-{tag}"
    windows = tae_store.windows(store)
    rows = sum(tae_store.version_meta(store, tae_store.window_version(x))["rows"] for x in windows)
    theirs = os.path.join(hc, "store")
    same = windows == tae_store.windows(theirs) and all(
        tae_store.version_meta(store, tae_store.window_version(x))
        == tae_store.version_meta(theirs, tae_store.window_version(x)) for x in windows)
    print(f"{name:<12}{w:>8}{len(windows):>9}{rows:>9}{wall:>9.1f}{rows / wall:>9.0f}{rss:>13.0f}"
          f"  {'yes' if same else 'NO'}", flush=True)


if __name__ == "__main__":
  main()
