"""The store of materialised target-aware embeddings (TAEs), written by the offline logging tier
and read by expert trainers (which therefore never import hypercast or call the FM).

Layout of a store directory `root`:
  <version>/shard-<index:05d>.array_record  one record per row: the row's bytes in the shard's
                                            numpy structured dtype (readable with random access,
                                            e.g. by grain's `ArrayRecordDataSource`)
  <version>/shard-<index:05d>.json          its tag: {format, fm_version, index, rows, schema,
                                            info, sha256 of the array_record file}
  <version>/manifest.json                   {format, fm_version, meta, rows, shards: [tags]}
  <version>/meta.json                       the version's meta (to rebuild a lost manifest)
  .staging-<version>/                       a version being written (invisible to readers)
  .lock-<version>                           the writer's OS lock (holds its PID)
A version is written under its lock into its staging directory, where any number of processes
(e.g. Beam workers) may write shards in parallel (`write_shard`), and committed by its one
writer: the manifest is made from the shards' tags, then the staging directory is renamed to
<version> in one step, so a version directory is complete by construction and versions are
immutable. Shards verify without the manifest; a missing or malformed manifest is rebuilt from
the tags. Readers stream one shard at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import warnings
from typing import Iterator

import numpy as np
from array_record.python import array_record_module

from fmx.files import LockedError, atomic_write, exclusive, fsync_dir

MANIFEST = "manifest.json"
META = "meta.json"
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}  # the `split` column of logging-tier rows
FORMAT = 2
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_WRITE_OPTIONS = "group_size:1,uncompressed"  # a record per chunk: cheap random access
_RANDOM_ACCESS = "readahead_buffer_size:0,max_parallelism:0"


class StoreError(ValueError):
  """A missing, corrupt or inconsistent TAE store; the message names the file and what to do."""


def version_dir(root, fm_version) -> pathlib.Path:
  if not isinstance(fm_version, str) or not _SAFE.fullmatch(fm_version):
    raise StoreError(f"unsafe FM version name {fm_version!r}: use 1-100 letters, digits, '.', '_' "
                     "or '-', starting with a letter or digit")
  return pathlib.Path(root) / fm_version


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.array_record"


def _tag_name(index: int) -> str:
  return f"shard-{index:05d}.json"


def _dtype(schema: list) -> np.dtype:
  return np.dtype([(name, dt, tuple(shape)) for name, dt, shape in schema])


def _file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def decode(records: list[bytes], schema: list) -> dict[str, np.ndarray]:
  """Columns of the rows whose records are `records` (rows of one shard's `schema`)."""
  rows = np.frombuffer(b"".join(records), _dtype(schema))
  return {name: np.ascontiguousarray(rows[name]) for name, _, _ in schema}


def write_shard(staging, fm_version: str, index: int, arrays: dict[str, np.ndarray],
                info: dict | None = None) -> dict:
  """Writes shard `index` of `fm_version` into a version's `staging` directory (from any
  process; rewriting an index replaces it) and returns its tag. `info` is kept in the tag."""
  arrays = {k: np.asarray(v) for k, v in sorted(arrays.items())}
  lengths = {k: a.shape[0] if a.ndim else None for k, a in arrays.items()}
  if (not arrays or len(set(lengths.values())) != 1 or None in lengths.values()
      or any(a.dtype.hasobject for a in arrays.values())):
    raise StoreError(f"version {fm_version!r}: shard arrays differ in length, are scalars or "
                     f"hold objects ({lengths}); give every array the same first axis and a "
                     "numeric or string dtype")
  schema = [[k, a.dtype.str, list(a.shape[1:])] for k, a in arrays.items()]
  rows = np.empty(lengths.popitem()[1], _dtype(schema))
  for k, a in arrays.items():
    rows[k] = a
  staging, size = pathlib.Path(staging), rows.dtype.itemsize
  path = staging / shard_name(index)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  writer = array_record_module.ArrayRecordWriter(str(tmp), _WRITE_OPTIONS)
  buf = rows.tobytes()
  for i in range(len(rows)):
    writer.write(buf[i * size:(i + 1) * size])
  writer.close()
  os.replace(tmp, path)
  tag = {"format": FORMAT, "fm_version": fm_version, "index": index, "file": path.name,
         "rows": len(rows), "schema": schema, "info": json.loads(json.dumps(info or {})),
         "sha256": _file_sha256(path)}
  atomic_write(staging / _tag_name(index), json.dumps(tag))  # the tag last: the shard is whole
  return tag


def _load(vdir: pathlib.Path, tag: dict) -> dict[str, np.ndarray]:
  """The columns of the shard `tag` describes, verified against its checksum."""
  path = vdir / tag["file"]
  try:
    why = "checksum mismatch" if _file_sha256(path) != tag["sha256"] else None
    if not why:
      reader = array_record_module.ArrayRecordReader(str(path))
      try:
        records = reader.read_all() if tag["rows"] else []
      finally:
        reader.close()
      if len(records) != tag["rows"]:
        why = f"{len(records)} records, not {tag['rows']}"
  except (OSError, RuntimeError, ValueError) as e:
    why = f"unreadable: {e}"
  if why:
    raise StoreError(f"{path}: corrupt shard ({why}); delete {vdir} and re-run the logging "
                     f"tier for version {tag['fm_version']!r}")
  return decode(records, tag["schema"])


def _manifest_of(fm_version: str, meta: dict, shards: list[dict]) -> dict:
  return {"format": FORMAT, "fm_version": fm_version, "meta": meta,
          "rows": sum(s["rows"] for s in shards), "shards": shards}


def _tags(directory: pathlib.Path, fm_version: str) -> list[dict]:
  """The shard tags in `directory`, which must be shards 0..n-1 of `fm_version`."""
  tags = []
  for i, path in enumerate(sorted(directory.glob("shard-*.json"))):
    try:
      tag = json.loads(path.read_text())
      ok = (tag["fm_version"], tag["index"], path.name) == (fm_version, i, _tag_name(i))
    except (OSError, ValueError, KeyError, TypeError):
      ok = False
    if not ok:
      raise StoreError(f"{path}: not the tag of shard {i} of version {fm_version!r}; delete "
                       f"{directory} and re-run the logging tier")
    tags.append(tag)
  return tags


def manifest(root, fm_version: str) -> dict:
  """The manifest of a committed version, rebuilt from its shard tags if missing or bad."""
  vdir = version_dir(root, fm_version)
  if not vdir.is_dir():
    raise StoreError(f"{root}: no FM version {fm_version!r} (versions present: {versions(root)}); "
                     "materialise it with the logging tier")
  try:
    m = json.loads((vdir / MANIFEST).read_text())
    if (m["shards"] and isinstance(m["meta"], dict)
        and m == _manifest_of(fm_version, m["meta"], m["shards"])
        and all(s["index"] == i and s["file"] == shard_name(i) for i, s in enumerate(m["shards"]))):
      return m
    why = "malformed"
  except FileNotFoundError:
    why = "missing"
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    why = f"malformed ({e!r})"
  tags = _tags(vdir, fm_version)
  if not tags:
    old = " (it holds .npz shards: a store of fmx before format 2)" if any(
        vdir.glob("shard-*.npz")) else ""
    raise StoreError(f"{vdir}: no manifest and no shards{old}; delete it and re-run the logging "
                     f"tier for version {fm_version!r}")
  for tag in tags:
    _load(vdir, tag)  # never rebuilt from a bad shard
  try:
    meta = json.loads((vdir / META).read_text())
  except (OSError, ValueError) as e:
    raise StoreError(f"{vdir}: its manifest is {why} and {META} is unreadable ({e}); delete it and "
                     f"re-run the logging tier for version {fm_version!r}") from None
  m = _manifest_of(fm_version, meta, tags)
  try:
    atomic_write(vdir / MANIFEST, json.dumps(m, indent=1))
  except OSError as e:  # a read-only store: use the rebuilt manifest without saving it
    why += f" (not saved: {e.strerror})"
  warnings.warn(f"{vdir / MANIFEST}: {why}; rebuilt from {len(tags)} verified shards")
  return m


class VersionWriter:
  """The one writer of a version being staged; see `write_version`. Shards come from
  `write_shard` (numbered in call order) or from any process given `staging`; `meta` may be
  changed until the commit."""

  def __init__(self, staging: pathlib.Path, fm_version: str, meta: dict):
    self.staging, self.fm_version, self.meta, self._next = staging, fm_version, meta, 0

  def write_shard(self, arrays: dict[str, np.ndarray], info: dict | None = None) -> int:
    """Writes the next shard (arrays sharing their first axis) and returns its index."""
    index, self._next = self._next, self._next + 1
    write_shard(self.staging, self.fm_version, index, arrays, info)
    return index

  def tags(self) -> list[dict]:
    """The tags of the shards staged so far (by any process), in index order."""
    return _tags(self.staging, self.fm_version)


def staging_dir(root, fm_version: str) -> pathlib.Path:
  """Where `write_version` stages `fm_version`: other processes write their shards there."""
  return pathlib.Path(root) / f".staging-{fm_version}"


@contextlib.contextmanager
def write_version(root, fm_version: str, meta: dict | None = None) -> Iterator[VersionWriter]:
  """Writes version `fm_version` under an exclusive lock; it becomes visible, complete, only when
  the `with` block exits normally with shards 0..n-1 staged; never if it raises or the process
  dies."""
  root, final = pathlib.Path(root), version_dir(root, fm_version)
  meta = {} if meta is None else meta
  if not isinstance(meta, dict):
    raise StoreError(f"version {fm_version!r}: meta must be a dict, got {type(meta).__name__}")
  with contextlib.ExitStack() as stack:
    try:
      stack.enter_context(exclusive(root / f".lock-{fm_version}",
                                    f"TAE store {root} version {fm_version!r}"))
    except LockedError as e:
      raise StoreError(str(e)) from None
    if final.exists():
      raise StoreError(f"{final}: version {fm_version!r} is already committed and versions are "
                       "immutable; use a new version name or delete that directory to redo it")
    staging = staging_dir(root, fm_version)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed writer; we hold the lock
    staging.mkdir()
    writer = VersionWriter(staging, fm_version, meta)
    try:
      yield writer
      tags = _tags(staging, fm_version)
      if not tags:
        raise StoreError(f"version {fm_version!r}: no shard was written, so nothing is committed")
      meta = json.loads(json.dumps(writer.meta))  # as a reader will see it
      atomic_write(staging / META, json.dumps(meta))
      atomic_write(staging / MANIFEST, json.dumps(_manifest_of(fm_version, meta, tags), indent=1))
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
  m = manifest(root, fm_version)
  return {**m["meta"], "rows": m["rows"], "shards": len(m["shards"]),
          "sha256": [s["sha256"] for s in m["shards"]]}


def read(root, fm_version: str, start_shard: int = 0,
         shards: list[int] | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields (shard index, columns) of `fm_version`, one verified shard at a time: shards
  `start_shard`.. in write order, or only those in `shards`. Raises at once for an unknown
  version or a negative `start_shard`."""
  if not isinstance(start_shard, int) or start_shard < 0:
    raise StoreError(f"start_shard must be a non-negative int, got {start_shard!r}")
  tags, vdir = manifest(root, fm_version)["shards"], version_dir(root, fm_version)
  wanted = range(start_shard, len(tags)) if shards is None else shards

  def verified():
    for i in wanted:
      yield i, _load(vdir, tags[i])
  return verified()


class RowSource:
  """Random access to the rows of one version (shards in order) for grain: `len`, and
  `source[i]` / `source.rows(indices)` as columns. Shards must share a schema (empty ones are
  skipped); every shard's checksum is verified when the source is made."""

  def __init__(self, root, fm_version: str):
    vdir = version_dir(root, fm_version)
    tags = [t for t in manifest(root, fm_version)["shards"] if t["rows"]]
    if len({json.dumps(t["schema"]) for t in tags}) > 1:
      raise StoreError(f"{vdir}: its shards hold different columns; read them with tae_store.read")
    for tag in tags:
      if _file_sha256(vdir / tag["file"]) != tag["sha256"]:
        raise StoreError(f"{vdir / tag['file']}: corrupt shard (checksum mismatch); delete {vdir} "
                         f"and re-run the logging tier for version {fm_version!r}")
    self.schema = tags[0]["schema"] if tags else []
    self._paths = [str(vdir / t["file"]) for t in tags]
    self._readers = [None] * len(tags)  # opened on first use (and again after pickling)
    self._starts = np.cumsum([0] + [t["rows"] for t in tags])

  def __getstate__(self) -> dict:  # for grain's worker processes
    return {**self.__dict__, "_readers": [None] * len(self._paths)}

  def _reader(self, shard: int):
    if self._readers[shard] is None:
      self._readers[shard] = array_record_module.ArrayRecordReader(self._paths[shard],
                                                                   _RANDOM_ACCESS)
    return self._readers[shard]

  def __len__(self) -> int:
    return int(self._starts[-1])

  def rows(self, indices) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"row indices must lie in [0, {len(self)})")
    shard = np.searchsorted(self._starts, indices, side="right") - 1
    records = [None] * len(indices)
    for s in np.unique(shard):
      at = np.flatnonzero(shard == s)
      got = self._reader(s).read([int(i) for i in indices[at] - self._starts[s]])
      for j, r in zip(at, got):
        records[j] = r
    return decode(records, self.schema)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.rows([index]).items()}

  def close(self) -> None:
    for r in self._readers:
      if r is not None:
        r.close()
    self._readers = [None] * len(self._paths)
