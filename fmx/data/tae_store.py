"""The store of materialised target-aware embeddings (TAEs), written by the offline logging tier
and read by expert trainers (which therefore never import hypercast or call the FM).

Layout of a store directory `root`:
  <version>/shard-<index:05d>.npz  parallel arrays, one row per impression, plus `_store`, a JSON
                                   tag {fm_version, index, meta, sha256 of the whole content}
  <version>/manifest.json          {format, fm_version, meta, rows, shards: [{file, rows, sha256}]}
  .staging-<version>/              a version being written (invisible to readers)
  .lock-<version>                  the writer's OS lock (holds its PID)
A version is written under its lock into its staging directory and committed by renaming that
directory to <version> in one step, so a version directory is complete by construction and
versions are immutable. Shards verify without the manifest; a missing or malformed manifest is
rebuilt from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import warnings
import zipfile
from typing import Iterator

import numpy as np

from fmx.files import LockedError, atomic_write, exclusive, fsync_dir

MANIFEST = "manifest.json"
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}  # the `split` column of logging-tier rows
FORMAT = 1
_TAG = "_store"  # the array (a JSON string) that tags every shard
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class StoreError(ValueError):
  """A missing, corrupt or inconsistent TAE store; the message names the file and what to do."""


def version_dir(root, fm_version) -> pathlib.Path:
  if not isinstance(fm_version, str) or not _SAFE.fullmatch(fm_version):
    raise StoreError(f"unsafe FM version name {fm_version!r}: use 1-100 letters, digits, '.', '_' "
                     "or '-', starting with a letter or digit")
  return pathlib.Path(root) / fm_version


def _name(index: int) -> str:
  return f"shard-{index:05d}.npz"


def _digest(tag: dict, arrays: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256(json.dumps([tag["fm_version"], tag["index"], tag["meta"]]).encode())
  for k in sorted(arrays):
    a = np.ascontiguousarray(arrays[k])
    h.update(json.dumps([k, a.dtype.str, a.shape]).encode() + a.tobytes())
  return h.hexdigest()


def _load(path: pathlib.Path, fm_version: str, index: int) -> tuple[dict, dict[str, np.ndarray]]:
  """The tag and arrays of shard `index` of `fm_version`, verified against its own checksum."""
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    tag = json.loads(str(arrays.pop(_TAG)))
    why = None
    if _digest(tag, arrays) != tag["sha256"]:
      why = "checksum mismatch"
    elif (tag["fm_version"], tag["index"]) != (fm_version, index):
      why = f"holds shard {tag['index']} of version {tag['fm_version']!r}, not shard {index}"
  except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
    why = f"unreadable: {e}"
  if why:
    raise StoreError(f"{path}: corrupt shard ({why}); delete {path.parent} and re-run the logging "
                     f"tier for version {fm_version!r}")
  return tag, arrays


def _manifest_of(fm_version: str, meta: dict, shards: list[dict]) -> dict:
  return {"format": FORMAT, "fm_version": fm_version, "meta": meta,
          "rows": sum(s["rows"] for s in shards), "shards": shards}


def _manifest(root, fm_version: str) -> dict:
  """The manifest of a committed version, rebuilt from its verified shards if missing or bad."""
  vdir = version_dir(root, fm_version)
  if not vdir.is_dir():
    raise StoreError(f"{root}: no FM version {fm_version!r} (versions present: {versions(root)}); "
                     "materialise it with the logging tier")
  try:
    m = json.loads((vdir / MANIFEST).read_text())
    shards = [{"file": _name(i), "rows": int(s["rows"]), "sha256": str(s["sha256"])}
              for i, s in enumerate(m["shards"])]
    if shards and m == _manifest_of(fm_version, m["meta"], shards) and isinstance(m["meta"], dict):
      return m
    why = "malformed"
  except FileNotFoundError:
    why = "missing"
  except (OSError, ValueError, KeyError, TypeError) as e:
    why = f"malformed ({e!r})"
  files, shards, meta = sorted(vdir.glob("shard-*.npz")), [], None
  if not files:
    raise StoreError(f"{vdir}: no manifest and no shards; delete it and re-run the logging tier "
                     f"for version {fm_version!r}")
  for i, path in enumerate(files):
    tag, arrays = _load(path, fm_version, i)
    if path.name != _name(i) or meta not in (None, tag["meta"]):
      raise StoreError(f"{path}: expected {_name(i)} of version {fm_version!r}; delete {vdir} and "
                       "re-run the logging tier")
    meta = tag["meta"]
    shards.append({"file": path.name, "rows": len(next(iter(arrays.values()))),
                   "sha256": tag["sha256"]})
  m = _manifest_of(fm_version, meta, shards)
  try:
    atomic_write(vdir / MANIFEST, json.dumps(m, indent=1))
  except OSError as e:  # a read-only store: use the rebuilt manifest without saving it
    why += f" (not saved: {e.strerror})"
  warnings.warn(f"{vdir / MANIFEST}: {why}; rebuilt from {len(files)} verified shards")
  return m


class VersionWriter:
  """Writes the shards of one version into its staging directory; see `write_version`."""

  def __init__(self, staging: pathlib.Path, fm_version: str, meta: dict):
    self._dir, self._version, self._meta, self.shards = staging, fm_version, meta, []

  def write_shard(self, arrays: dict[str, np.ndarray]) -> int:
    """Writes one shard (arrays sharing their first axis) and returns its index."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: a.shape[0] if a.ndim else None for k, a in arrays.items()}
    if (len(set(lengths.values())) != 1 or None in lengths.values() or _TAG in arrays
        or any(a.dtype.hasobject for a in arrays.values())):
      raise StoreError(f"version {self._version!r}: shard arrays differ in length, are scalars or "
                       f"hold objects ({lengths}); give every array (none named {_TAG!r}) the "
                       "same first axis and a numeric or string dtype")
    tag = {"fm_version": self._version, "index": len(self.shards), "meta": self._meta}
    tag["sha256"] = _digest(tag, arrays)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays, **{_TAG: np.array(json.dumps(tag))})
    atomic_write(self._dir / _name(tag["index"]), buf.getvalue())
    self.shards.append({"file": _name(tag["index"]), "rows": lengths.popitem()[1],
                        "sha256": tag["sha256"]})
    return tag["index"]


