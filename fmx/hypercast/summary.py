"""The pipeline's summary: progressive NE and AUC per surface and task for the FM, the experts
and the expert-alone baseline, the transfer ratio between two FM versions, the stream's delays
(`freshness.jsonl` per window), the TAE drift between FM versions, and every stage's
throughput; `metrics.jsonl` (one row per window) and a plot of NE per window.

Models (keys of `results.json`, each `<model>/ne/<surface>/<task>` and `/auc/`):
  fm_stream   the streaming FM on every window it trained on (its own progressive validation)
  fm          the FM's one-stage predictions on the experts' rows (the version logged with them)
  expert      the experts that follow the newest FM version (TAE + frozen item table)
  expert_vP   the experts pinned to FM version P
  alone       the expert-alone baseline (no FM input)
`rel_ne/<surface>/<task>` is the expert's NE relative to the alone baseline's, in percent.
The transfer ratio TR = (NE(expert_vP) - NE(expert)) / (NE(fm_vP) - NE(fm)) is computed on the
rows logged with both versions (where they differ), with the NE gains summed over every
surface's main tasks (`transfer/fm_gain/...` and `transfer/expert_gain/...` give each).
`fm_stream` also covers the first K windows, before the first FM version; the other models
start at window K. The FM is scored on its own tasks only.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from fmx.data import load as data_load
from fmx.hypercast import progressive
from fmx.train import metrics, reporting



def main_tasks(spec) -> list[str]:
  """The tasks valid on every surface that the FM learns (ML-1M: like, love)."""
  return [t for i, t in enumerate(spec.tasks) if spec.valid[:, i].all() and spec.fm_tasks[i]]


def _name(model: str) -> str:
  """Progressive record model names -> summary model names."""
  if model == "expert_follow_newest":
    return "expert"
  if model.startswith("expert_follow_"):
    return f"expert_v{model[len('expert_follow_'):]}"
  if model == "expert_alone":
    return "alone"
  if model == "fm_newest":
    return "fm"
  return f"fm_v{model[3:]}" if model.startswith("fm_") else model


def summarise(workdir: str, c, stage_seconds: dict[str, float]) -> dict:
  """The results of a finished pipeline in `workdir`; `stage_seconds` are the wall seconds of
  all the processes each stage ran (restarts included)."""
  data = data_load.load(c.fm.input, "surfaces")
  spec = data.spec
  fm_records = progressive.read_all(os.path.join(workdir, "fm", "progressive"))
  ex_records = progressive.read_all(os.path.join(workdir, "experts", "progressive"))
  out = {"dataset": data.name, "surfaces": list(spec.surfaces), "tasks": list(spec.tasks)}
  for model in progressive.models(ex_records):
    tasks = spec.fm_tasks if model.startswith("fm_") else None  # the FM's heads: its tasks only
    for k, v in progressive.scores(ex_records, model, spec, tasks).items():
      out[f"{_name(model)}/{k}"] = v
  for k, v in progressive.scores(fm_records, "fm", spec, spec.fm_tasks).items():
    out[f"fm_stream/{k}"] = v
  for key in [k for k in out if k.startswith("expert/ne/")]:
    rest = key[len("expert/ne/"):]
    if f"alone/ne/{rest}" in out:
      out[f"rel_ne/{rest}"] = 100.0 * (out[key] / out[f"alone/ne/{rest}"] - 1.0)
  out["ne_mean"] = metrics.ne_mean({k[len("expert/"):]: v for k, v in out.items()
                                    if k.startswith("expert/ne/")}) if ex_records else None
  out.update(transfer(ex_records, spec, c.follow))
  log_windows = _log_windows(workdir)
  out.update(delays(workdir, c, log_windows, fm_records, ex_records))
  out.update(throughput(workdir, stage_seconds))
  out.update(publishing(workdir))
  out.update(freshness(workdir, c, log_windows, ex_records))
  out.update(drift_summary(workdir))
  write_per_window(workdir, fm_records, ex_records, spec)
  return out


def _log_windows(workdir: str) -> list[dict] | None:
  """The event log's window entries (None without a readable index)."""
  try:
    return json.load(open(os.path.join(workdir, "log", "index.json")))["windows"]
  except (OSError, ValueError, KeyError):
    return None


