"""What every config family shares: the variant parser, default directories, the fields of a
run, the knowledge carriers, and the checks a config passes before any data loads.

Plain values only: importing a config imports no fmx data, model or TensorFlow Datasets code.
"""

from __future__ import annotations

import os

import ml_collections

DEFAULT_DATA_DIR = os.environ.get("FMX_DATA_DIR", "~/.cache/fmx/tfds")  # TFDS data dir
DEFAULT_MANUAL_DIR = os.environ.get("FMX_MANUAL_DIR", "~/.cache/fmx/raw")  # raw sources

CARRIERS = ("none", "tae", "ue", "tae+ue")  # how an expert receives FM knowledge
COMPUTE_DTYPES = ("float32", "bfloat16")  # model.compute_dtype (fmx.train.state.gradient_step)

# Keys a resumed run may change freely: how long, how often, where and how verbosely it runs.
# Any other difference from the checkpoint's config needs `resume_anyway` (shapes never resume).
RESUMABLE_CHANGES = ("num_epochs", "progress", "log_every_steps", "checkpoint_every_steps",
                     "resume_anyway", "evals.", "mesh.", "model.compute_dtype", "input.row_groups",
                     "input.data_dir", "input.manual_dir", "input.fetch_wheel", "baseline.",
                     "tae.store", "surfaces", "stream.log_dir",
                     "stream.snapshots", "stream.store", "stream.poll_seconds",
                     "stream.idle_seconds", "stream.follow", "stream.keep_versions",
                     "stream.full_every")  # not stream.publish_every: it defines the versions


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and what to do."""


def parse_variant(arg: str | None, allowed, default: str) -> set[str]:
  """The comma-separated words of a config argument (`:base,runlocal`), each one of `allowed`."""
  words = {w.strip() for w in (arg or default).split(",") if w.strip()}
  unknown = words - set(allowed)
  if unknown:
    raise ConfigError(f"unknown config variant(s) {sorted(unknown)}; expected words from "
                      f"{', '.join(allowed)}")
  return words


def add_run_fields(c: ml_collections.ConfigDict, *, job: str, seed: int, num_epochs: int,
                   log_every_steps: int) -> None:
  """The top-level fields the training loop reads."""
  c.job = job  # what fmx.main runs (fmx/jobs.py)
  c.seed = seed  # parameters, dropout, negatives and shuffling all derive from it
  c.num_epochs = num_epochs  # passes over the training data
  c.log_every_steps = log_every_steps  # training scalars to TensorBoard / progress bar
  c.checkpoint_every_steps = 0  # also checkpoint every N steps (0: at the end of every epoch only)
  c.progress = True  # tqdm progress bar with ETA on stderr
  c.resume_anyway = False  # resume although the seed, batch size or data changed


POSITIVE = ("num_epochs", "log_every_steps", "input.batch_size", "evals.batch_size",
            "evals.every_epochs", "input.max_len", "input.max_history", "input.num_candidates",
            "input.windows_per_user", "input.short_len", "input.row_groups", "model.dim",
            "model.num_layers", "model.num_heads", "model.dqk", "model.dv", "model.max_len",
            "loss.num_negatives", "baseline.num_epochs", "batch_size", "stream.publish_every",
            "stream.full_every", "stream.keep_versions", "window_seconds", "batches_per_shard",
            "stream.update_every", "drift.rows", "drift.permutations")
NON_NEGATIVE = ("checkpoint_every_steps", "evals.every_steps", "optimizer.warmup_steps", "fm_step",
                "max_windows", "max_restarts", "stream.start_window", "start_window", "end_window")


def mesh() -> ml_collections.ConfigDict:
  """The `mesh` section: the device mesh and the logical axis rules (fmx/train/sharding.py)."""
  m = ml_collections.ConfigDict()
  m.data = -1  # devices on the data axis (-1: all that remain)
  m.model = 1  # devices on the model axis
  m.item_table = "rows"  # the item table: "rows" or "columns" over `model`, or "replicated"
  m.fsdp = False  # also shard the width of dense parameters over `data`
  m.rules = ()  # (logical axis, mesh axis or None) pairs added to the table
  return m


def flatten(c: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
  """`{"a.b": value}` for every leaf."""
  out = {}
  for k, v in (c.items() if isinstance(c, dict) else c.to_dict().items()):
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def check(c: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first key whose value cannot run."""
  flat = flatten(c)
  for key in POSITIVE + NON_NEGATIVE:
    if key not in flat:
      continue
    v, low = flat[key], (1 if key in POSITIVE else 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ConfigError(f"--config.{key}={v!r}: expected an integer >= {low}")
  for key in ("follow", "stream.follow"):
    for f in flat.get(key) or ():
      if str(f) != "newest" and not (str(f).isdigit() and int(f) >= 1):
        raise ConfigError(f"--config.{key}: entry {f!r}: expected 'newest' or an FM version "
                          "number >= 1")
  v = flat.get("user_fraction")
  if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
    raise ConfigError(f"--config.user_fraction={v!r}: expected a fraction in (0, 1]")
  groups, rows = flat.get("input.row_groups"), flat.get("input.batch_size")
  if isinstance(groups, int) and isinstance(rows, int) and groups >= 1 and rows % groups:
    raise ConfigError(f"--config.input.row_groups={groups}: expected a divisor of "
                      f"input.batch_size={rows}")
  if isinstance(groups, int) and groups > 1 and not flat.get("input.length_buckets"):
    raise ConfigError(f"--config.input.row_groups={groups} cuts each group to a length bucket; "
                      "set input.length_buckets (for example the default (32, 64, 96, 128, 160))")
  v = flat.get("model.compute_dtype")
  if v is not None and v not in COMPUTE_DTYPES:
    raise ConfigError(f"--config.model.compute_dtype={v!r}: expected 'float32' or 'bfloat16'")
  for key in ("optimizer.lr", "loss.temperature", "model.dropout"):
    v = flat.get(key)
    if v is not None and not (isinstance(v, (int, float)) and v == v and abs(v) != float("inf")):
      raise ConfigError(f"--config.{key}={v!r}: expected a finite number")