@contextlib.contextmanager
def write_version(root, fm_version: str, meta: dict | None = None) -> Iterator[VersionWriter]:
  """Writes version `fm_version` under an exclusive lock; it becomes visible, complete, only when
  the `with` block exits normally having written a shard; never if it raises or the process dies."""
  root, final = pathlib.Path(root), version_dir(root, fm_version)
  meta = {} if meta is None else meta
  if not isinstance(meta, dict):
    raise StoreError(f"version {fm_version!r}: meta must be a dict, got {type(meta).__name__}")
  meta = json.loads(json.dumps(meta))  # as a reader will see it
  with contextlib.ExitStack() as stack:
    try:
      stack.enter_context(exclusive(root / f".lock-{fm_version}",
                                    f"TAE store {root} version {fm_version!r}"))
    except LockedError as e:
      raise StoreError(str(e)) from None
    if final.exists():
      raise StoreError(f"{final}: version {fm_version!r} is already committed and versions are "
                       "immutable; use a new version name or delete that directory to redo it")
    staging = root / f".staging-{fm_version}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed writer; we hold the lock
    staging.mkdir()
    writer = VersionWriter(staging, fm_version, meta)
    try:
      yield writer
      if not writer.shards:
        raise StoreError(f"version {fm_version!r}: no shard was written, so nothing is committed")
      m = _manifest_of(fm_version, meta, writer.shards)
      atomic_write(staging / MANIFEST, json.dumps(m, indent=1))
      os.rename(staging, final)  # the commit
      fsync_dir(root)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise


def versions(root) -> list[str]:
  """The committed versions in `root`, sorted; [] if `root` does not exist."""
  root = pathlib.Path(root)
  dirs = root.iterdir() if root.is_dir() else []
  return sorted(p.name for p in dirs if p.is_dir() and _SAFE.fullmatch(p.name))


# A streaming store holds one version per window of the event log, `w<window:06d>`, and
# `CLOSED` once the logging tier has logged the last window of a closed log.
CLOSED = "closed.json"


def window_version(window: int) -> str:
  return f"w{window:06d}"


def windows(root) -> list[int]:
  """The windows committed in a streaming store, sorted."""
  return [int(v[1:]) for v in versions(root) if re.fullmatch(r"w\d{6}", v)]


def version_meta(root, fm_version: str) -> dict:
  """The meta given when `fm_version` was written, plus its `rows` and `shards` counts and the
  shards' `sha256` (which identify the version's content)."""
  m = _manifest(root, fm_version)
  return {**m["meta"], "rows": m["rows"], "shards": len(m["shards"]),
          "sha256": [s["sha256"] for s in m["shards"]]}


def read(root, fm_version: str,
         start_shard: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields (shard index, arrays) of `fm_version` from `start_shard` on, in write order, verifying
  each shard's checksum. Raises at once for an unknown version or a negative `start_shard`."""
  if not isinstance(start_shard, int) or start_shard < 0:
    raise StoreError(f"start_shard must be a non-negative int, got {start_shard!r}")
  shards, vdir = _manifest(root, fm_version)["shards"], version_dir(root, fm_version)

  def verified():
    for i, entry in enumerate(shards[start_shard:], start_shard):
      tag, arrays = _load(vdir / entry["file"], fm_version, i)
      if tag["sha256"] != entry["sha256"]:
        raise StoreError(f"{vdir / entry['file']}: does not match {vdir / MANIFEST}; delete "
                         f"{vdir} and re-run the logging tier for version {fm_version!r}")
      yield i, arrays
  return verified()
