"""The HyperCast pipeline (`job="hypercast"`): one supervisor that runs the four stages as
separate processes over one stream and summarises them.

  producer  (job event_log)       replays the dataset into DIR/log, window by window
  fm        (job fm_stream)       trains the FM on DIR/log, publishes versions into DIR/snapshots
  logging   (job logging_stream)  logs each window's TAEs with the FM versions before it, DIR/store
  experts   (job expert_stream)   trains every surface's experts on DIR/store and frozen tables

The stages talk only through those directories. Each runs as
`python -m fmx.main --config=DIR/stages/<stage>.py --workdir=DIR/<stage>` (the stage's config
is written there, complete, from this config), logs to DIR/logs/<stage>.log, and is restarted
if it dies of anything but bad input (exit 2); a restarted stage resumes from its checkpoint or
its store position. DIR/stages.json lists every stage's PID, restarts and state. When all are
done the supervisor writes the summary (`fmx.hypercast.summary`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import tqdm

from fmx import files
from fmx.configs import common
from fmx.data import load as data_load
from fmx.hypercast import snapshots, summary
from fmx.train import reporting
from fmx.train.loop import RunError

STAGES = ("producer", "fm", "logging", "experts")
WORKDIRS = {"producer": "log"}  # the producer's workdir is the event log itself


def stage_configs(c: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """The complete job config of every stage, with the pipeline's directories filled in."""
  d = lambda name: os.path.join(os.path.abspath(workdir), name)
  shared = {"log_dir": d("log"), "snapshots": d("snapshots"), "store": d("store"),
            "poll_seconds": c.poll_seconds, "idle_seconds": c.idle_seconds,
            "follow": tuple(c.follow)}
  out = {name: json.loads(json.dumps(c[name].to_dict())) for name in STAGES}
  data = {k: out["fm"]["input"][k] for k in
          ("dataset", "data_dir", "manual_dir", "fetch_wheel", "synthetic")}
  out["producer"]["input"] = out["fm"]["input"]
  for name in ("fm", "logging", "experts"):
    stream = out[name]["stream"]
    stream.update({k: v for k, v in shared.items() if k in stream})
    out[name]["input"].update(data)
    out[name]["progress"] = False
  return out


def write_stage_config(path: str, config: dict) -> None:
  files.atomic_write(path, "import ml_collections\n\n\ndef get_config():\n"
                     f"  return ml_collections.ConfigDict({config!r})\n")


class Stage:
  def __init__(self, name: str, workdir: str):
    self.name, self.workdir = name, workdir
    self.config = os.path.join(workdir, "stages", f"{name}.py")
    self.log = os.path.join(workdir, "logs", f"{name}.log")
    self.proc, self.restarts, self.state = None, 0, "waiting"
    self.started, self.seconds = 0.0, 0.0  # wall seconds of all its processes

  def start(self) -> None:
    out = open(self.log, "a")
    out.write(f"--- start {time.strftime('%H:%M:%S')} (restarts: {self.restarts})\n")
    out.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "fmx.main", f"--config={self.config}",
         f"--workdir={os.path.join(self.workdir, WORKDIRS.get(self.name, self.name))}"],
        stdout=out, stderr=out, env=env, preexec_fn=_end_with_parent)
    out.close()
    self.state, self.started = "running", time.time()

  def ended(self) -> None:
    self.seconds += time.time() - self.started

  def last_error(self) -> str:
    with open(self.log) as f:
      lines = [l.strip() for l in f if l.strip()]
    errors = [l for l in lines if l.startswith("fmx: error:")]
    return (errors or lines[-1:] or [""])[-1] + f" (log: {self.log})"


def _end_with_parent() -> None:
  """In a stage process: receive SIGTERM (checkpoint and stop) when the supervisor dies."""
  import ctypes
  ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def progress(workdir: str) -> dict[str, int]:
  """Windows done by each stage, from the files they commit."""
  count = lambda d, pat: len([p for p in os.listdir(d) if p.startswith(pat)]) if os.path.isdir(d) else 0
  try:
    produced = len(json.load(open(os.path.join(workdir, "log", "index.json")))["windows"])
  except (OSError, ValueError, KeyError):
    produced = 0
  return {"producer": produced,
          "fm": count(os.path.join(workdir, "fm", "progressive"), "window-"),
          "logging": count(os.path.join(workdir, "store"), "w"),
          "experts": count(os.path.join(workdir, "experts", "progressive"), "window-")}


