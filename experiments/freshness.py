"""The freshness ablation and the drift study of HyperCast, in one resumable command.

  python experiments/freshness.py --workdir=/tmp/fmx_freshness [--datasets=ml-1m,synthetic]
      [--seeds=3] [--delays=1,6,24] [--out=experiments/results]

Per dataset (the ML-1M stream, `hypercast_ml1m.py:runlocal` replayed as fast as it goes, a day
per window; the seeded synthetic surfaces, whose drifting users make staleness matter) and seed:
  1. the HyperCast pipeline once per delay R (windows): the FM publishes a version every R
     windows (the TAEs of window w come from the version trained on the windows before
     (w // R) * R) and the experts train on windows in groups of R, scoring every window of a
     group before training on any. R = 1 is the freshest pipeline. Seeds vary the FM's and the
     experts' initialisation, dropout and order; the stream is the same.
  2. the NE cost of each delay: the experts' progressive NE on the windows every R scores
     (from the largest R on), relative to R = 1, per surface and task, mean ± std over seeds;
     `*` marks a cost whose per-window differences (all seeds) a Wilcoxon signed-rank test finds
     significant (p < 0.05). The paper's Table 2 reports +0.10%, +0.27%, +0.55% for 1 h, 6 h and
     24 h of delay.
  3. drift, on the run with R = `--drift-delay`: the logging tier's MMD tests between the TAEs of
     consecutive FM versions on the same impressions, per surface, on every publish; then the
     same experts trained again on that run's store with `stream.align` (TAEs of a new version
     aligned to the moments the experts trained on), and their NE in the first windows of each
     new version against the run without alignment.

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
from fmx.train import metrics  # noqa: E402

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
           f"--config.logging.drift.enabled={R == args.drift_delay}"]
  if dataset == "ml-1m":
    flags.append(f"--config.producer.max_windows={args.ml1m_windows}")
  flags += args.extra
  _run([sys.executable, "-m", "fmx.main", f"--config=fmx/configs/hypercast_ml1m.py:{VARIANT[dataset]}",
        f"--workdir={workdir}", *flags], os.path.join(workdir + ".log"))


def run_aligned(workdir: str) -> str:
  out = os.path.join(workdir, "experts_aligned")
  if not _done(out):
    print(f"  aligned experts: {out}", flush=True)
    _run([sys.executable, "-m", "fmx.main", f"--config={workdir}/stages/experts.py",
          f"--workdir={out}", "--config.stream.align=True", "--config.progress=False"],
         out + ".log")
  return out


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


def ablation(dataset: str, spec, runs: dict, delays, seeds, rows_csv: list) -> tuple[str, dict]:
  """The NE-cost table of one dataset and the plot's points."""
  first = max(delays)  # every delay's experts score the windows from here on
  records = {(R, s): [r for r in progressive.read_all(os.path.join(runs[R, s], "experts",
                                                                   "progressive")) if r[0] >= first]
             for R in delays for s in seeds}
  ne = {key: progressive.scores(recs, MODEL, spec) for key, recs in records.items()}
  windows = {key: per_window_ne(recs, spec) for key, recs in records.items()}
  keys = [k for k in task_keys(spec) if all(f"ne/{k}" in ne[R, s] for R in delays for s in seeds)]
  for (R, s), v in ne.items():
    fr = summary._json_lines(os.path.join(runs[R, s], "freshness.jsonl"))
    for k in keys:
      rows_csv.append({"study": "delay", "dataset": dataset, "delay_windows": R, "seed": s,
                       "surface_task": k, "ne": v[f"ne/{k}"], "auc": v.get(f"auc/{k}"),
                       "tae_staleness_windows": np.mean([f["tae_staleness_windows"] for f in fr
                                                          if f["window"] >= first])})
  cost = lambda R, s, k: 100.0 * (ne[R, s][f"ne/{k}"] / ne[1, s][f"ne/{k}"] - 1.0)
  lines = [f"| surface/task | NE at R=1 | " + " | ".join(f"cost at R={R}" for R in delays[1:]) + " |",
           "|---|---|" + "---|" * (len(delays) - 1)]
  points = {}
  for k in keys + ["mean"]:
    cells = []
    for R in delays[1:]:
      if k == "mean":
        c = [np.mean([cost(R, s, kk) for kk in keys]) for s in seeds]
        diffs = [windows[R, s][w][kk] - windows[1, s][w][kk] for s in seeds for kk in keys
                 for w in windows[R, s] if kk in windows[R, s][w] and kk in windows[1, s].get(w, {})]
        points[R] = (float(np.mean(c)), float(np.std(c)))
      else:
        c = [cost(R, s, k) for s in seeds]
        diffs = [windows[R, s][w][k] - windows[1, s][w][k] for s in seeds for w in windows[R, s]
                 if k in windows[R, s][w] and k in windows[1, s].get(w, {})]
      p = stats.wilcoxon(diffs).pvalue if len(diffs) > 5 and np.any(diffs) else 1.0
      cells.append(f"{np.mean(c):+.2f}% ± {np.std(c):.2f}{' *' if p < 0.05 else ''}")
    base = (np.mean([ne[1, s][f"ne/{k}"] for s in seeds]) if k != "mean" else
            np.mean([ne[1, s][f"ne/{kk}"] for s in seeds for kk in keys]))
    lines.append(f"| {'**mean**' if k == 'mean' else k} | {base:.4f} | " + " | ".join(cells) + " |")
  return "\n".join(lines), points


