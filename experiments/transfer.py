"""The knowledge-transfer study of arXiv 2508.02929 on our data, in one resumable command.

  python -m experiments.transfer --workdir=/tmp/fmx_transfer [--datasets=ml-1m,synthetic]
      [--seeds=3] [--out=experiments/results]

Per dataset (the cross-surface MovieLens-1M view; seeded synthetic surfaces):
  1. two FMs of one run: `early` (after `--early-epochs`) and `late` (the same run continued to
     `--late-epochs`), each a finished `job="fm"` workdir;
  2. the logging tier materialises both FMs' TAEs (valid and test windows) into one store,
     tagged `early` / `late`;
  3. surface experts (`job="expert"`, every surface) for every seed: on the late FM with each
     knowledge carrier (none, ue, kd, tae, tae+ue), and with TAE on the early FM. The KD weight
     is tuned first: each of `--kd-weights` is trained on seed 0 and the one with the lowest NE
     on the held-out users (the experts' own selection split) is used for every seed;
  4. tables: knowledge carriers (NE relative to the expert alone, AUC), transfer ratios
     TR = (NE(Expert_early) - NE(Expert_late)) / (NE(FM_early) - NE(FM_late)) with the FM gap,
     and the unseen tasks; mean ± std over seeds, with `†` marking differences a Welch t-test
     does not find significant (p >= 0.05). The FM is trained once per dataset; seeds vary the
     experts' initialisation, dropout and order.

Writes `<out>/transfer.md`, `<out>/transfer.csv` (one row per run, surface and task) and
`<out>/transfer.png`. Every stage resumes: finished runs (results.json) are skipped, unfinished
ones continue from their checkpoints.

It shares `experiments.sweep`'s rule for a finished run and its statistics (mean ± std, Welch
t-test, the † mark), but runs its stages in this process rather than as sweep rows: each stage
needs the one before it (the logging tier reads the FMs, every expert reads the KD weight the
tuning picked), and most runs here take seconds, which a subprocess per run would double.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil

import numpy as np

from experiments import sweep
from fmx.configs import expert as expert_configs, foundation as fm_configs
from fmx.data import tae_store
from fmx.hypercast import logging_tier
from fmx.runtime import fm as fm_runtime
from fmx.train import expert as expert_train, fm as fm_train, reporting

# the expert config's carriers (fmx.configs.common.CARRIERS and kd), in table and plot order
CARRIERS = ("none", "ue", "kd", "tae", "tae+ue")
assert set(CARRIERS) == set(expert_configs.VARIANTS) - {"runlocal"}
LABELS = {"none": "expert alone", "ue": "+UE", "kd": "+KD", "tae": "+TAE", "tae+ue": "+TAE+UE"}


def train_fms(dataset: str, root: str, args) -> dict[str, str]:
  """The early and late FM workdirs, trained (or resumed) as needed."""
  dirs = {"early": os.path.join(root, "fm", "early"), "late": os.path.join(root, "fm", "late")}
  for name, epochs in (("early", args.early_epochs), ("late", args.late_epochs)):
    c = fm_configs.get_config(dataset, args.fm_variant + ",nobaseline")
    c.num_epochs, c.progress = epochs, args.progress
    if sweep.finished(dirs[name]):
      continue
    if name == "late" and not os.path.isdir(os.path.join(dirs["late"], "checkpoints")):
      # the late FM continues the early one's run (same seed, same stream)
      shutil.copytree(os.path.join(dirs["early"], "checkpoints"),
                      os.path.join(dirs["late"], "checkpoints"))
    print(f"[{dataset}] FM {name}: {epochs} epoch(s) in {dirs[name]}", flush=True)
    fm_train.train_and_evaluate(c, dirs[name])
  return dirs


def log_taes(root: str, fms: dict[str, str]) -> None:
  """The logging tier, once per FM version: materialises the valid and test TAEs of the FM in
  `fms[version]` (its newest checkpoint) into the store `<root>/taes`, tagged `version`."""
  store = os.path.join(root, "taes")
  for version in ("early", "late"):
    if version in tae_store.versions(store):
      continue
    fm = fm_runtime.restore(fms[version])
    logging_tier.materialise(fm, store, version, splits=("valid", "test"),
                             batch_size=fm.config.evals.batch_size)


def expert_config(dataset: str, carrier: str, fm_dir: str, version: str, seed: int, root: str, args):
  c = expert_configs.get_config(dataset, carrier + (",runlocal" if args.quick else ""), fm_dir)
  c.seed, c.progress = seed, args.progress
  c.tae.store, c.tae.fm_version = os.path.join(root, "taes"), version
  if args.surfaces:
    c.surfaces = tuple(args.surfaces.split(","))
  c.input.synthetic = fm_configs.get_config(dataset, args.fm_variant).input.synthetic  # as the FM's
  return c


def expert_dir(root: str, version: str, carrier: str, seed: int, kd_weight: float = 0.0) -> str:
  name = f"kd-w{kd_weight:g}" if carrier == "kd" else carrier
  return os.path.join(root, "experts", version, name, f"seed{seed}")


def train_expert(dataset, root, fms, args, version, carrier, seed, kd_weight=0.0) -> str:
  workdir = expert_dir(root, version, carrier, seed, kd_weight)
  if not sweep.finished(workdir):
    print(f"[{dataset}] expert {carrier}{f' (weight {kd_weight:g})' if carrier == 'kd' else ''} "
          f"on FM {version}, seed {seed}", flush=True)
    c = expert_config(dataset, carrier, fms[version], version, seed, root, args)
    c.kd_weight = kd_weight
    expert_train.train_and_evaluate(c, workdir)
  return workdir


def select_ne(workdir: str) -> float:
  """The held-out users' mean NE at the selected epoch, averaged over the surfaces' experts."""
  res = reporting.read_results(workdir)
  best = []
  for surface in res["surfaces"]:
    with open(os.path.join(workdir, surface, "metrics.jsonl")) as f:
      best.append(min(json.loads(line)["valid/ne_mean"] for line in f))
  return float(np.mean(best))


def tune_kd(dataset, root, fms, args) -> tuple[float, dict[float, float]]:
  """The KD weight with the lowest held-out NE (seed 0), and every candidate's held-out NE."""
  scores = {w: select_ne(train_expert(dataset, root, fms, args, "late", "kd", 0, w))
            for w in map(float, args.kd_weights.split(","))}
  return min(scores, key=scores.get), scores