def supervise(stages: list[Stage], workdir: str, c) -> None:
  bars = {s.name: tqdm.tqdm(desc=f"{s.name:>8}", unit=" windows", position=i, file=sys.stderr,
                            disable=not c.progress, dynamic_ncols=True, mininterval=1.0)
          for i, s in enumerate(stages)}
  try:
    for s in stages:
      s.start()
    while any(s.state == "running" for s in stages):
      time.sleep(0.5)
      for s in stages:
        code = s.proc.poll() if s.state == "running" else None
        if code is None:
          continue
        s.ended()
        if code == 0:
          s.state = "done"
        elif code == 2:
          raise RunError(f"stage {s.name} failed: {s.last_error()}")
        elif s.restarts < c.max_restarts:
          s.restarts += 1
          print(f"fmx: stage {s.name} died ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)}); "
                f"restart {s.restarts}", file=sys.stderr)
          s.start()
        else:
          raise RunError(f"stage {s.name} died {s.restarts + 1} times (last exit {code}): "
                         f"{s.last_error()}")
      write_states(stages, workdir)
      for name, n in progress(workdir).items():
        if n != bars[name].n:
          bars[name].update(n - bars[name].n)
  except BaseException:
    for s in stages:
      if s.state == "running" and s.proc.poll() is None:
        s.proc.send_signal(signal.SIGTERM)  # each stage checkpoints and stops
    for s in stages:
      if s.proc is not None:
        try:
          s.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
          s.proc.kill()
    raise
  finally:
    write_states(stages, workdir)
    for b in bars.values():
      b.close()


def pin_before_start(c, workdir: str) -> None:
  """Pins, before the FM can publish (and collect), what the consumers will read: every version
  from 1 on for the logging tier and the experts that follow the newest (each moves its pin
  forward as it goes), and each pinned follower's version."""
  snaps = snapshots.Snapshots(os.path.join(workdir, "snapshots"))
  for consumer in ("logging", "experts-newest"):
    if consumer not in snaps.pins():  # a resumed pipeline keeps the pins its stages moved on
      snaps.pin(consumer, 1, and_newer=True)
  pinned = [str(f) for f in c.follow if str(f) != "newest"]
  snaps.prune_pins("follow-", {f"follow-{f}" for f in pinned})
  for f in pinned:
    snaps.pin(f"follow-{f}", int(f))


def write_states(stages: list[Stage], workdir: str) -> None:
  files.atomic_write(os.path.join(workdir, "stages.json"), json.dumps(
      {s.name: {"pid": s.proc.pid if s.proc else None, "restarts": s.restarts, "state": s.state}
       for s in stages}, indent=1))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  c, t0 = config, time.time()
  for sub in ("stages", "logs"):
    os.makedirs(os.path.join(workdir, sub), exist_ok=True)
  configs = stage_configs(c, workdir)
  for name, cfg in configs.items():  # every stage's config can run, before any starts
    try:
      common.check(ml_collections.ConfigDict(cfg))
    except common.ConfigError as e:
      raise common.ConfigError(str(e).replace("--config.", f"--config.{name}.", 1)) from None
  K, last = c.fm.stream.publish_every, c.producer.max_windows
  if last and last <= K:
    raise common.ConfigError(f"--config.producer.max_windows={last}: the log needs more windows "
                             f"than fm.stream.publish_every={K}, or no window has an FM version")
  data_load.load(c.fm.input, "surfaces")  # fetched and built once, not by four stages at once
  stages = [Stage(name, workdir) for name in STAGES]
  for s in stages:
    write_stage_config(s.config, configs[s.name])
  pin_before_start(c, workdir)
  supervise(stages, workdir, c)
  results = summary.summarise(workdir, c, {s.name: s.seconds for s in stages})
  results.update(restarts={s.name: s.restarts for s in stages},
                 wall_s=round(time.time() - t0, 2), steps=0, config=c.to_dict())
  print(summary.table(results))
  reporting.write_results(workdir, results)
  summary.plot(workdir)
  return results
