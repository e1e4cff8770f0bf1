"""The whole HyperCast pipeline through `python -m fmx.main` on the synthetic surfaces: four stage
processes under one supervisor. Exact event accounting for every stage, and again after every
stage is killed (SIGKILL) mid-run and restarted by the supervisor: the same events trained once,
the same weights, the same TAE rows."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fmx.data import tae_store
from fmx.hypercast import event_log, snapshots

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = ["--config.fm.input.synthetic.num_users=80", "--config.progress=False"]


def pipeline(workdir, *extra, wait=True):
  cmd = [sys.executable, "-m", "fmx.main", "--config=fmx/configs/hypercast_ml1m.py:synthetic",
         f"--workdir={workdir}", *SMALL, *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def accounting(workdir: pathlib.Path) -> dict:
  """What every stage did, from the files it committed."""
  r = json.loads((workdir / "results.json").read_text())
  log = event_log.EventLog(workdir / "log")
  index = log.index()
  events = [log.read_window(i) for i in range(len(index["windows"]))]
  seen, impressions = set(), []
  for ev in events:  # every event but a user's first is an impression
    first = [u not in seen for u in ev["user"]]
    seen.update(ev["user"].tolist())
    impressions.append(len(ev) - sum(first))
  K = r["config"]["fm"]["stream"]["publish_every"]
  store = workdir / "store"
  windows = [v for v in tae_store.versions(store) if v.startswith("w")]
  newest = {}
  for v in windows:
    meta = tae_store.version_meta(store, v)
    i = [f["follow"] for f in meta["followers"]].index("newest")
    newest[int(v[1:])] = (meta["followers"][i]["fm_version"],
                          len(list(tae_store.read(store, v))[i][1]["user"]))
  stage = lambda name: json.loads((workdir / name / "results.json").read_text())
  return {"r": r, "impressions": impressions, "K": K, "newest": newest,
          "fm": stage("fm"), "logging": stage("logging"), "experts": stage("experts"),
          "versions": [e["version"] for e in snapshots.Snapshots(workdir / "snapshots",
                                                                 read_only=True).versions()]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pipeline")
  p = pipeline(workdir)
  assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
  return workdir, accounting(workdir), p.stdout


def test_every_stage_takes_every_event_once(reference):
  workdir, a, stdout = reference
  K, W = a["K"], len(a["impressions"])
  assert a["fm"]["events"] == sum(a["impressions"])  # the FM trained every impression once
  assert sorted(a["newest"]) == list(range(K, W))  # every window from the first FM version on
  for w, (version, rows) in a["newest"].items():
    assert version == w // K  # the newest version published before the window, never later
    assert rows == a["impressions"][w]  # every impression of the window logged once
  assert a["logging"]["windows"] == W - K
  assert a["experts"]["rows"] == sum(rows for _, rows in a["newest"].values())
  assert a["versions"][-1] == (W - 1) // K  # every version the windows needed was published
  assert "progressive NE (AUC)" in stdout and (workdir / "ne_per_window.png").stat().st_size > 0
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["window"] for r in rows] == sorted(r["window"] for r in rows)
  r = a["r"]
  for key in ("expert/ne/s0/like", "alone/ne/s0/like", "fm/ne/s0/like", "expert_v1/ne/s0/like",
              "fm_stream/ne/s0/like", "delay/publish_to_experts_s", "snapshots/delta_bytes"):
    assert np.isfinite(r[key]), key
  assert r["snapshots/delta_bytes"] < r["snapshots/full_bytes"]


def test_killed_stages_are_restarted_and_resume_exactly(tmp_path, reference):
  _, ref, _ = reference
  proc = pipeline(tmp_path, wait=False)
  killed, deadline = set(), time.time() + 600
  rng = np.random.default_rng(0)
  while proc.poll() is None and time.time() < deadline:
    time.sleep(rng.uniform(0.5, 2.0))
    try:
      states = json.loads((tmp_path / "stages.json").read_text())
    except (OSError, ValueError):
      continue
    for name in ("fm", "logging", "experts", "producer"):
      s = states[name]
      if name not in killed and s["state"] == "running" and s["pid"]:
        done = len(list((tmp_path / name / "progressive").glob("*"))) if name != "logging" \
            else len(tae_store.versions(tmp_path / "store"))
        if name == "producer" or done >= 2:
          os.kill(s["pid"], signal.SIGKILL)
          killed.add(name)
          break
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert killed >= {"fm", "logging", "experts"}, killed
  a = accounting(tmp_path)
  restarts = a["r"]["restarts"]
  assert all(restarts[n] >= 1 for n in killed), restarts
  assert a["fm"]["events"] == ref["fm"]["events"]
  assert a["fm"]["params_sha256"] == ref["fm"]["params_sha256"]  # same events, same order, once
  assert a["newest"] == ref["newest"]
  assert a["experts"]["rows"] == ref["experts"]["rows"]
  assert a["experts"]["params_sha256"] == ref["experts"]["params_sha256"]
