"""The freshness ablation and the drift study of HyperCast, in one resumable command.

  python experiments/freshness.py --workdir=/tmp/fmx_freshness [--datasets=ml-1m,synthetic]
      [--seeds=3] [--delays=1,6,24] [--out=experiments/results]

Per dataset (the ML-1M stream, `hypercast_ml1m.py:runlocal` replayed as fast as it goes, a day
per window; the seeded synthetic surfaces in half-day windows, whose drifting users make
staleness matter) and seed:
  1. the HyperCast pipeline once per delay R (windows): the FM publishes a version every R
     windows (the TAEs of window w come from the version trained on the windows before
     (w // R) * R) and the experts train on windows in groups of R, scoring every window of a
     group before training on any. R = 1 is the freshest pipeline. Every R logs from window
     max(R) on, where the FM is the same for every R, so the experts start together. Seeds vary
     the FM's and the experts' initialisation, dropout and order; the stream is the same.
  2. the NE cost of each delay: the experts' progressive NE on the same windows for every R
     (from 2 max(R) on, where every delay's experts have trained on a whole group), relative to
     R = 1, per surface and task, mean ± std over seeds; `*` marks a cost whose per-window
     differences (each averaged over seeds, and over tasks for the mean) a Wilcoxon signed-rank
     test finds significant (p < 0.05). The paper's Table 2 reports +0.10%, +0.27%, +0.55% for
     1 h, 6 h and 24 h of delay.
  3. drift, on the run with R = `--drift-delay`: the logging tier's MMD tests between the TAEs of
     consecutive FM versions on the same impressions, per surface, on every publish; then the
     run's experts trained again on its closed store, without and with `stream.align` (TAEs
     aligned, per surface, to the moments of the TAEs the experts were given before), and their
     NE on the first window of every FM version they meet after their first.

Writes `<out>/freshness.md`, `<out>/freshness.csv` (one row per run, surface and task) and
`<out>/freshness_*.png`. Finished runs (results.json) are skipped; an unfinished one is run again
with the same command and its stages resume from their checkpoints and store positions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fmx.data import load as data_load  # noqa: E402
from fmx.hypercast import progressive, summary  # noqa: E402
from fmx.train import metrics, reporting  # noqa: E402

PAPER = {1: 0.10, 6: 0.27, 24: 0.55}  # arXiv 2508.02929 Table 2: NE cost (%) of 1/6/24 h delay
VARIANT = {"ml-1m": "runlocal", "synthetic": "synthetic"}
MODEL = "expert_follow_newest"


def _done(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, "results.json"))


def _run(cmd: list[str], log: str) -> None:
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "a") as f:
    p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if p.returncode != 0:
    sys.exit(f"freshness: {' '.join(cmd[2:4])} failed (exit {p.returncode}); see {log}, then "
             "rerun the same command to resume")


def run_pipeline(dataset: str, R: int, seed: int, workdir: str, args) -> None:
  if _done(workdir):
    return
  print(f"[{dataset}] R={R} seed={seed}: {workdir}", flush=True)
  flags = [f"--config.fm.stream.publish_every={R}", f"--config.experts.stream.update_every={R}",
           f"--config.fm.seed={seed}", f"--config.experts.seed={seed}",
           "--config.follow=('newest',)", "--config.progress=False", "--config.producer.speed=0",
           f"--config.logging.drift.enabled={R == args.drift_delay}",
           # every delay logs (and its experts start) at the same window, with the same FM
           f"--config.logging.stream.start_window={args.start}",
           "--config.fm.stream.keep_versions=100000"]  # the replays below read every version
  if dataset == "ml-1m":
    flags.append(f"--config.producer.max_windows={args.ml1m_windows}")
  else:  # half-day windows: 82 of them
    flags += ["--config.producer.max_windows=0", "--config.producer.window_seconds=43200"]
  flags += args.extra
  _run([sys.executable, "-m", "fmx.main", f"--config=fmx/configs/hypercast_ml1m.py:{VARIANT[dataset]}",
        f"--workdir={workdir}", *flags], os.path.join(workdir + ".log"))


def run_replays(workdir: str) -> None:
  """The run's experts trained again on its closed store, without and with alignment."""
  for name, align in (("experts_plain", False), ("experts_aligned", True)):
    out = os.path.join(workdir, name)
    if not _done(out):
      print(f"  {name}: {out}", flush=True)
      _run([sys.executable, "-m", "fmx.main", f"--config={workdir}/stages/experts.py",
            f"--workdir={out}", f"--config.stream.align={align}", "--config.progress=False"],
           out + ".log")