def delays_table(dataset: str, runs: dict, delays, seeds, first: int) -> str:
  """How stale each run's experts and TAEs were, and the measured wall delays."""
  lines = ["| R (windows) | TAE staleness (windows, mean) | expert staleness (windows, mean) | "
           "data -> expert step (s, median) | FM publish -> first expert use (s, median) |",
           "|---|---|---|---|---|"]
  for R in delays:
    tae, upd, wall, pub = [], [], [], []
    for s in seeds:
      fr = [f for f in summary._json_lines(os.path.join(runs[R, s], "freshness.jsonl"))
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


def drift_study(dataset: str, spec, runs: dict, R: int, seeds, rows_csv: list) -> tuple[str, dict]:
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
  # alignment: NE of the first windows of each new version (offset 0 = the first window)
  keys = task_keys(spec)
  by_offset = {"plain": {}, "aligned": {}}
  diffs, after = [], {"plain": [], "aligned": []}
  for s in seeds:
    plain = progressive.read_all(os.path.join(runs[R, s], "experts", "progressive"))
    aligned = progressive.read_all(os.path.join(runs[R, s], "experts_aligned", "progressive"))
    for name, recs in (("plain", plain), ("aligned", aligned)):
      for rec in recs:
        w = rec[0]
        if w // R >= 2:
          by_offset[name].setdefault(w % R, []).append(rec)
          if w % R == 0:
            after[name].append(rec)
    wp, wa = per_window_ne(plain, spec), per_window_ne(aligned, spec)
    diffs += [wa[w][k] - wp[w][k] for w in wp if w % R == 0 and w // R >= 2 and w in wa
              for k in keys if k in wp[w] and k in wa[w]]
  ne = {name: progressive.scores(recs, MODEL, spec) for name, recs in after.items()}
  common = [k for k in keys if f"ne/{k}" in ne["plain"] and f"ne/{k}" in ne["aligned"]]
  rel = [100 * (ne["aligned"][f"ne/{k}"] / ne["plain"][f"ne/{k}"] - 1) for k in common]
  p = stats.wilcoxon(diffs).pvalue if len(diffs) > 5 else float("nan")
  for k in common:
    rows_csv.append({"study": "align", "dataset": dataset, "delay_windows": R, "seed": "all",
                     "surface_task": k, "ne": ne["aligned"][f"ne/{k}"],
                     "auc": ne["plain"][f"ne/{k}"], "tae_staleness_windows": None})
  curve = {name: [(o, metrics.ne_mean(progressive.scores(recs, MODEL, spec)))
                  for o, recs in sorted(d.items())] for name, d in by_offset.items()}
  table = ["| surface/task | NE, first window of a new version | with alignment | change |",
           "|---|---|---|---|"]
  table += [f"| {k} | {ne['plain'][f'ne/{k}']:.4f} | {ne['aligned'][f'ne/{k}']:.4f} | "
            f"{r:+.2f}% |" for k, r in zip(common, rel)]
  table.append(f"| **mean** | | | {np.mean(rel):+.2f}% (Wilcoxon over windows × tasks × seeds: "
               f"p = {p:.3g}, n = {len(diffs)}) |")
  offsets = " ".join(f"{o}: {a:.4f} vs {b:.4f};" for (o, a), (_, b) in
                     zip(curve["plain"], curve["aligned"]))
  text = "\n".join(lines) + "\n\n" + "\n".join(table) + (
      f"\n\nMean NE by window offset within a version (plain vs aligned): {offsets}")
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
    es = [0.0] + [pts[R][1] for R in delays[1:]]
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
  runs = {}
  for dataset in datasets:
    for seed in seeds:
      for R in delays:
        runs[dataset, R, seed] = os.path.join(args.workdir, dataset, f"R{R}", f"seed{seed}")
        run_pipeline(dataset, R, seed, runs[dataset, R, seed], args)
      run_aligned(runs[dataset, args.drift_delay, seed])
  os.makedirs(args.out, exist_ok=True)
  rows_csv, points, drift, sections = [], {}, {}, []
  for dataset in datasets:
    c = json.load(open(os.path.join(runs[dataset, 1, 0], "results.json")))["config"]
    from ml_collections import ConfigDict
    spec = data_load.load(ConfigDict(c["fm"]["input"]), "surfaces").spec
    mine = {(R, s): runs[dataset, R, s] for R in delays for s in seeds}
    table, points[dataset] = ablation(dataset, spec, mine, delays, seeds, rows_csv)
    dtext, drift[dataset] = drift_study(dataset, spec, mine, args.drift_delay, seeds, rows_csv)
    sections.append(
        f"## {dataset}\n\n### NE cost of delay (relative to R = 1, windows from {max(delays)} on)"
        f"\n\n{table}\n\n### How stale each run was\n\n"
        f"{delays_table(dataset, mine, delays, seeds, max(delays))}\n\n"
        f"### Drift between FM versions (R = {args.drift_delay}) and moment alignment\n\n{dtext}\n")
  paper = " | ".join(f"+{v:.2f}% ({h} h)" for h, v in PAPER.items())
  ours = "\n".join(f"| fmx {d} | 0 (R = 1, reference) | " + " | ".join(
      f"{points[d][R][0]:+.2f}% ± {points[d][R][1]:.2f} (R = {R})" for R in delays[1:]) + " |"
      for d in datasets)
  md = (f"# Freshness and drift\n\nProduced by `python experiments/freshness.py "
        f"--workdir=DIR --datasets={args.datasets} --seeds={args.seeds} --delays={args.delays}`"
        f" ({len(seeds)} seeds; ML-1M: {args.ml1m_windows} days of 35% of the users, a day per "
        "window; synthetic: 40 windows of 300 users). R is the delay in windows: the FM "
        "publishes every R windows and the experts update every R windows. Costs are the "
        "followed experts' progressive NE relative to R = 1, mean ± std over seeds, averaged "
        "over every surface and task for the summary; `*`: Wilcoxon p < 0.05 over the "
        "per-window differences of all seeds.\n\n"
        "| | delay 1 | delay 6 | delay 24 |\n|---|---|---|---|\n"
        f"| paper (Table 2) | {paper} |\n{ours}\n\n"
        "The paper's delays are hours of a production stream; ours are windows (days on ML-1M)."
        "\n\n" + "\n".join(sections) + "\n![NE cost against delay](freshness_delay.png)\n\n"
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