def freshness(workdir: str, c, log_windows, ex_records) -> dict:
  """`freshness.jsonl`, per window the experts trained on: the data-to-trainer delay (the window
  visible in the log -> the experts' first step on it; in simulated hours, from the mean event
  time of its rows when the log is replayed at a speed) and how many windows old the FM version
  of its TAEs is (window - version * K)."""
  if log_windows is None:
    return {}
  trained = {}
  path = os.path.join(workdir, "experts", "trained.jsonl")
  for t in reporting.json_lines(path):
    trained.setdefault(t["window"], t["wall"])  # the first time (a restart may train it again)
  K, speed, rows = c.fm.stream.publish_every, c.producer.speed, []
  for w, _, info in ex_records:
    entry = log_windows[w]
    if w not in trained or "appended_at" not in entry:
      continue
    wall = trained[w] - entry["appended_at"]
    row = {"window": w, "data_to_trainer_s": wall,
           "tae_staleness_windows": w - info["fm_versions"].get("newest", 0) * K}
    if speed and "t_mean" in info:
      row["data_to_trainer_sim_h"] = (wall * speed + entry["t_end"] - info["t_mean"]) / 3600.0
    rows.append(row)
  with open(os.path.join(workdir, "freshness.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  out = {}
  for k in ("data_to_trainer_s", "data_to_trainer_sim_h", "tae_staleness_windows"):
    xs = [r[k] for r in rows if k in r]
    if xs:
      out[f"delay/{k}"] = float(np.median(xs))
  return out


def drift_lines(workdir: str) -> list[dict]:
  """The logging tier's MMD tests (`drift.jsonl`), the last per window and surface."""
  path = os.path.join(workdir, "logging", "drift.jsonl")
  lines = reporting.json_lines(path)
  return list({(d["window"], d["surface"]): d for d in lines}.values())


def drift_summary(workdir: str) -> dict:
  lines = drift_lines(workdir)
  if not lines:
    return {}
  return {"drift/tests": len(lines), "drift/mmd2_median": float(np.median([d["mmd2"] for d in lines])),
          "drift/significant_share": float(np.mean([d["p_value"] < 0.05 for d in lines]))}


def transfer(records, spec, follow) -> dict:
  pinned = [str(f) for f in follow if str(f) != "newest"]
  if not pinned or "newest" not in [str(f) for f in follow]:
    return {}
  p = pinned[0]
  both = [r for r in records if f"probs/expert_follow_{p}" in r[1] and "probs/fm_newest" in r[1]
          and r[2]["fm_versions"].get("newest") != r[2]["fm_versions"].get(p)]
  if not both:
    return {"transfer/pinned_version": int(p), "transfer/rows": 0}
  s = {m: progressive.scores(both, m, spec) for m in
       ("expert_follow_newest", f"expert_follow_{p}", "fm_newest", f"fm_{p}")}
  out = {"transfer/pinned_version": int(p),
         "transfer/rows": int(sum(len(r[1]["labels"]) for r in both))}
  gains = []  # (FM NE gain, expert NE gain) from the pinned version to the newest
  for sname in spec.surfaces:
    for task in main_tasks(spec):
      key = f"ne/{sname}/{task}"
      if all(key in v for v in s.values()):
        gains.append((s[f"fm_{p}"][key] - s["fm_newest"][key],
                      s[f"expert_follow_{p}"][key] - s["expert_follow_newest"][key]))
        out[f"transfer/fm_gain/{sname}/{task}"], out[f"transfer/expert_gain/{sname}/{task}"] = gains[-1]
  fm_gain = sum(g for g, _ in gains)
  out["transfer_ratio"] = sum(e for _, e in gains) / fm_gain if abs(fm_gain) > 1e-9 else None
  return out


def delays(workdir: str, c, log_windows, fm_records, ex_records) -> dict:
  if log_windows is None:
    return {}
  appended = {i: w["appended_at"] for i, w in enumerate(log_windows) if "appended_at" in w}
  speed = c.producer.speed
  med = lambda xs: float(np.median(xs)) if xs else None
  fm = [info["wall"] - appended[w] for w, _, info in fm_records if w in appended]
  ex = [info["wall"] - appended[w] for w, _, info in ex_records if w in appended]
  changes = []
  seen = set()
  for ch in reporting.json_lines(os.path.join(workdir, "experts", "version_changes.jsonl")):
    if ch.get("follow") == "newest" and ch.get("fm_version") not in seen:
      seen.add(ch["fm_version"])
      changes.append(ch["delay_s"])
  out = {"delay/data_to_fm_s": med(fm), "delay/data_to_experts_s": med(ex),
         "delay/publish_to_experts_s": med(changes), "fm_versions_seen": len(changes)}
  if speed:
    for k in ("data_to_fm", "data_to_experts", "publish_to_experts"):
      v = out[f"delay/{k}_s"]
      out[f"delay/{k}_sim_h"] = None if v is None else v * speed / 3600.0
  return out


def throughput(workdir: str, stage_seconds: dict[str, float]) -> dict:
  """Events (or rows) per wall second of every process each stage ran, restarts included."""
  out = {}
  for stage, key in (("producer", "events"), ("fm", "events"), ("logging", "rows"),
                     ("experts", "rows")):
    try:
      r = reporting.read_results(os.path.join(workdir, "log" if stage == "producer" else stage))
    except (OSError, ValueError):
      continue
    out[f"{stage}/{key}"] = r.get(key)
    if r.get(key) is not None and stage_seconds.get(stage):
      out[f"{stage}/{key}_per_s"] = r[key] / stage_seconds[stage]
    for k in ("step_ms_while_loading", "step_ms_idle", "steps_while_loading",
              "table_wait_first_s", "table_wait_later_s"):
      if k in r:
        out[f"{stage}/{k}"] = r[k]
  return out


def publishing(workdir: str) -> dict:
  path = os.path.join(workdir, "fm", "publish.jsonl")
  if not os.path.exists(path):
    return {}
  entries = {e["version"]: e for e in reporting.json_lines(path)}.values()
  by = {k: [e["bytes"] for e in entries if e["kind"] == k] for k in ("full", "delta")}
  out = {"snapshots/versions": len(entries),
         "snapshots/full_bytes": float(np.mean(by["full"])) if by["full"] else None,
         "snapshots/delta_bytes": float(np.mean(by["delta"])) if by["delta"] else None}
  if by["full"] and by["delta"]:
    out["snapshots/delta_over_full"] = out["snapshots/delta_bytes"] / out["snapshots/full_bytes"]
  return out


def write_per_window(workdir: str, fm_records, ex_records, spec) -> None:
  """`metrics.jsonl`: per window, the mean NE of every model (the FM's over its own tasks)."""
  rows = {}
  for records, models in ((fm_records, ["fm"]), (ex_records, progressive.models(ex_records))):
    for w, arrays, info in records:
      for m in models:
        if f"probs/{m}" in arrays:
          tasks = spec.fm_tasks if m == "fm" or m.startswith("fm_") else None
          s = progressive.scores([(w, arrays, info)], m, spec, tasks)
          if any(k.startswith("ne/") for k in s):
            name = "fm_stream" if m == "fm" else _name(m)
            rows.setdefault(w, {"window": w})[f"ne_mean/{name}"] = metrics.ne_mean(s)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for w in sorted(rows):
      f.write(json.dumps(rows[w]) + "\n")


def plot(workdir: str) -> None:
  """`ne_per_window.png` from `metrics.jsonl` (skipped, with a warning, without matplotlib)."""
  try:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it was
  except ImportError:
    print("fmx: warning: no plot (pip install 'fmx[experiments]' for matplotlib)", file=sys.stderr)
    return
  rows = reporting.json_lines(os.path.join(workdir, "metrics.jsonl"))
  fig = Figure(figsize=(8, 4))
  ax = fig.subplots()
  for key in sorted({k for r in rows for k in r if k.startswith("ne_mean/")}):
    pts = [(r["window"], r[key]) for r in rows if key in r]
    ax.plot(*zip(*pts), marker=".", linewidth=0.8, label=key.split("/", 1)[1])
  ax.set_xlabel("window")
  ax.set_ylabel("NE (mean over tasks), progressive")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "ne_per_window.png"), dpi=100)


