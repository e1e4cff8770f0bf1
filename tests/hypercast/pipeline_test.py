"""The whole HyperCast pipeline through `python -m fmx.main` on the synthetic surfaces: four stage
processes under one supervisor. Exact event accounting for every stage, and again after every
stage is killed (SIGKILL) mid-run and restarted by the supervisor: the same events trained once,
the same weights, the same TAE rows."""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fmx.data import load as data_load, tae_store
from fmx.hypercast import event_log, logging_stream, snapshots, store_source
from fmx.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOGGING = ["--config.batch_size=16", "--config.batches_per_shard=1"]  # several shards a window
SMALL = ["--config.fm.input.synthetic.num_users=80", "--config.progress=False",
         *(f.replace("--config.", "--config.logging.") for f in LOGGING)]


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
    new = set(ev["user"].tolist()) - seen
    seen |= new
    impressions.append(len(ev) - len(new))
  K = r["config"]["fm"]["stream"]["publish_every"]
  store = workdir / "store"
  windows = [v for v in tae_store.versions(store) if v.startswith("w")]
  newest = {}
  for v in windows:
    meta = tae_store.version_meta(store, v)
    f = next(f for f in meta["followers"] if f["follow"] == "newest")
    rows = sum(len(a["user"]) for _, a in tae_store.read(store, v, shards=f["shards"]))
    newest[int(v[1:])] = (f["fm_version"], rows, meta["sha256"])
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
  for w, (version, rows, _) in a["newest"].items():
    assert version == w // K  # the newest version published before the window, never later
    assert rows == a["impressions"][w]  # every impression of the window logged once
  assert a["logging"]["windows"] == W - K
  assert a["experts"]["rows"] == sum(rows for _, rows, _ in a["newest"].values())
  assert a["versions"][-1] == (W - 1) // K  # every version the windows needed was published
  assert "progressive NE (AUC)" in stdout and (workdir / "ne_per_window.png").stat().st_size > 0
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["window"] for r in rows] == sorted(r["window"] for r in rows)
  r = a["r"]
  for key in ("expert/ne/s0/like", "alone/ne/s0/like", "fm/ne/s0/like", "expert_v1/ne/s0/like",
              "fm_stream/ne/s0/like", "delay/publish_to_experts_s", "snapshots/delta_bytes"):
    assert np.isfinite(r[key]), key
  assert r["snapshots/delta_bytes"] < r["snapshots/full_bytes"]
  assert r["experts/rows_per_s"] > 0 and r["logging/rows"] == a["experts"]["rows"]
  fresh = [json.loads(l) for l in (workdir / "freshness.jsonl").read_text().splitlines()]
  assert [f["window"] for f in fresh] == list(range(K, W))
  assert all(f["tae_staleness_windows"] == f["window"] % K and f["data_to_trainer_s"] > 0
             for f in fresh)
  drift = [json.loads(l) for l in (workdir / "logging" / "drift.jsonl").read_text().splitlines()]
  assert {(d["window"], d["to"]) for d in drift} == {(v * K, v) for v in range(2, (W - 1) // K + 1)}
  assert all(0 < d["p_value"] <= 1 and d["from"] == d["to"] - 1 for d in drift)
  assert r["drift/tests"] == len(drift)


def test_the_beam_logging_tier_writes_the_same_windows(tmp_path, reference):
  """Apache Beam (DirectRunner, two worker processes) over the run's log and snapshots writes
  the same store as the in-process tier: every window, shard for shard, byte for byte."""
  workdir, a, _ = reference
  K, W = a["K"], len(a["impressions"])
  beam = lambda *extra: subprocess.run(
      [sys.executable, "-m", "fmx.main", "--config=fmx/configs/logging_beam.py:synthetic",
       f"--workdir={tmp_path / 'beam'}", "--config.input.synthetic.num_users=80",
       f"--config.stream.log_dir={workdir / 'log'}",
       f"--config.stream.snapshots={workdir / 'snapshots'}",
       f"--config.stream.store={tmp_path / 'store'}", *LOGGING, *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  p = beam(f"--config.end_window={W - 3}")  # a range first, then the rest: it resumes
  assert p.returncode == 0, p.stderr[-3000:]
  assert tae_store.windows(tmp_path / "store") == list(range(K, W - 3))
  assert not (tmp_path / "store" / tae_store.CLOSED).exists()
  p = beam()
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads((tmp_path / "beam" / "results.json").read_text())
  assert r["windows"] == 3 and r["fm_restores"] <= 2 * len(r["fm_versions"])  # per worker
  for w in range(K, W):
    v = tae_store.window_version(w)
    ours, theirs = (tae_store.version_meta(d, v) for d in (tmp_path / "store", workdir / "store"))
    assert ours == theirs, w

  assert (tmp_path / "store" / tae_store.CLOSED).exists()
  assert "Traceback" not in p.stderr
  assert max(len(f["shards"]) for w in range(K, W) for f in tae_store.version_meta(
      tmp_path / "store", tae_store.window_version(w))["followers"]) > 1  # several parts


def _expert_source(workdir, **stream):
  c = stage_config(workdir, "experts")
  c.stream.update(stream)
  data = data_load.load(c.input, "surfaces")
  snaps = snapshots.Snapshots(c.stream.snapshots, read_only=True)
  loader = store_source.TableLoader(snaps, int(snaps.latest()["dim"]))
  return store_source.StoreSource(c, data, loader, tuple(c.stream.follow), snaps.latest()["vocab"])


def test_delayed_updates_score_a_whole_group_first_and_alignment_resumes(reference):
  workdir, a, _ = reference
  K, W = a["K"], len(a["impressions"])
  source = _expert_source(workdir, update_every=3)
  seen, position = [], None
  for batch, position in source.iterate(source.start()):
    w = position["window"]
    groups = [g for g, _, _ in source.group]
    assert w in groups and len({g // 3 for g in groups}) == 1 and groups == sorted(groups)
    seen.append(w)
  assert sorted(set(seen)) == list(range(K, W)) and seen == sorted(seen)
  assert position["rows"] == a["experts"]["rows"]

  def taes(source, position, window):
    out = []
    for batch, pos in source.iterate(position):
      if pos["window"] == window:
        out.append({n: b["tae"]["newest"][b["real"]] for n, b in batch["surfaces"].items()})
      elif pos["window"] > window:
        return out
    return out

  later = 2 * K + 1  # a window of FM version 2, whose TAEs are aligned to version 1's frame
  full = taes(_expert_source(workdir, align=True, update_every=3),
              {"window": -1, "batch": 0, "rows": 0}, later)
  at = {"window": later - 1, "batch": 0, "rows": 0}  # the position after window later - 1
  resumed = taes(_expert_source(workdir, align=True, update_every=3), at, later)  # mid-group:
  # the moments are rebuilt from the store
  plain = taes(_expert_source(workdir), at, later)
  assert len(full) == len(resumed) == len(plain) > 0
  for f, r, p in zip(full, resumed, plain):
    for n in f:
      np.testing.assert_array_equal(f[n], r[n])
      assert f[n].shape == p[n].shape and (f[n].size == 0 or not np.allclose(f[n], p[n]))


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
  assert a["newest"] == ref["newest"]  # the same FM version, rows and TAE bytes per window
  assert a["experts"]["rows"] == ref["experts"]["rows"]
  assert a["experts"]["params_sha256"] == ref["experts"]["params_sha256"]


def stage_config(workdir, name):
  """The config the supervisor wrote for stage `name`, as a ConfigDict."""
  spec = importlib.util.spec_from_file_location(f"stage_{name}", workdir / "stages" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_an_expert_following_a_version_nobody_logs_fails_in_one_line(tmp_path, reference):
  workdir, _, _ = reference
  text = (workdir / "stages" / "experts.py").read_text()
  assert "'follow': ('newest', '1')" in text
  (tmp_path / "experts.py").write_text(text.replace("'follow': ('newest', '1')", "'follow': ('2',)"))
  p = subprocess.run([sys.executable, "-m", "fmx.main", f"--config={tmp_path / 'experts.py'}",
                      f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("fmx: error:") and "not ['2']" in last and "Traceback" not in p.stderr


def test_rows_or_tables_of_another_dimension_are_refused(reference):
  workdir, _, _ = reference
  c = stage_config(workdir, "experts")
  data = data_load.load(c.input, "surfaces")
  snaps = snapshots.Snapshots(c.stream.snapshots, read_only=True)
  with pytest.raises(snapshots.SnapshotError, match="dimension 64, these experts were built for 5"):
    store_source.TableLoader(snaps, 5).get(snaps.latest()["version"])
  loader = store_source.TableLoader(snaps, 64)
  source = store_source.StoreSource(c, data, loader, ("newest",), snaps.latest()["vocab"])
  w, meta, shards = next(store_source.store_windows(c.stream.store, -1, 0.01, 0))
  assert source.window_batches(w, meta, shards)  # as logged: accepted
  meta["followers"][0]["dim"] = 32
  with pytest.raises(loop.RunError, match="dimension 32, these experts were built for 64"):
    source.window_batches(w, meta, shards)


def test_a_damaged_snapshot_is_named_and_the_logging_tier_rolls_back(tmp_path, reference):
  workdir, _, _ = reference
  shutil.copytree(workdir / "snapshots", tmp_path / "snapshots")
  snaps = snapshots.Snapshots(tmp_path / "snapshots", read_only=True)
  v = snaps.latest()["version"]
  for f in (tmp_path / "snapshots" / "orbax" / str(v)).rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:-100])  # truncated
  c = stage_config(workdir, "logging")
  versions = logging_stream.Versions(snaps, data_load.load(c.input, "surfaces"))
  used, params = versions.get(v)
  assert used == v - 1 and params


def test_a_damaged_store_shard_is_named(tmp_path, reference):
  workdir, _, _ = reference
  shutil.copytree(workdir / "store", tmp_path / "store")
  shard = sorted((tmp_path / "store").glob("w*/shard-00000.array_record"))[3]
  shard.write_bytes(shard.read_bytes()[:-50])
  with pytest.raises(tae_store.StoreError, match=f"{shard.parent.name}/shard-00000.array_record: corrupt"):
    list(store_source.store_windows(tmp_path / "store", -1, 0.01, 0))


def test_an_unusable_workdir_fails_before_any_stage_starts(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  p = pipeline(blocker / "run")
  assert p.returncode == 2 and p.stderr.strip().startswith("fmx: error: --workdir=")
  assert "cannot create it" in p.stderr and not (blocker.parent / "run").exists()