def per_window_ne(records, spec) -> dict[int, dict[str, float]]:
  """{window: {"surface/task": NE}} of the followed experts."""
  out = {}
  for rec in records:
    s = progressive.scores([rec], MODEL, spec)
    out[rec[0]] = {k[3:]: v for k, v in s.items() if k.startswith("ne/")}
  return out


def task_keys(spec) -> list[str]:
  return [f"{s}/{t}" for i, s in enumerate(spec.surfaces) for j, t in enumerate(spec.tasks)
          if spec.valid[i, j]]


def wilcoxon(diffs) -> float:
  diffs = [d for d in diffs if d == d]
  return float(stats.wilcoxon(diffs).pvalue) if len(diffs) > 5 and np.any(diffs) else float("nan")


def ablation(dataset: str, spec, runs: dict, delays, seeds, first: int,
             rows_csv: list) -> tuple[str, dict]:
  """The NE-cost table of one dataset and the plot's points: every run scored on the same
  windows (from `first` on, where every delay's experts have trained on a whole group)."""
  records = {key: [r for r in progressive.read_all(os.path.join(d, "experts", "progressive"))
                   if r[0] >= first] for key, d in runs.items()}
  common = set.intersection(*[{r[0] for r in recs} for recs in records.values()])
  records = {key: [r for r in recs if r[0] in common] for key, recs in records.items()}
  ne = {key: progressive.scores(recs, MODEL, spec) for key, recs in records.items()}
  windows = {key: per_window_ne(recs, spec) for key, recs in records.items()}
  keys = [k for k in task_keys(spec) if all(f"ne/{k}" in v for v in ne.values())]
  for (R, s), v in ne.items():
    fr = reporting.json_lines(os.path.join(runs[R, s], "freshness.jsonl"))
    for k in keys:
      rows_csv.append({"study": "delay", "dataset": dataset, "delay_windows": R, "seed": s,
                       "surface_task": k, "ne": v[f"ne/{k}"], "auc": v.get(f"auc/{k}"),
                       "ne_reference": ne[1, s][f"ne/{k}"], "windows": len(common),
                       "tae_staleness_windows": np.mean([f["tae_staleness_windows"] for f in fr
                                                          if f["window"] in common])})
  cost = lambda R, s, k: 100.0 * (ne[R, s][f"ne/{k}"] / ne[1, s][f"ne/{k}"] - 1.0)

  def window_diffs(R, ks):
    """Per window: the NE difference to R = 1, averaged over seeds and the tasks `ks`."""
    return [np.nanmean([windows[R, s][w].get(k, np.nan) - windows[1, s][w].get(k, np.nan)
                        for s in seeds for k in ks]) for w in sorted(common)]

  lines = ["| surface/task | NE at R=1 | " + " | ".join(f"cost at R={R}" for R in delays[1:]) + " |",
           "|---|---|" + "---|" * (len(delays) - 1)]
  points = {}
  for k in keys + ["mean"]:
    ks = keys if k == "mean" else [k]
    cells = []
    for R in delays[1:]:
      c = [np.mean([cost(R, s, kk) for kk in ks]) for s in seeds]
      p = wilcoxon(window_diffs(R, ks))
      if k == "mean":
        points[R] = (float(np.mean(c)), float(np.std(c)), p)
      cells.append(f"{np.mean(c):+.2f}% ± {np.std(c):.2f}{' *' if p < 0.05 else ''}")
    base = np.mean([ne[1, s][f"ne/{kk}"] for s in seeds for kk in ks])
    lines.append(f"| {'**mean**' if k == 'mean' else k} | {base:.4f} | " + " | ".join(cells) + " |")
  lines.append(f"\n{len(common)} windows ({min(common)}-{max(common)}); `*`: Wilcoxon "
               "signed-rank p < 0.05 over the windows' NE differences (each window's averaged "
               "over seeds, and over tasks for the mean)")
  return "\n".join(lines), points


