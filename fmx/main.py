"""fmx command line: `python -m fmx.main --config=fmx/configs/NAME.py[:variant] --workdir=DIR`.

Override any field with `--config.key=value`; unknown keys fail. `config.job` picks what runs
(`fmx/jobs.py`). Reusing a workdir resumes from its newest intact checkpoint; one run at a time
holds a workdir. Bad input ends with one line on stderr and exit status 2; SIGINT/SIGTERM save a
checkpoint first and say how to resume.

Several processes, one run (`fmx/distributed.py`): start the same command on every host with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (HOST:PORT reachable on
process 0), or with `--distributed` where JAX finds them itself (TPU VMs, SLURM, Open MPI).
"""

from __future__ import annotations

import os
import re
import signal
import sys

if __name__ == "__main__":  # first, before JAX loads: an allocator that keeps freed memory
  from fmx import allocator
  allocator.restart()

from absl import app, flags, logging
from ml_collections import config_flags

from fmx import files, jobs
from fmx.configs import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0 of a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (0 is the primary).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "A multi-process run whose processes JAX "
                                 "detects (TPU VM pod slices, SLURM, Open MPI).")
SUMMARY = ("hr@10", "ndcg@10", "mrr", "ne_mean", "rel_ne/", "rows", "windows", "events",
           "requests/")


def fail(message: str, status: int = 2):
  print(f"fmx: error: {message}", file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (a missing or broken config file, an unknown key,
  a bad variant word) instead of a usage dump or a traceback."""
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # an override naming a key the config lacks
    key = str(e).strip("\"'")
    if not any(a.startswith("--config.") and f".{key}" in a.split("=")[0] for a in argv):
      fail(f"--config: {type(e).__name__}: {e}")  # an error inside the config file itself
    fail(f"unknown config key '{key}' in a --config.* override; the config file lists the keys")
  except flags.Error as e:  # the last line names the cause, also of an error in a config file
    lines = [l for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    first, last = lines[0], re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
    fail(first if first == lines[-1] else f"{first.split(':')[0]}: {last}")
  except Exception as e:  # pylint: disable=broad-except
    fail(f"--config: {type(e).__name__}: {e}")
  for name in ("config", "workdir"):
    if flags.FLAGS[name].value is None:
      fail(f"--{name} is required (python -m fmx.main --config=fmx/configs/NAME.py --workdir=DIR)")
  return rest


def usable_workdir(workdir: str) -> str:
  if not workdir.strip():
    fail("--workdir is empty: name a directory for checkpoints and results")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    fail(f"--workdir={workdir}: cannot create it ({e.strerror})")
  if not os.access(workdir, os.W_OK | os.X_OK):
    fail(f"--workdir={workdir}: not writable")
  return workdir


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; overrides look like --config.key=value")
  if not flags.FLAGS["verbosity"].present:  # keep Orbax/TFDS chatter out of the default output
    logging.set_verbosity(logging.WARNING)
  try:
    config = _CONFIG.value
    job = config.get("job")
  except OSError:
    fail(f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}: cannot load it "
         "(no such file, or it fails to import); configs live in fmx/configs/")
  if job not in jobs.JOBS:
    fail(f"config.job={job!r}: expected one of {sorted(jobs.JOBS)}")
  workdir = usable_workdir(_WORKDIR.value)
  from fmx import distributed
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _DISTRIBUTED.value)
  except (ValueError, RuntimeError) as e:
    fail(f"cannot join the run's processes: {e}")
  from fmx.data.raw import RawDataError  # heavy imports after the flags are checked
  from fmx.data.tae_store import StoreError
  from fmx.hypercast.event_log import LogError
  from fmx.hypercast.snapshots import SnapshotError
  from fmx.runtime.checkpoint import CheckpointError
  from fmx.serving.versions import VersionError
  from fmx.train.loop import RunError, Stopped
  def interrupt(signum, frame):
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, interrupt)  # outside the training loop, SIGTERM is Ctrl-C
  try:
    common.check(config)
    with distributed.primary_only(files.exclusive(os.path.join(workdir, ".lock"),
                                                  f"workdir {workdir}")):
      stale = os.path.join(workdir, "results.json")  # written again when this run finishes
      if distributed.is_primary() and os.path.exists(stale):
        os.remove(stale)
      results = jobs.run(config, workdir)
  except KeyboardInterrupt:  # before the loop took over the signals, or a second signal
    fail(f"interrupted; rerun the same command to resume from the newest checkpoint in "
         f"{workdir}", 130)
  except Stopped as e:
    print(f"fmx: {e}", file=sys.stderr)
    sys.exit(128 + (signal.SIGTERM if "SIGTERM" in str(e) else signal.SIGINT))
  except (RawDataError, StoreError, CheckpointError, RunError, files.LockedError,
          common.ConfigError, LogError, SnapshotError, VersionError, distributed.PeerError) as e:
    fail(str(e))
  except ValueError as e:  # a config value that the job rejects
    if flags.FLAGS["verbosity"].present:
      raise
    fail(f"{e} (rerun with --verbosity=1 for the traceback)")
  summary = {k: v for k, v in results.items() if k.startswith(SUMMARY)}
  print("results: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in sorted(summary.items())))
  print(f"wrote {workdir}/results.json (wall {results['wall_s']:.0f}s, {results['steps']} steps)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