def run_experts(dataset: str, root: str, fms: dict[str, str], args, kd_weight: float) -> list[dict]:
  """Trains (or reads) every expert run; returns one record per run with its results."""
  plan = [("late", c) for c in CARRIERS] + [("early", "tae")]
  runs = []
  for seed in range(args.seeds):
    for version, carrier in plan:
      workdir = train_expert(dataset, root, fms, args, version, carrier, seed, kd_weight)
      runs.append({"version": version, "carrier": carrier, "seed": seed,
                   "results": reporting.read_results(workdir)})
  return runs


def long_rows(dataset: str, runs: list[dict]) -> list[dict]:
  """One CSV row per (run, surface, task): the expert's NE and AUC and the FM's on that task."""
  rows = []
  for r in runs:
    res = r["results"]
    for key, ne in res.items():
      if not key.startswith("ne/"):
        continue
      st = key[3:]
      surface, task = st.split("/")
      rows.append({"dataset": dataset, "fm": r["version"], "carrier": r["carrier"],
                   "seed": r["seed"], "surface": surface, "task": task,
                   "fm_task": task in res["fm_tasks"], "ne": ne, "auc": res[f"auc/{st}"],
                   "fm_ne": res.get(f"fm/ne/{st}", np.nan), "fm_auc": res.get(f"fm/auc/{st}", np.nan),
                   "epoch": res[f"epoch/{surface}"]})
  return rows


def _stat(rows, metric, **where) -> np.ndarray:
  """Per-seed values of `metric` over the rows matching `where`, ordered by seed."""
  sel = sorted((r for r in rows if all(r[k] == v for k, v in where.items())), key=lambda r: r["seed"])
  return np.array([r[metric] for r in sel], np.float64)


