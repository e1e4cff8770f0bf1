"""fmx command line: `python -m fmx.main --config=fmx/configs/NAME.py[:variant] --workdir=DIR`.

Override any field with `--config.key=value`; unknown keys fail. `config.job` picks what runs.
Reusing a workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fmx.data.raw import RawDataError
from fmx.data.tae_store import StoreError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with :variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = ("retrieval", "fm", "expert")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # keep Orbax/TFDS chatter out of the default output
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config.job not in JOBS:
    raise app.UsageError(f"config.job={config.job!r}: expected one of {JOBS}")
  logging.info("Config:\n%s", config)
  import importlib  # heavy imports after flag parsing
  job = importlib.import_module(f"fmx.train.{config.job}")
  try:
    results = job.train_and_evaluate(config, _WORKDIR.value)
  except (RawDataError, StoreError) as e:
    print(f"fmx: {e}", file=sys.stderr)
    sys.exit(2)
  summary = {k: v for k, v in results.items()
             if k.startswith(("hr@10", "ndcg@10", "mrr", "ne_mean")) or k.startswith("rel_ne/")}
  print("results: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(summary.items())))
  print(f"wrote {_WORKDIR.value}/results.json (wall {results['wall_s']:.0f}s, "
        f"{results['steps']} steps)")


if __name__ == "__main__":
  app.run(main)