def delays_table(dataset: str, runs: dict, delays, seeds, first: int) -> str:
  """How stale each run's experts and TAEs were, and the measured wall delays."""
  lines = ["| R (windows) | TAE staleness (windows, mean) | expert staleness (windows, mean) | "
           "data -> expert step (s, median) | FM publish -> first expert use (s, median) |",
           "|---|---|---|---|---|"]
  for R in delays:
    tae, upd, wall, pub = [], [], [], []
    for s in seeds:
      fr = [f for f in reporting.json_lines(os.path.join(runs[R, s], "freshness.jsonl"))
            if f["window"] >= first]
      tae += [f["tae_staleness_windows"] for f in fr]
      upd += [f["window"] % R + 1 for f in fr]  # windows since the last one trained on, + 1
      wall += [f["data_to_trainer_s"] for f in fr]
      r = json.load(open(os.path.join(runs[R, s], "results.json")))
      if r.get("delay/publish_to_experts_s") is not None:
        pub.append(r["delay/publish_to_experts_s"])
    lines.append(f"| {R} | {np.mean(tae):.2f} | {np.mean(upd):.2f} | {np.median(wall):.1f} | "
                 f"{np.median(pub) if pub else float('nan'):.1f} |")
  return "\n".join(lines)


def drift_study(dataset: str, spec, runs: dict, R: int, seeds, start: int,
                rows_csv: list) -> tuple[str, dict]:
  """MMD between consecutive versions per surface, and NE after a version change with and
  without alignment."""
  mmd = {}
  for s in seeds:
    for d in summary.drift_lines(runs[R, s]):
      mmd.setdefault((d["to"], d["surface"]), []).append(d)
  lines = ["| FM versions | " + " | ".join(f"{n}: MMD² (p)" for n in spec.surfaces) + " |",
           "|---|" + "---|" * len(spec.surfaces)]
  plot = {}
  for v in sorted({v for v, _ in mmd}):
    cells = []
    for n in spec.surfaces:
      ds = mmd.get((v, n), [])
      if not ds:
        cells.append("-")
        continue
      m, share = np.mean([d["mmd2"] for d in ds]), np.mean([d["p_value"] < 0.05 for d in ds])
      p = np.median([d["p_value"] for d in ds])
      cells.append(f"{m:.4f} (p̃={p:.2f}{', ' + str(int(round(share * len(ds)))) + f'/{len(ds)} sig.' if share else ''})")
      plot.setdefault(n, []).append((v, m))
    lines.append(f"| {v - 1} → {v} | " + " | ".join(cells) + " |")
  # alignment: the replays without and with it, on the first window of every new version
  keys = task_keys(spec)
  recs = {name: {s: progressive.read_all(os.path.join(runs[R, s], f"experts_{name}",
                                                      "progressive")) for s in seeds}
          for name in ("plain", "aligned")}
  changed = lambda w: w % R == 0 and w > start  # the experts met a new FM version at w
  after = {name: [r for s in seeds for r in recs[name][s] if changed(r[0])] for name in recs}
  per_w = {name: {s: per_window_ne(recs[name][s], spec) for s in seeds} for name in recs}
  ws = sorted({w for s in seeds for w in per_w["plain"][s] if changed(w)}
              & {w for s in seeds for w in per_w["aligned"][s]})
  diffs = [np.nanmean([per_w["aligned"][s][w].get(k, np.nan) - per_w["plain"][s][w].get(k, np.nan)
                       for s in seeds for k in keys]) for w in ws]
  p = wilcoxon(diffs)
  ne = {name: progressive.scores(rs, MODEL, spec) for name, rs in after.items()}
  common = [k for k in keys if f"ne/{k}" in ne["plain"] and f"ne/{k}" in ne["aligned"]]
  rel = [100 * (ne["aligned"][f"ne/{k}"] / ne["plain"][f"ne/{k}"] - 1) for k in common]
  for k in common:
    rows_csv.append({"study": "align", "dataset": dataset, "delay_windows": R, "seed": "all",
                     "surface_task": k, "ne": ne["aligned"][f"ne/{k}"],
                     "auc": ne["aligned"].get(f"auc/{k}"), "ne_reference": ne["plain"][f"ne/{k}"],
                     "windows": len(ws), "tae_staleness_windows": None})
  by_offset = {name: {} for name in recs}
  for name in recs:
    for s in seeds:
      for r in recs[name][s]:
        if r[0] >= start + R:  # every full version after the first the experts saw
          by_offset[name].setdefault(r[0] % R, []).append(r)
  curve = {name: [(o, metrics.ne_mean(progressive.scores(rs, MODEL, spec)))
                  for o, rs in sorted(d.items())] for name, d in by_offset.items()}
  table = ["| surface/task | NE, first window of a new version | with alignment | change |",
           "|---|---|---|---|"]
  table += [f"| {k} | {ne['plain'][f'ne/{k}']:.4f} | {ne['aligned'][f'ne/{k}']:.4f} | "
            f"{r:+.2f}% |" for k, r in zip(common, rel)]
  table.append(f"| **mean** | | | {np.mean(rel):+.2f}% (Wilcoxon over the {len(ws)} windows, each "
               f"averaged over seeds and tasks: p = {p:.3g}) |")
  offsets = " ".join(f"{o}: {a:.4f} vs {b:.4f};" for (o, a), (_, b) in
                     zip(curve["plain"], curve["aligned"]))
  text = "\n".join(lines) + "\n\n" + "\n".join(table) + (
      f"\n\nMean NE over tasks by window offset within an FM version (without vs with "
      f"alignment): {offsets}")
  return text, {"mmd": plot, "curve": curve, "rel_mean": float(np.mean(rel)), "p": p}


