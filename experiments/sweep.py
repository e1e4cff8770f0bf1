"""Sweeps: configs x overrides x seeds, each run through `fmx.main` in its own workdir.

  python -m experiments.sweep experiments/sweeps/NAME.py --workdir=DIR [--workers=1]
      [--only=REGEX] [--out=experiments/results] [--table-only]

A sweep file defines `get_sweep()`, returning a dict:
  name       the output files' stem (`<out>/<name>.md`, `.csv`, `.runs.csv`, `.png`);
  title      the markdown heading; `notes`: markdown put under it (the protocol);
  metrics    the `results.json` keys tabulated, in order; `plot`: the metrics.jsonl keys plotted;
  reference  the row every other row is tested against (Welch t-test over seeds);
  rows       a list of dicts: `name` (a slug: the run directory), `label`, `config`
             (`path.py:variant`), `overrides` (`{"key.path": value}`, passed as
             `--config.key.path=value`), `seeds`, and optionally `published` (`{metric: value}`).

Each run is `python -m fmx.main --config=... --workdir=DIR/<row>/seed<k> --config.seed=<k> ...`
with its output in `DIR/<row>/seed<k>/sweep.log`; at most `--workers` run at once. Runs may span
several sittings: rerun the same command. A run with a `results.json` is finished and skipped;
any other resumes from its newest checkpoint (fmx.main refuses to resume one whose config changed).
The table is written after every sitting from the runs finished so far and names the missing ones.
Every finished run's `results.json` and `metrics.jsonl` are also kept in `<out>/<name>_runs/<row>/
seed<k>/`, the record: commit it beside the table, and a sitting in a new workdir (another
machine, a later session) takes the recorded runs as finished and rebuilds the same table.
SIGINT/SIGTERM stop the running runs at a checkpoint and start no new ones. Exit status: 0 if
every selected run finished, 1 if some failed (their logs are named), 2 for bad input, 128 +
the signal if stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import importlib.util
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

from fmx import files
from fmx.train import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"name", "label", "config", "overrides", "seeds", "published"}


class SweepError(ValueError):
  """A sweep file that cannot be run; the message says what to fix."""


# ---------------------------------------------------------------------------- the sweep file


def load(path: str) -> dict:
  """The checked `get_sweep()` of a sweep file."""
  if not os.path.isfile(path):
    raise SweepError(f"{path}: no such sweep file (they live in experiments/sweeps/)")
  spec = importlib.util.spec_from_file_location("_sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    sweep = module.get_sweep()
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f"{path}: {type(e).__name__}: {e}") from None
  for key in ("name", "title", "metrics", "reference", "rows"):
    if key not in sweep:
      raise SweepError(f"{path}: get_sweep() lacks '{key}'")
  names = [r.get("name") for r in sweep["rows"]]
  for row in sweep["rows"]:
    unknown = set(row) - ROW_KEYS
    if unknown or not {"name", "config", "seeds"} <= set(row):
      raise SweepError(f"{path}: row {row.get('name')!r} needs name, config and seeds "
                       f"(unknown keys: {sorted(unknown)})")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", row["name"]):
      raise SweepError(f"{path}: row name {row['name']!r} must be a lowercase slug")
    config_file = row["config"].split(":")[0]
    if not os.path.isfile(os.path.join(ROOT, config_file)):
      raise SweepError(f"{path}: row {row['name']!r}: no config file {config_file}")
  if len(set(names)) != len(names):
    raise SweepError(f"{path}: row names repeat")
  if sweep["reference"] not in names:
    raise SweepError(f"{path}: reference {sweep['reference']!r} is not a row")
  return sweep


def runs(sweep: dict, only: str = "") -> list[tuple[dict, int]]:
  """(row, seed) pairs, seed-major: every row's first seed before any row's second."""
  rows = [r for r in sweep["rows"] if not only or re.search(only, r["name"])]
  depth = max((len(r["seeds"]) for r in rows), default=0)
  return [(r, r["seeds"][i]) for i in range(depth) for r in rows if i < len(r["seeds"])]


def run_dir(workdir: str, row: dict, seed: int) -> str:
  return os.path.join(workdir, row["name"], f"seed{seed}")


def finished(run_workdir: str) -> bool:
  """A run is finished when fmx.main has written its results.json (the last thing it does)."""
  return os.path.isfile(os.path.join(run_workdir, "results.json"))


RECORDED = ("metrics.jsonl", "results.json")  # results.json last: it marks the run finished


def sync_record(sweep: dict, workdir: str, record: str) -> None:
  """Copies each finished run from the workdir to the record, or from the record to a workdir
  that lacks it."""
  for row, seed in runs(sweep):
    work, kept = run_dir(workdir, row, seed), run_dir(record, row, seed)
    src, dst = (work, kept) if finished(work) else (kept, work)
    if not finished(src) or finished(dst):
      continue
    os.makedirs(dst, exist_ok=True)
    for name in RECORDED:
      if os.path.isfile(os.path.join(src, name)):
        with open(os.path.join(src, name), "rb") as f:
          files.atomic_write(os.path.join(dst, name), f.read())


def command(row: dict, seed: int, run_workdir: str) -> list[str]:
  flag = lambda v: v if isinstance(v, str) else repr(v)
  return ([sys.executable, "-m", "fmx.main", f"--config={row['config']}",
           f"--workdir={run_workdir}", f"--config.seed={seed}"]
          + [f"--config.{k}={flag(v)}" for k, v in row.get("overrides", {}).items()])


# ---------------------------------------------------------------------------- running


class Runner:
  """Runs subprocesses with at most `workers` at once; SIGINT/SIGTERM are passed on to them
  (each checkpoints and stops) and no new run starts."""

  def __init__(self, workers: int):
    self.workers = workers
    self.procs: set[subprocess.Popen] = set()
    self.lock = threading.Lock()
    self.stopping = 0  # the signal that stopped the sweep

  def stop(self, signum, frame):
    self.stopping = signum
    with self.lock:
      for p in self.procs:
        p.send_signal(signal.SIGTERM)

  def run(self, cmd: list[str], log_path: str) -> tuple[int, str] | None:
    """(exit status, this sitting's output) of `cmd`, its output appended to `log_path`; None if
    the runner was stopping and did not start it."""
    with self.lock:
      if self.stopping:
        return None
      os.makedirs(os.path.dirname(log_path), exist_ok=True)
      log = open(log_path, "a")
      log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
      log.flush()
      start = log.tell()
      p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)  # a terminal's Ctrl-C reaches it through us
      self.procs.add(p)
    try:
      status = p.wait()
    finally:
      with self.lock:
        self.procs.discard(p)
      log.close()
    with open(log_path, errors="replace") as f:
      f.seek(start)
      return status, f.read()


def run_sweep(sweep: dict, workdir: str, workers: int, only: str = "") -> tuple[list[str], int]:
  """Runs every unfinished run; returns the failed runs' log paths and the signal that stopped
  the sweep (0 if none did)."""
  todo = [(row, seed) for row, seed in runs(sweep, only)
          if not finished(run_dir(workdir, row, seed))]
  done = len(runs(sweep, only)) - len(todo)
  print(f"sweep {sweep['name']}: {done} run(s) finished before, {len(todo)} to run "
        f"({workers} at a time)", flush=True)
  runner = Runner(workers)
  previous = {s: signal.signal(s, runner.stop) for s in (signal.SIGINT, signal.SIGTERM)}
  failed = []

  def one(row, seed):
    path = run_dir(workdir, row, seed)
    t = time.time()
    ran = runner.run(command(row, seed, path), os.path.join(path, "sweep.log"))
    if ran is None:
      return
    status, output = ran
    resumed = re.search(r"fmx: resumed from step (\d+)", output)
    how = f"resumed from step {resumed.group(1)}, " if resumed else ""
    if status == 0 and finished(path):
      print(f"  done  {row['name']} seed {seed} ({how}{time.time() - t:.0f} s)", flush=True)
    elif runner.stopping and status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
      print(f"  stop  {row['name']} seed {seed} (checkpointed; {how}{time.time() - t:.0f} s)",
            flush=True)
    else:
      failed.append(os.path.join(path, "sweep.log"))
      print(f"  FAIL  {row['name']} seed {seed} (exit {status}; {how}see {path}/sweep.log)",
            flush=True)

  try:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for future in [pool.submit(one, row, seed) for row, seed in todo]:
        future.result()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if runner.stopping:
    print("sweep stopped: the running runs saved checkpoints; rerun the same command to resume",
          flush=True)
  return failed, runner.stopping


# ---------------------------------------------------------------------------- statistics


def mean_std(x, fmt: str = ".4f") -> str:
  """`mean ± std` (sample std; 0 for one value)."""
  x = [float(v) for v in x]
  std = statistics.stdev(x) if len(x) > 1 else 0.0
  return f"{statistics.fmean(x):{fmt}} ± {std:{fmt.lstrip('+')}}"


def welch_p(a, b) -> float:
  """Welch's t-test p-value of two samples (nan with fewer than 2 values on either side)."""
  from scipy import stats
  if len(a) < 2 or len(b) < 2:
    return float("nan")
  return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def mark(p: float) -> str:
  """`†` for a difference a test does not find significant (p >= 0.05, or untestable)."""
  return "" if p < 0.05 else " †"


# ---------------------------------------------------------------------------- tables and plots


def seconds_per_epoch(metrics: list[dict]) -> float:
  """The median wall seconds per epoch between consecutive evaluations of one sitting
  (evaluation time included); nan if there are none."""
  rates = [(b["wall_s"] - a["wall_s"]) / (b["epoch"] - a["epoch"])
           for a, b in zip(metrics, metrics[1:])
           if b["epoch"] > a["epoch"] and b["wall_s"] > a["wall_s"]]
  return statistics.median(rates) if rates else float("nan")


def collect(sweep: dict, workdir: str) -> list[dict]:
  """One record per finished run: row, seed, the sweep's metrics, epoch, s/epoch."""
  out = []
  for row, seed in runs(sweep):
    path = run_dir(workdir, row, seed)
    if not finished(path):
      continue
    res = reporting.read_results(path)
    metrics = reporting.json_lines(os.path.join(path, "metrics.jsonl"))
    out.append({"row": row["name"], "seed": seed,
                **{m: res.get(m, float("nan")) for m in sweep["metrics"]},
                "epoch": res.get("epoch"), "selected_by": res.get("selected_by", ""),
                "s_per_epoch": round(seconds_per_epoch(metrics), 2)})
  return out


def table(sweep: dict, records: list[dict]) -> tuple[list[str], list[dict]]:
  """The markdown lines and the CSV rows (mean and std per metric) of the sweep."""
  metrics = sweep["metrics"]
  by_row = {r["name"]: [x for x in records if x["row"] == r["name"]] for r in sweep["rows"]}
  ref = by_row[sweep["reference"]]
  head = ["model", "seeds"] + list(metrics) + ["s/epoch"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  csv_rows = []
  for row in sweep["rows"]:
    got = by_row[row["name"]]
    if not got:
      continue
    published = row.get("published", {})
    cells = [row.get("label", row["name"]), str(len(got))]
    flat = {"row": row["name"], "label": row.get("label", row["name"]), "seeds": len(got)}
    for m in metrics:
      values = [x[m] for x in got]
      cell = mean_std(values)
      p = float("nan")
      if row["name"] != sweep["reference"]:
        p = welch_p(values, [x[m] for x in ref])
        cell += mark(p)
      if m in published:
        cell += f" ({statistics.fmean(values) - published[m]:+.4f})"
      cells.append(cell)
      flat[f"{m}_mean"] = statistics.fmean(values)
      flat[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
      flat[f"{m}_published"] = published.get(m, float("nan"))
      flat[f"{m}_p"] = p
    spe = [x["s_per_epoch"] for x in got if not math.isnan(x["s_per_epoch"])]
    cells.append(f"{statistics.fmean(spe):.1f}" if spe else "n/a")
    flat["s_per_epoch"] = statistics.fmean(spe) if spe else float("nan")
    lines.append("| " + " | ".join(cells) + " |")
    csv_rows.append(flat)
    if published:
      lines.append("| " + " | ".join(["↳ published", ""] + [
          f"{published[m]:.4f}" if m in published else "" for m in metrics] + [""]) + " |")
  return lines, csv_rows


def plot(sweep: dict, workdir: str, path: str) -> bool:
  """Each `plot` metric against epoch, one line per row (mean over seeds, a min-max band);
  False, with a note, without matplotlib (`pip install -e ".[experiments]"`)."""
  try:
    import matplotlib
  except ImportError:
    print("sweep: no plot: matplotlib is not installed (pip install -e \".[experiments]\")",
          file=sys.stderr)
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = sweep.get("plot", ())
  curves = {}
  for row, seed in runs(sweep):
    for rec in reporting.json_lines(os.path.join(run_dir(workdir, row, seed), "metrics.jsonl")):
      for k in keys:
        if k in rec:
          curves.setdefault((k, row["name"]), {}).setdefault(rec["epoch"], []).append(rec[k])
  if not curves:
    return False
  fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
  for ax, k in zip(axes[0], keys):
    for row in sweep["rows"]:
      points = curves.get((k, row["name"]))
      if not points:
        continue
      epochs = sorted(points)
      mean = [statistics.fmean(points[e]) for e in epochs]
      line, = ax.plot(epochs, mean, label=row.get("label", row["name"]))
      ax.fill_between(epochs, [min(points[e]) for e in epochs], [max(points[e]) for e in epochs],
                      color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(k)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(f"{sweep['title']}: mean over seeds, band from min to max")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write_tables(sweep: dict, sweep_file: str, workdir: str, out: str) -> str:
  """Writes `<out>/<name>.md`, `.csv`, `.runs.csv` and `.png`; returns the markdown path."""
  records = collect(sweep, workdir)
  lines, csv_rows = table(sweep, records)
  missing = [f"{row['name']} seed {seed}" for row, seed in runs(sweep)
             if not finished(run_dir(workdir, row, seed))]
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, sweep["name"])
  has_plot = plot(sweep, workdir, stem + ".png")
  rel = os.path.relpath(sweep_file, ROOT)
  md = [f"# {sweep['title']}", "",
        f"Produced by `python -m experiments.sweep {rel} --workdir=DIR` (the sweep file lists "
        "every run's config and overrides).", "", sweep.get("notes", "").strip(), "",
        f"Mean ± sample std over seeds. † marks a difference from **{sweep['reference']}** that "
        "a Welch t-test over seeds does not find significant (p ≥ 0.05; always with one seed). "
        "(±x.xxxx): the difference from the published value, given on the row below. s/epoch: "
        "wall seconds per epoch between evaluations, evaluation included, on the machine that "
        "ran it.", ""] + lines + [""]
  if has_plot:
    md += [f"![learning curves]({sweep['name']}.png)", ""]
  md += ([f"Not finished yet ({len(missing)}): " + ", ".join(missing) + ".", ""] if missing
         else [])
  files.atomic_write(stem + ".md", "\n".join(md))
  for path, rows in ((stem + ".csv", csv_rows), (stem + ".runs.csv", records)):
    if rows:
      with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
      os.replace(path + ".tmp", path)
  return stem + ".md"


# ---------------------------------------------------------------------------- command line


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("sweep_file", help="experiments/sweeps/NAME.py")
  p.add_argument("--workdir", required=True, help="the runs live in WORKDIR/<row>/seed<k>")
  p.add_argument("--workers", type=int, default=1, help="runs at once (each uses every core)")
  p.add_argument("--only", default="", help="regex: run only the rows whose name matches")
  p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  p.add_argument("--table-only", action="store_true", help="tabulate the finished runs, run none")
  args = p.parse_args(argv)

  def fail(message):
    print(f"sweep: error: {message}", file=sys.stderr)
    return 2

  if args.workers < 1:
    return fail("--workers must be at least 1")
  try:
    sweep = load(args.sweep_file)
    if args.only:
      re.compile(args.only)
  except (SweepError, re.error) as e:
    return fail(f"--only: {e}" if isinstance(e, re.error) else str(e))
  failed, stopped = [], 0
  record = os.path.join(args.out, sweep["name"] + "_runs")
  try:
    os.makedirs(args.workdir, exist_ok=True)
    if not args.table_only:  # tabulating only reads finished runs: it may run beside a sitting
      with files.exclusive(os.path.join(args.workdir, ".sweep.lock"), f"sweep {args.workdir}"):
        sync_record(sweep, args.workdir, record)
        failed, stopped = run_sweep(sweep, args.workdir, args.workers, args.only)
    sync_record(sweep, args.workdir, record)
    md = write_tables(sweep, args.sweep_file, args.workdir, args.out)
  except (files.LockedError, OSError) as e:
    return fail(str(e))
  print(f"wrote {md}", flush=True)
  if failed:
    print(f"{len(failed)} run(s) failed; their logs: " + ", ".join(failed), file=sys.stderr)
    return 1
  return 128 + stopped if stopped else 0


if __name__ == "__main__":
  sys.exit(main())