def tables(dataset: str, rows: list[dict]) -> tuple[str, dict]:
  """The markdown section of one dataset and a summary of the bar checks."""
  keys = sorted({(r["surface"], r["task"], r["fm_task"]) for r in rows})
  out = [f"## {dataset}", "", "### Knowledge carriers (late FM)", "",
         "NE of the expert alone; for each carrier, NE relative to the expert alone in % "
         "(negative is better) and AUC. FM: the foundation model itself, one-stage, on the "
         "same test rows (tasks it knows). The last column holds the Welch t-test p-values of "
         "TAE against UE and against KD.", ""]
  head = "| surface/task | alone NE | alone AUC | " + " | ".join(
      f"{LABELS[c]} ΔNE% | {LABELS[c]} AUC" for c in CARRIERS[1:]) + " | FM ΔNE% | FM AUC | p(TAE vs UE, KD) |"
  out += [head, "|" + "---|" * (head.count("|") - 1)]
  wins, significant, main = [], [], []
  for surface, task, fm_task in keys:
    base = _stat(rows, "ne", fm="late", carrier="none", surface=surface, task=task)
    auc = _stat(rows, "auc", fm="late", carrier="none", surface=surface, task=task)
    cells = [f"{surface}/{task}" + ("" if fm_task else " (unseen)"), sweep.mean_std(base),
             sweep.mean_std(auc, ".3f")]
    means = {}
    for c in CARRIERS[1:]:
      ne = _stat(rows, "ne", fm="late", carrier=c, surface=surface, task=task)
      means[c] = ne.mean()
      rel = 100.0 * (ne / base.mean() - 1.0)
      auc = _stat(rows, "auc", fm="late", carrier=c, surface=surface, task=task)
      cells += [sweep.mean_std(rel, "+.2f") + sweep.mark(sweep.welch_p(ne, base)),
                sweep.mean_std(auc, ".3f")]
    tae = _stat(rows, "ne", fm="late", carrier="tae", surface=surface, task=task)
    p_tae = [sweep.welch_p(tae, _stat(rows, "ne", fm="late", carrier=c, surface=surface, task=task))
             for c in ("ue", "kd")]
    fm_ne = _stat(rows, "fm_ne", fm="late", carrier="none", surface=surface, task=task)
    fm_auc = _stat(rows, "fm_auc", fm="late", carrier="none", surface=surface, task=task)
    cells += ([f"{100.0 * (fm_ne[0] / base.mean() - 1.0):+.2f}", f"{fm_auc[0]:.3f}"] if fm_task
              else ["n/a", "n/a"]) + [", ".join(f"{p:.1g}" for p in p_tae)]
    out.append("| " + " | ".join(cells) + " |")
    if fm_task and _is_main(task):
      main.append(f"{surface}/{task}")
      if means["tae"] < min(means["ue"], means["kd"]):
        wins.append(f"{surface}/{task}")
        if max(p_tae) < 0.05:
          significant.append(f"{surface}/{task}")

  out += ["", "### Transfer ratios (TAE carrier, early → late FM)", "",
          "TR = (NE(Expert_early) − NE(Expert_late)) / (NE(FM_early) − NE(FM_late)). The FM gap "
          "is stated: a TR over a small FM gap means little. † marks an expert gap that a Welch "
          "t-test over seeds does not find significant.", "",
          "| surface/task | FM early NE | FM late NE | FM gap | Expert early NE | Expert late NE | expert gap | TR |",
          "|---|---|---|---|---|---|---|---|"]
  trs = {}
  for surface, task, fm_task in keys:
    if not fm_task:
      continue
    f_e = _stat(rows, "fm_ne", fm="early", carrier="tae", surface=surface, task=task)[0]
    f_l = _stat(rows, "fm_ne", fm="late", carrier="tae", surface=surface, task=task)[0]
    e_e = _stat(rows, "ne", fm="early", carrier="tae", surface=surface, task=task)
    e_l = _stat(rows, "ne", fm="late", carrier="tae", surface=surface, task=task)
    tr = (e_e - e_l) / (f_e - f_l)  # per seed: the FMs are fixed
    trs[f"{surface}/{task}"] = float(tr.mean())
    gap = f"{e_e.mean() - e_l.mean():+.4f}{sweep.mark(sweep.welch_p(e_e, e_l))}"
    out.append(f"| {surface}/{task} | {f_e:.4f} | {f_l:.4f} | {f_e - f_l:+.4f} | "
               f"{sweep.mean_std(e_e)} | {sweep.mean_std(e_l)} | {gap} | {sweep.mean_std(tr, '.2f')} |")

  out += ["", "### Unseen tasks (never supervised in the FM)", "",
          "NE change of each carrier against the expert alone on the tasks the FM never saw.", "",
          "| surface/task | alone NE | " + " | ".join(f"{LABELS[c]} NE | ΔNE%" for c in CARRIERS[1:]) + " |",
          "|---|---|" + "---|---|" * (len(CARRIERS) - 1)]
  for surface, task, fm_task in keys:
    if fm_task:
      continue
    base = _stat(rows, "ne", fm="late", carrier="none", surface=surface, task=task)
    cells = [f"{surface}/{task}", sweep.mean_std(base)]
    for c in CARRIERS[1:]:
      ne = _stat(rows, "ne", fm="late", carrier=c, surface=surface, task=task)
      rel = sweep.mean_std(100.0 * (ne / base.mean() - 1.0), "+.2f")
      cells += [sweep.mean_std(ne), rel + sweep.mark(sweep.welch_p(ne, base))]
    out.append("| " + " | ".join(cells) + " |")
  summary = {"tae_beats_ue_and_kd": wins, "main_tasks": main, "tr": trs}
  out += ["", f"TAE has a lower mean NE than both UE and KD on {len(wins)} of {len(main)} main "
          f"surface/tasks" + (f"; not on: {', '.join(sorted(set(main) - set(wins)))}."
                              if len(wins) < len(main) else ".")
          + f" The difference is significant (p < 0.05) against both on {len(significant)} of them.",
          ""]
  return "\n".join(out), summary