def plots(out: str, points: dict, drift: dict, delays) -> None:
  try:
    import matplotlib
  except ImportError:
    print("freshness: no plots (pip install 'fmx[experiments]')", file=sys.stderr)
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for dataset, pts in points.items():
    xs = [1] + list(delays[1:])
    ys = [0.0] + [pts[R][0] for R in delays[1:]]
    es = [0.0] + [pts[R][1] for R in delays[1:]]  # mean ± std over seeds
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"fmx {dataset} (windows)")
  ax.plot(list(PAPER), list(PAPER.values()), "k--", marker="s", label="paper (hours)")
  ax.set_xscale("log")
  ax.set_xlabel("delay")
  ax.set_ylabel("NE cost (%)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "freshness_delay.png"), dpi=100)
  plt.close(fig)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for dataset, d in drift.items():
    for surface, pts in d["mmd"].items():
      axes[0].plot(*zip(*pts), marker=".", label=f"{dataset} {surface}")
    for name, pts in d["curve"].items():
      axes[1].plot(*zip(*pts), marker="o", linestyle="-" if name == "plain" else "--",
                   label=f"{dataset} {name}")
  axes[0].set_xlabel("FM version")
  axes[0].set_ylabel("MMD² to the previous version")
  axes[0].legend(fontsize=6)
  axes[1].set_xlabel("window offset in a new FM version")
  axes[1].set_ylabel("expert NE (mean over tasks)")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "freshness_drift.png"), dpi=100)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--datasets", default="ml-1m,synthetic")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--delays", default="1,6,24")
  ap.add_argument("--drift-delay", type=int, default=6, help="the R of the drift study")
  ap.add_argument("--ml1m-windows", type=int, default=100, help="ML-1M days replayed")
  ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
  ap.add_argument("--extra", action="append", default=[],
                  help="a further flag for every pipeline, e.g. --extra=--config.poll_seconds=0.1")
  args = ap.parse_args()
  delays = sorted(int(x) for x in args.delays.split(","))
  if delays[0] != 1 or args.drift_delay not in delays:
    sys.exit("freshness: --delays must start at 1 and include --drift-delay")
  seeds = list(range(args.seeds))
  datasets = args.datasets.split(",")
  args.start = max(delays)  # every delay logs from here; compare from a group later
  first = 2 * max(delays)
  runs = {}
  for dataset in datasets:
    for seed in seeds:
      for R in delays:
        runs[dataset, R, seed] = os.path.join(args.workdir, dataset, f"R{R}", f"seed{seed}")
        run_pipeline(dataset, R, seed, runs[dataset, R, seed], args)
      run_replays(runs[dataset, args.drift_delay, seed])
  os.makedirs(args.out, exist_ok=True)
  rows_csv, points, drift, sections = [], {}, {}, []
  for dataset in datasets:
    c = json.load(open(os.path.join(runs[dataset, 1, 0], "results.json")))["config"]
    from ml_collections import ConfigDict
    spec = data_load.load(ConfigDict(c["fm"]["input"]), "surfaces").spec
    mine = {(R, s): runs[dataset, R, s] for R in delays for s in seeds}
    table, points[dataset] = ablation(dataset, spec, mine, delays, seeds, first, rows_csv)
    dtext, drift[dataset] = drift_study(dataset, spec, mine, args.drift_delay, seeds, args.start,
                                        rows_csv)
    sections.append(
        f"## {dataset}\n\n### NE cost of delay (relative to R = 1)\n\n{table}\n\n"
        f"### How stale each run was (windows {first} on)\n\n"
        f"{delays_table(dataset, mine, delays, seeds, first)}\n\n"
        f"### Drift between FM versions (R = {args.drift_delay}) and moment alignment\n\n{dtext}\n")
  paper = " | ".join(f"+{v:.2f}% ({h} h)" for h, v in PAPER.items())
  ours = "\n".join(f"| fmx {d} | 0 (R = 1, the reference) | " + " | ".join(
      f"{points[d][R][0]:+.2f}% ± {points[d][R][1]:.2f}{' *' if points[d][R][2] < 0.05 else ''}"
      f" (R = {R})" for R in delays[1:]) + " |" for d in datasets)
  head = " | ".join(f"delay {R}" for R in delays)
  md = (f"# Freshness and drift\n\nProduced by `python experiments/freshness.py "
        f"--workdir=DIR --datasets={args.datasets} --seeds={args.seeds} --delays={args.delays}`"
        f" ({len(seeds)} seeds; ML-1M: the first {args.ml1m_windows} days of 35% of the users, a "
        "day per window; synthetic: 300 users, half-day windows). R is the delay in windows: the "
        "FM publishes a version every R windows and the experts update every R windows (scoring "
        f"a whole group of R windows before training on it). Every R logs from window "
        f"{args.start} on (the FM there is the same for every R) and is scored on the windows "
        f"from {first} on, where every delay's experts have trained on a whole group. Costs are "
        "the followed experts' progressive NE relative to R = 1, mean ± std over seeds.\n\n"
        f"| | {head} |\n|---|" + "---|" * len(delays) + f"\n| paper (Table 2) | {paper} |\n{ours}\n\n"
        "The paper's delays are hours of a production stream, relative to real time; ours are "
        "windows (days on ML-1M), relative to R = 1.\n\n" + "\n".join(sections)
        + "\n![NE cost against delay](freshness_delay.png)\n\n"
        "![MMD over versions; NE around a version change](freshness_drift.png)\n")
  with open(os.path.join(args.out, "freshness.md"), "w") as f:
    f.write(md)
  with open(os.path.join(args.out, "freshness.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows_csv[0]))
    w.writeheader()
    w.writerows(rows_csv)
  plots(args.out, points, drift, delays)
  print(md)


if __name__ == "__main__":
  main()
