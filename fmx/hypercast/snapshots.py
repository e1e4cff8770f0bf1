"""Versioned FM snapshots, published by one streaming FM trainer and read by other processes
(the logging tier reads whole params; expert trainers read only the embedding tables).

Layout of `root`: `orbax/<version>/`, a verified Orbax step (fmx.runtime.checkpoint) holding
`tables` (a full version) or `rows` (a delta: {"index", "values"} of each table's changed rows),
and `dense`, its meta recording every leaf's shape and dtype; `manifest.json`, {"format",
"versions": [entry, ...]} oldest first; `pins/<consumer>.json`, {"consumer", "version",
"and_newer"}; `.publisher.lock` and `pins/.lock`, the OS locks of the publisher and the pins.
A version is saved, and waited for, before its entry enters the manifest, so readers that follow
the manifest never see a partial version. A delta is read by assembling its chain (the full
version `base`, then every delta up to it), checked against the entry's `tables_sha256`.
Pin protocol: `pin` takes the pins lock, checks that the version is still in the manifest
(raising if it was collected; one not yet published may be pinned ahead) and writes the pin;
`collect` reads the pins and rewrites the manifest under the same lock, so a version pinned
without error stays until it is unpinned. A version read unpinned may be collected under the
reader (the read then raises).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fmx.files import LockedError, atomic_write, exclusive
from fmx.runtime.checkpoint import Checkpointer, Damaged, checksums, digest, warn

CORE = {"version", "kind", "base", "parent", "bytes", "full_bytes", "table_rows", "dim", "vocab",
        "published_at", "checksums", "tables_sha256",
        "sha256"}  # the entry fields `publish` sets, and `sha256`, which it set before `checksums`
_CONSUMER = re.compile(r"[A-Za-z0-9_.-]+")


class SnapshotError(ValueError):
  """A missing, damaged or mismatched snapshot; the message names the version and directory and
  what to do."""


def _flat(tree) -> dict[str, object]:
  """{"a/b/c": leaf} of a nested dict of arrays, on the host."""
  flat = flatten_dict(jax.device_get(tree))
  if any(not isinstance(k, str) or "/" in k for path in flat for k in path):
    raise SnapshotError(f"params keys {list(flat)[:3]}...: use string keys without '/'")
  return {"/".join(path): x for path, x in flat.items()}


def _nest(flat: dict[str, object]) -> dict:
  return unflatten_dict(flat, sep="/")


def _is_table(path: str) -> bool:
  return path.rsplit("/", 1)[-1] == "embedding"


def split_params(params) -> tuple[dict, dict]:
  """(tables, dense): the leaves whose last key is 'embedding', and all the others."""
  flat = flatten_dict(params, sep="/")
  return (_nest({p: x for p, x in flat.items() if _is_table(p)}),
          _nest({p: x for p, x in flat.items() if not _is_table(p)}))


def merge_params(tables: dict, dense: dict) -> dict:
  return _nest({**flatten_dict(dense, sep="/"), **flatten_dict(tables, sep="/")})


def _fields(fields: dict, what: str) -> dict:
  if set(fields) & CORE:
    raise SnapshotError(f"{what}: {sorted(set(fields) & CORE)} are set by publish; rename them")
  return json.loads(json.dumps(fields))


def _changed_rows(tables: dict, prev: dict) -> dict[str, np.ndarray]:
  """{"<table>/index": rows, "<table>/values": their values} of the rows that differ from `prev`."""
  rows = {}
  for p, t in tables.items():
    index = np.flatnonzero((t != prev[p]).reshape(len(t), -1).any(axis=1)).astype(np.int32)
    rows.update({f"{p}/index": index, f"{p}/values": t[index]} if len(index) else {})
  return rows


class Snapshots:
  """The snapshot directory `root` (see the module docstring). `publish`, `update` and `collect`
  hold `root/.publisher.lock` (`LockedError` if another publisher has it); `read_only` opens it
  for reading and pinning only. Arrays are returned as numpy arrays."""

  def __init__(self, root: str, read_only: bool = False):
    self.root, self.read_only = os.path.abspath(root), read_only
    self._orbax, self._pins = os.path.join(self.root, "orbax"), os.path.join(self.root, "pins")
    self._last = None  # (version, flat tables) of the last publish: the next delta's reference
    if not read_only:
      os.makedirs(self.root, exist_ok=True)

  def _err(self, version, why: str, todo: str) -> SnapshotError:
    return SnapshotError(f"snapshot v{version} in {self.root} {why}; {todo}")

  def versions(self) -> list[dict]:
    path = os.path.join(self.root, "manifest.json")
    try:
      with open(path) as f:
        return json.load(f)["versions"]
    except FileNotFoundError:
      return []
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise SnapshotError(f"{path}: unreadable ({e}); restore it, or move {self.root} away and "
                          "publish a full version") from None

  def entry(self, version: int) -> dict:
    entries = self.versions()
    for e in entries:
      if e["version"] == version:
        return e
    raise self._err(version, "is not in the manifest", "it was never published or was collected "
                    f"(versions present: {[e['version'] for e in entries]})")

  def latest(self) -> dict | None:
    return (self.versions() or [None])[-1]

  def wait(self, version: int, poll: float, timeout: float | None = None) -> None:
    """Returns once `version` (or a later one) is published; `timeout` None waits for ever."""
    waited = 0.0
    while not self.latest() or self.latest()["version"] < version:
      if timeout is not None and waited >= timeout:
        raise SnapshotError(f"{self.root}: FM version {version} did not appear within "
                            f"{timeout:.0f}s; is the FM trainer running?")
      time.sleep(poll)
      waited += poll

  def _write(self, entries: list[dict]) -> None:
    atomic_write(os.path.join(self.root, "manifest.json"),
                 json.dumps({"format": 1, "versions": entries}, indent=1))

  def _publisher(self):
    if self.read_only:
      raise SnapshotError(f"{self.root} is open read_only; open it with read_only=False to publish")
    return exclusive(os.path.join(self.root, ".publisher.lock"), f"the publisher of {self.root}")

  def _reader(self, attempts: int = 10) -> Checkpointer:
    for attempt in range(attempts):
      try:
        return Checkpointer(self._orbax, max_to_keep=None, read_only=True)
      except FileNotFoundError as e:  # a version collected while Orbax listed the directory
        if attempt + 1 < attempts and os.path.isdir(self._orbax):
          time.sleep(0.1 * (attempt + 1))
          continue
        error = e
      except Exception as e:  # pylint: disable=broad-except
        error = e
      raise SnapshotError(f"{self._orbax}: unreadable ({type(error).__name__}); the snapshot data "
                          "is gone: move the directory away and publish a full version") from None

  def _read(self, ckpt: Checkpointer, entry: dict, item: str) -> dict[str, np.ndarray]:
    """The verified leaves of `item` of version `entry` ({} if it has no such item)."""
    v, dev = entry["version"], jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    if item not in checksums(entry):  # `sha256` in entries published before checksums
      return {}
    try:
      meta = ckpt.read_meta(v)
      if checksums(meta) != checksums(entry):
        raise Damaged("its checkpoint does not match its manifest entry")
      abstract = _nest({p: jax.ShapeDtypeStruct(s, jnp.dtype(d), sharding=dev)
                        for p, (s, d) in meta["leaves"][item].items()})
      tree = ckpt.read(v, {item: abstract}, meta)[item]
    except (Damaged, KeyError, TypeError, ValueError) as e:
      if all(x["version"] != v for x in self.versions()):
        raise self._err(v, "was collected while being read", "pin it before reading") from None
      raise self._err(v, f"is damaged ({e})", "read another version, or publish a new full "
                      "version from the trainer") from None
    return {p: np.array(x) for p, x in _flat(tree).items()}

  def _tables(self, ckpt: Checkpointer, version: int) -> dict[str, np.ndarray]:
    e = self.entry(version)
    chain = [x for x in self.versions() if e["base"] <= x["version"] <= version]
    if chain[0]["version"] != e["base"] or chain[0]["kind"] != "full":
      raise self._err(version, f"lacks its full base v{e['base']}", "read another version")
    tables = self._read(ckpt, chain[0], "tables")
    for x in chain[1:]:
      rows = self._read(ckpt, x, "rows")
      for p in {p.rsplit("/", 1)[0] for p in rows}:
        tables[p][rows[f"{p}/index"]] = rows[f"{p}/values"]
    if digest(_nest(tables)) != e["tables_sha256"]:
      raise self._err(version, f"does not assemble from v{[x['version'] for x in chain]}",
                      "read another version, or publish a new full version from the trainer")
    return tables

  def tables(self, version: int) -> dict:
    """Only the tables of `version`, assembled and verified; no dense array is read."""
    with contextlib.closing(self._reader()) as ckpt:
      return _nest(self._tables(ckpt, version))

  def params(self, version: int) -> dict:
    """The whole FM params of `version`, assembled and verified."""
    with contextlib.closing(self._reader()) as ckpt:
      dense = self._read(ckpt, self.entry(version), "dense")
      return _nest({**dense, **self._tables(ckpt, version)})

  def publish(self, version: int, params, info: dict, full: bool) -> dict:
    """Publishes `params` as `version` and returns its manifest entry: a delta unless `full`,
    there is no previous version or the table shapes changed. An existing version is left as it
    is (a no-op); a version below the latest is refused."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
      raise SnapshotError(f"snapshot version {version!r} in {self.root}: use a positive int")
    info = _fields(info, f"snapshot v{version} info")
    with self._publisher():
      entries = self.versions()
      for e in entries:
        if e["version"] == version:
          return e
      if entries and version < entries[-1]["version"]:
        raise self._err(version, f"is older than the latest v{entries[-1]['version']}",
                        "publish versions in increasing order")
      flat = {p: np.array(x) for p, x in _flat(params).items()}
      tables = {p: x for p, x in flat.items() if _is_table(p)}
      prev = self._previous(entries[-1]) if entries and not full else None
      delta = prev is not None and ({p: (x.shape, x.dtype) for p, x in prev.items()}
                                    == {p: (x.shape, x.dtype) for p, x in tables.items()})
      rows = _changed_rows(tables, prev) if delta else {}
      items = {"rows" if delta else "tables": rows if delta else tables,
               "dense": {p: x for p, x in flat.items() if not _is_table(p)}}
      items = {k: v for k, v in items.items() if v}  # Orbax saves no empty arrays or trees
      leaves = {k: {p: [list(x.shape), x.dtype.name] for p, x in v.items()}
                for k, v in items.items()}
      with contextlib.closing(Checkpointer(self._orbax, max_to_keep=None)) as ckpt:
        ckpt.save(version, {k: _nest(v) for k, v in items.items()},
                  {"version": version, "leaves": leaves})
        ckpt.manager.wait_until_finished()
        sums = checksums(ckpt.read_meta(version))
      shape = flat["item/embedding"].shape if "item/embedding" in flat else (None, None)
      entry = {**info, "version": version, "kind": "delta" if delta else "full",
               "base": entries[-1]["base"] if delta else version,
               "parent": entries[-1]["version"] if delta else None,
               "bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs
                            in os.walk(os.path.join(self._orbax, str(version))) for f in fs),
               "full_bytes": int(sum(x.nbytes for x in flat.values())),
               "table_rows": {p: len(rows.get(f"{p}/index", ())) if delta else len(t)
                              for p, t in tables.items()},
               "dim": shape[-1], "vocab": shape[0], "published_at": time.time(),
               "checksums": sums, "tables_sha256": digest(_nest(tables))}
      self._write(entries + [entry])
      self._last = (version, tables)
      return entry

  def _previous(self, entry: dict) -> dict[str, np.ndarray] | None:
    """The assembled tables of `entry`, the reference of a delta; None (publish full) if damaged."""
    if self._last and self._last[0] == entry["version"]:
      return self._last[1]
    try:
      with contextlib.closing(self._reader()) as ckpt:
        return self._tables(ckpt, entry["version"])
    except SnapshotError as e:
      warn(f"{e}; publishing a full version instead of a delta")
      return None

  def update(self, version: int, **fields) -> None:
    """Adds the (JSON-able) `fields` to the manifest entry of `version`."""
    fields = _fields(fields, f"snapshot v{version} update")
    with self._publisher():
      self.entry(version)
      self._write([{**e, **fields} if e["version"] == version else e for e in self.versions()])

  def _pins_lock(self, seconds: float = 30.0) -> contextlib.ExitStack:
    """The lock of the pins, waiting up to `seconds` for another process to let it go."""
    deadline, stack = time.monotonic() + seconds, contextlib.ExitStack()
    path = os.path.join(self._pins, ".lock")
    while True:
      try:
        stack.enter_context(exclusive(path, f"the pins of {self.root}"))
        return stack
      except LockedError:
        if time.monotonic() > deadline:
          raise
        time.sleep(0.01)

  def pin(self, consumer: str, version: int | None, and_newer: bool = False) -> None:
    """Pins `version` (and every later one if `and_newer`) for `consumer`; None unpins. A version
    newer than the latest may be pinned ahead; an older one must still be in the manifest."""
    if not isinstance(consumer, str) or not _CONSUMER.fullmatch(consumer):
      raise SnapshotError(f"consumer name {consumer!r}: use letters, digits, '_', '.' or '-'")
    path = os.path.join(self._pins, f"{consumer}.json")
    with self._pins_lock():
      if version is None:
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        return
      latest = self.latest()
      if latest and version <= latest["version"]:
        self.entry(version)  # raises if it was collected
      atomic_write(path, json.dumps({"consumer": consumer, "version": int(version),
                                     "and_newer": bool(and_newer)}))

  def _pinned(self) -> dict[str, tuple[int, bool]]:
    """{consumer: (version, and_newer)}."""
    names = sorted(os.listdir(self._pins)) if os.path.isdir(self._pins) else []
    out = {}
    for name in (n for n in names if n.endswith(".json")):
      try:
        with open(os.path.join(self._pins, name)) as f:
          pin = json.load(f)
        out[name[:-5]] = (int(pin["version"]), bool(pin.get("and_newer")))
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{self._pins}/{name}: unreadable pin ({e}); delete it and pin "
                            "again") from None
    return out

  def prune_pins(self, prefix: str, keep) -> None:
    """Unpins every consumer named `prefix...` but those in `keep` (a stage whose followed
    versions changed drops the pins of the ones it no longer reads)."""
    for consumer in self.pins():
      if consumer.startswith(prefix) and consumer not in keep:
        self.pin(consumer, None)

  def pins(self) -> dict[str, int]:
    """{consumer: pinned version} (see `pin` for `and_newer`)."""
    return {c: v for c, (v, _) in self._pinned().items()}

  def collect(self, keep: int) -> list[int]:
    """Deletes every version but the newest `keep`, the pinned ones (and those after an
    `and_newer` pin) and those their chains need (from the manifest first, then their data);
    returns the deleted versions."""
    if not isinstance(keep, int) or keep < 1:
      raise SnapshotError(f"collect(keep={keep!r}) in {self.root}: keep at least 1 version")
    with self._publisher():
      with self._pins_lock():
        entries = self.versions()
        by = {e["version"]: e for e in entries}
        pins = self._pinned().values()
        wanted = set(list(by)[-keep:]) | {v for v in by for p, newer in pins
                                          if v == p or (newer and v > p)}
        needed = {v for w in wanted for v in by if by[w]["base"] <= v <= w}
        if len(needed) < len(by):
          self._write([e for e in entries if e["version"] in needed])
      with contextlib.closing(Checkpointer(self._orbax, max_to_keep=None)) as ckpt:
        for step in ckpt.steps():
          if step not in needed:  # also a step a killed publisher left out of the manifest
            ckpt.delete(step)
    return sorted(set(by) - needed)