def _is_main(task: str) -> bool:
  """Main tasks (every surface's): like/love on ML-1M, click/like on synthetic data."""
  return task in ("like", "love", "click")


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  datasets = sorted({r["dataset"] for r in rows})
  fig, axes = plt.subplots(len(datasets), 1, figsize=(14, 4.5 * len(datasets)), squeeze=False)
  for ax, dataset in zip(axes[:, 0], datasets):
    sub = [r for r in rows if r["dataset"] == dataset and r["fm"] == "late"]
    keys = sorted({(r["surface"], r["task"]) for r in sub})
    seen = {(r["surface"], r["task"]): r["fm_task"] for r in sub}
    width = 0.8 / len(CARRIERS)
    for i, c in enumerate(CARRIERS):
      ne = [_stat(sub, "ne", carrier=c, surface=s, task=t) for s, t in keys]
      ax.bar(np.arange(len(keys)) + i * width, [x.mean() for x in ne], width,
             yerr=[x.std(ddof=1) if len(x) > 1 else 0 for x in ne], label=LABELS[c], capsize=2)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s}/{t}" + ("" if seen[s, t] else " (unseen)") for s, t in keys],
                       rotation=30, ha="right")
    lo = min(r["ne"] for r in sub)
    ax.set_ylim(lo - 0.02, max(r["ne"] for r in sub) + 0.01)
    ax.set_ylabel("test NE (lower is better)")
    ax.set_title(f"{dataset}: expert NE by knowledge carrier (late FM), mean ± std over seeds")
    ax.legend(ncol=len(CARRIERS), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="where FMs, TAE stores and experts live")
  p.add_argument("--datasets", default="ml-1m,synthetic")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--out", default="experiments/results")
  p.add_argument("--fm-variant", default="base", help="FM config variant (base, large, runlocal)")
  p.add_argument("--early-epochs", type=int, default=1)
  p.add_argument("--late-epochs", type=int, default=4)
  p.add_argument("--surfaces", default="", help="comma-separated surfaces (default: all)")
  p.add_argument("--kd-weights", default="0.5,1,2,4,8,16",
                 help="KD weights tried on seed 0; the best on held-out users is used")
  p.add_argument("--quick", action="store_true", help="runlocal experts (a smoke test)")
  p.add_argument("--progress", action="store_true", help="show progress bars")
  args = p.parse_args()
  if args.seeds < 2:
    p.error("--seeds must be at least 2 to give a std and a significance test")
  rows, sections = [], []
  for dataset in args.datasets.split(","):
    root = os.path.join(args.workdir, dataset)
    fms = train_fms(dataset, root, args)
    log_taes(root, fms)
    kd_weight, kd_scores = tune_kd(dataset, root, fms, args)
    rows += long_rows(dataset, run_experts(dataset, root, fms, args, kd_weight))
    section, summary = tables(dataset, [r for r in rows if r["dataset"] == dataset])
    sections.append(section + "\nKD weight, picked by the held-out users' NE (seed 0): **"
                    f"{kd_weight:g}** (" + ", ".join(f"{w:g}: {v:.4f}" for w, v in kd_scores.items())
                    + ").\n")
    print(f"[{dataset}] TAE beats UE and KD on {len(summary['tae_beats_ue_and_kd'])}/"
          f"{len(summary['main_tasks'])} main surface/tasks", flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "transfer.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
           for k, v in vars(args).items() if k not in ("workdir", "out", "progress") and v not in (False, "")]
  cmd = " ".join(["python -m experiments.transfer --workdir=..."] + flags)
  header = ["# Knowledge transfer: surface experts on frozen FM knowledge", "",
            f"Produced by `{cmd}`.", "Seeds: " + str(args.seeds) + "; test split; the epoch of "
            "every expert is picked on held-out users of its training windows. See "
            "`experiments/transfer.py` for the protocol.", "",
            "![NE by carrier and task](transfer.png)", "",
            "Protocol. Each FM trains on every user's training region; its validation windows "
            "(impressions it never trained on) are the experts' training data, 10% of their users "
            "held out to pick each expert's epoch; everything is measured on the test windows. "
            "All carriers share the expert's size (d=24, 1 HSTU layer, 16 short-term events), "
            "optimiser, epochs and selection rule. One FM run per dataset: `early` is its "
            "checkpoint after the first epoch(s), `late` the same run continued. UE is the FM's "
            "output at the last history position: the ranking loss supervises candidate positions "
            "only, so that output is never trained directly, which is part of why UE carries "
            "less than TAE. The FM one-stage column reads the FM's own predictions on the same "
            "test rows.", ""]
  with open(os.path.join(args.out, "transfer.md"), "w") as f:
    f.write("\n".join(header + sections))
  plot(rows, os.path.join(args.out, "transfer.png"))
  print(f"wrote {args.out}/transfer.md, transfer.csv, transfer.png", flush=True)


if __name__ == "__main__":
  main()
