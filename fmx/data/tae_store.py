"""The store of materialised target-aware embeddings (TAEs), written by the offline logging tier
and read by expert trainers (which therefore never import hypercast or call the FM).

Layout of a store directory:
  shard-<fm_version>-<index>.npz   parallel arrays, one row per impression (candidate)
  manifest.json                    {"shards": [{"file", "fm_version", "rows", "sha256"}, ...]}
A shard is written to a temporary file, fsynced and renamed; only then is the manifest (itself
written and renamed atomically) extended, so a reader never sees a partial shard and a killed
writer loses nothing but the shard in flight. Every row carries the FM version that produced it;
readers bind to one version and verify checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib

import numpy as np

MANIFEST = "manifest.json"
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}  # the `split` column of logging-tier rows


class StoreError(ValueError):
  """A missing, corrupt or inconsistent TAE store; the message names the file."""


def _fsync_write(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_manifest(root: os.PathLike | str) -> dict:
  path = pathlib.Path(root) / MANIFEST
  if not path.is_file():
    return {"shards": []}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise StoreError(f"{path}: corrupt manifest ({e}); restore it from the shards' checksums") from None


def write_shard(root: os.PathLike | str, fm_version: str, arrays: dict[str, np.ndarray]) -> str:
  """Appends one shard atomically and returns its file name. All arrays share their first axis."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rows = {len(v) for v in arrays.values()}
  if len(rows) != 1:
    raise StoreError(f"shard arrays differ in length: { {k: len(v) for k, v in arrays.items()} }")
  manifest = read_manifest(root)
  index = sum(s["fm_version"] == fm_version for s in manifest["shards"])
  name = f"shard-{fm_version}-{index:05d}.npz"

  buf = io.BytesIO()
  np.savez(buf, fm_version=np.array(fm_version), **arrays)
  data = buf.getvalue()
  _fsync_write(root / name, data)
  manifest["shards"].append({"file": name, "fm_version": fm_version, "rows": rows.pop(),
                             "sha256": hashlib.sha256(data).hexdigest()})
  _fsync_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())
  return name


def versions(root: os.PathLike | str) -> list[str]:
  return sorted({s["fm_version"] for s in read_manifest(root)["shards"]})


def read(root: os.PathLike | str, fm_version: str, start_shard: int = 0):
  """Yields (shard index, arrays) of every shard of `fm_version` from `start_shard` on, in
  write order, verifying each checksum. New shards written meanwhile are picked up."""
  root = pathlib.Path(root)
  i = start_shard
  while True:
    shards = [s for s in read_manifest(root)["shards"] if s["fm_version"] == fm_version]
    if i >= len(shards):
      return
    entry = shards[i]
    path = root / entry["file"]
    try:
      data = path.read_bytes()
    except FileNotFoundError:
      raise StoreError(f"{path}: listed in the manifest but missing") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
      raise StoreError(f"{path}: checksum mismatch (corrupt shard); re-run the logging tier for it")
    import io
    with np.load(io.BytesIO(data)) as z:
      arrays = {k: z[k] for k in z.files if k != "fm_version"}
      if str(z["fm_version"]) != fm_version:
        raise StoreError(f"{path}: holds FM version {z['fm_version']}, manifest says {fm_version}")
    yield i, arrays
    i += 1