def table(r: dict) -> str:
  models = [m for m in ("fm_stream", "fm", "expert", *sorted(k.split("/")[0] for k in r
            if k.startswith("expert_v") and "/ne/" in k), "alone") if any(k.startswith(f"{m}/ne/") for k in r)]
  models = list(dict.fromkeys(models))
  head = f"{'surface/task':<22}" + "".join(f"{m:>20}" for m in models)
  lines = ["progressive NE (AUC) per surface and task", head, "-" * len(head)]
  for sname in r["surfaces"]:
    for task in r["tasks"]:
      key = f"{sname}/{task}"
      if not any(f"{m}/ne/{key}" in r for m in models):
        continue
      cell = lambda m: (f"{r[f'{m}/ne/{key}']:.4f} ({r[f'{m}/auc/{key}']:.3f})"
                        if f"{m}/ne/{key}" in r else "-")
      lines.append(f"{key:<22}" + "".join(f"{cell(m):>20}" for m in models))
  fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  extra = [k for k in r if k.startswith(("transfer_ratio", "delay/", "snapshots/", "drift/")) or
           k.endswith(("_per_s", "step_ms_while_loading", "step_ms_idle", "table_wait_later_s"))]
  lines += [""] + [f"{k}: {fmt(r[k])}" for k in extra]
  return "\n".join(lines)
