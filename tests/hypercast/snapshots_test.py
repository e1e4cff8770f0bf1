"""FM snapshots: full and delta versions assemble exactly, readers see only committed and intact
versions, tables are read without dense tensors, and retention keeps pins and chain bases."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fmx import files
from fmx.hypercast import snapshots
from fmx.hypercast.snapshots import SnapshotError, Snapshots
from fmx.runtime.checkpoint import digest


def _params(seed, vocab=500, dim=16):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {"item": {"embedding": f32(vocab, dim)}, "action": {"embedding": f32(4, dim)},
          "encoder": {"layers_0": {"uvqk": {"kernel": f32(dim, 4 * dim)}}},
          "head_out": {"bias": f32(4)}}


def _step(params, seed, rows=(3, 7)):
  """`params` with `rows` of the item table and every dense tensor changed."""
  out = jax.tree.map(np.copy, params)
  rng = np.random.default_rng(seed)
  out["item"]["embedding"][list(rows)] += 1.0
  out["encoder"]["layers_0"]["uvqk"]["kernel"] += rng.normal(size=(1,)).astype(np.float32)
  out["head_out"]["bias"] = out["head_out"]["bias"] * 2
  return out


def _assert_same(got, want):
  got, want = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (got, want))
  assert [p for p, _ in got] == [p for p, _ in want]
  for (p, a), (_, b) in zip(got, want):
    assert a.dtype == b.dtype and np.array_equal(a, b), p


def _files(root, version, item):
  top = os.path.join(root, "orbax", str(version), item)
  return [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]


def test_split_and_merge_params(tmp_path):
  p = _params(0)
  tables, dense = snapshots.split_params(p)
  _assert_same(tables, {"item": p["item"], "action": p["action"]})
  _assert_same(dense, {"encoder": p["encoder"], "head_out": p["head_out"]})
  _assert_same(snapshots.merge_params(tables, dense), p)
  with pytest.raises(SnapshotError, match="use string keys without '/'"):
    Snapshots(tmp_path).publish(1, {"a/b": p["head_out"]}, {}, full=True)


def test_full_and_delta_chains_assemble_every_version(tmp_path):
  snaps, published = Snapshots(tmp_path), {}
  p = _params(0)
  for v, full in [(1, True), (2, False), (3, False), (4, True), (5, False)]:
    p = _step(p, v, rows=(v, 2 * v)) if v > 1 else p
    if v == 3:
      p["action"]["embedding"][1] -= 1.0
    published[v] = p
    e = snaps.publish(v, p, {"position": v * 10}, full=full)
    assert (e["kind"], e["base"], e["position"]) == (("full", v, 10 * v) if full
                                                    else ("delta", 1 if v < 4 else 4, 10 * v))
  reader = Snapshots(tmp_path, read_only=True)
  assert [e["version"] for e in reader.versions()] == [1, 2, 3, 4, 5]
  assert reader.latest()["version"] == 5
  assert reader.entry(3)["table_rows"] == {"item/embedding": 2, "action/embedding": 1}
  assert reader.entry(1)["table_rows"] == {"item/embedding": 500, "action/embedding": 4}
  assert (reader.entry(2)["dim"], reader.entry(2)["vocab"]) == (16, 500)
  for v, want in published.items():
    _assert_same(reader.params(v), want)
    _assert_same(reader.tables(v), snapshots.split_params(want)[0])
  snaps.update(2, eval={"window": 3, "ne": 0.9})
  assert reader.entry(2)["eval"] == {"window": 3, "ne": 0.9}
  with pytest.raises(SnapshotError, match="are set by publish"):
    snaps.update(2, kind="full")
  with pytest.raises(SnapshotError, match="open it with read_only=False"):
    reader.publish(6, p, {}, full=True)


def test_a_delta_stores_only_changed_rows(tmp_path):
  snaps, p = Snapshots(tmp_path), _params(0, vocab=2000, dim=32)
  full = snaps.publish(1, p, {}, full=True)
  delta = snaps.publish(2, _step(p, 1), {}, full=False)
  same = snaps.publish(3, _step(p, 1), {}, full=False)  # nothing changed
  assert delta["table_rows"] == {"item/embedding": 2, "action/embedding": 0}
  assert same["table_rows"] == {"item/embedding": 0, "action/embedding": 0}
  assert full["full_bytes"] == delta["full_bytes"] == sum(x.nbytes for x in jax.tree.leaves(p))
  assert full["bytes"] > 4 * delta["bytes"]
  assert delta["bytes"] > same["bytes"]
  _assert_same(snaps.params(3), _step(p, 1))
  # a fresh publisher (e.g. after a restart) computes the delta from the versions on disk
  e = Snapshots(tmp_path).publish(4, _step(p, 1, rows=(9,)), {}, full=False)
  assert e["kind"] == "delta" and e["table_rows"]["item/embedding"] == 3  # rows 3, 7 back; 9


def test_tables_never_read_dense(tmp_path):
  snaps, p = Snapshots(tmp_path), _params(0)
  snaps.publish(1, p, {}, full=True)
  snaps.publish(2, _step(p, 1), {}, full=False)
  for version in (1, 2):
    shutil.rmtree(os.path.join(tmp_path, "orbax", str(version), "dense"))
  reader = Snapshots(tmp_path, read_only=True)
  _assert_same(reader.tables(2), snapshots.split_params(_step(p, 1))[0])
  with pytest.raises(SnapshotError, match=re.escape(f"snapshot v2 in {tmp_path} is damaged")):
    reader.params(2)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_tables_raise_naming_the_version(tmp_path, damage):
  snaps, p = Snapshots(tmp_path), _params(0)
  snaps.publish(1, p, {}, full=True)
  snaps.publish(2, _step(p, 1), {}, full=False)
  arrays = [path for path in _files(tmp_path, 1, "tables") if os.path.getsize(path) > 10_000]
  assert arrays  # the file holding the item table (32 KB, compressed)
  for path in arrays:
    if damage == "delete":
      os.remove(path)
    else:
      data = bytearray(open(path, "rb").read())
      data = data[:len(data) // 2] if damage == "truncate" else data
      data[len(data) // 3] ^= 0xFF
      open(path, "wb").write(bytes(data))
  reader = Snapshots(tmp_path, read_only=True)
  for version in (1, 2):  # v2 is a delta on v1
    with pytest.raises(SnapshotError, match=re.escape(f"snapshot v1 in {tmp_path} is damaged")):
      reader.tables(version)
  # the publisher cannot build a delta on damaged tables, so it publishes a full version
  e = Snapshots(tmp_path).publish(3, _step(p, 2), {}, full=False)
  assert e["kind"] == "full"
  _assert_same(reader.params(3), _step(p, 2))


def test_collect_keeps_the_newest_the_pinned_and_their_chains(tmp_path):
  snaps, p = Snapshots(tmp_path), _params(0, vocab=20, dim=4)
  for v in range(1, 7):  # full 1, 4; deltas 2, 3 on 1 and 5, 6 on 4
    p = _step(p, v, rows=(v,))
    snaps.publish(v, p, {}, full=v in (1, 4))
  reader = Snapshots(tmp_path, read_only=True)
  reader.pin("logging-tier", 2)
  reader.pin("expert.feed_0", 6)
  assert reader.pins() == {"logging-tier": 2, "expert.feed_0": 6}
  assert snaps.collect(keep=1) == [3]  # 6 needs 4, 5; 2 needs 1
  assert [e["version"] for e in reader.versions()] == [1, 2, 4, 5, 6]
  assert sorted(os.listdir(tmp_path / "orbax")) == ["1", "2", "4", "5", "6"]
  reader.tables(2)
  reader.pin("logging-tier", None)
  assert snaps.collect(keep=1) == [1, 2]
  assert reader.pins() == {"expert.feed_0": 6}
  with pytest.raises(SnapshotError, match=re.escape(f"snapshot v2 in {tmp_path} is not in the "
                                                    "manifest")):
    reader.pin("logging-tier", 2)  # collected: a reader pins only a version still present
  with pytest.raises(SnapshotError, match="consumer name"):
    reader.pin("../x", 6)
  reader.pin("expert.feed_0", None)
  assert snaps.collect(keep=2) == []  # 5 and 6 still need their base 4
  snaps.publish(7, p, {}, full=True)
  assert snaps.collect(keep=1) == [4, 5, 6]
  assert [e["version"] for e in reader.versions()] == [7]
  assert os.listdir(tmp_path / "orbax") == ["7"]
  reader.pin("logging", 8, and_newer=True)  # ahead of its publication: 8 and every later one
  assert reader.pins() == {"logging": 8}
  for v in (8, 9, 10):
    snaps.publish(v, _step(p, v, rows=(v,)), {}, full=v == 8)
  assert snaps.collect(keep=1) == [7] and snaps.collect(keep=1) == []
  reader.pin("logging", 10)
  assert snaps.collect(keep=1) == []  # 10 needs 8 and 9


def test_republish_is_a_no_op_and_versions_only_increase(tmp_path):
  snaps, p = Snapshots(tmp_path), _params(0)
  first = snaps.publish(2, p, {"position": 1}, full=True)
  assert snaps.publish(2, _params(1), {"position": 2}, full=True) == first
  _assert_same(snaps.params(2), p)
  with pytest.raises(SnapshotError, match=re.escape(f"snapshot v1 in {tmp_path} is older than "
                                                    "the latest v2")):
    snaps.publish(1, p, {}, full=True)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(SnapshotError, match="use a positive int"):
      snaps.publish(bad, p, {}, full=True)
  with pytest.raises(SnapshotError, match="not in the manifest"):
    snaps.params(3)
  with files.exclusive(tmp_path / ".publisher.lock", "test"):  # another live publisher
    with pytest.raises(files.LockedError):
      Snapshots(tmp_path).publish(3, p, {}, full=True)


def test_readers_see_a_version_only_once_it_is_in_the_manifest(tmp_path, monkeypatch):
  snaps, reader, p = Snapshots(tmp_path), Snapshots(tmp_path, read_only=True), _params(0)
  assert reader.versions() == [] and reader.latest() is None
  seen, real_write = [], snapshots.atomic_write

  def killed_before_the_manifest(path, data):
    seen.append(os.path.isdir(tmp_path / "orbax" / "1" / "tables"))  # the data is all there
    assert reader.versions() == []
    with pytest.raises(SnapshotError, match="not in the manifest"):
      reader.tables(1)
    raise KeyboardInterrupt
  monkeypatch.setattr(snapshots, "atomic_write", killed_before_the_manifest)
  with pytest.raises(KeyboardInterrupt):
    snaps.publish(1, _params(1), {}, full=True)
  assert seen == [True] and reader.versions() == []
  monkeypatch.setattr(snapshots, "atomic_write", real_write)
  Snapshots(tmp_path).publish(1, p, {}, full=True)  # the restarted publisher replaces the data
  assert [e["version"] for e in reader.versions()] == [1]
  _assert_same(reader.params(1), p)


def test_a_dimension_change_forces_a_full_version(tmp_path):
  snaps = Snapshots(tmp_path)
  snaps.publish(1, _params(0, dim=8), {}, full=True)
  e = snaps.publish(2, _params(0, dim=12), {}, full=False)
  assert (e["kind"], e["base"], e["dim"]) == ("full", 2, 12)
  e = snaps.publish(3, _params(1, vocab=600, dim=12), {}, full=False)
  assert (e["kind"], e["vocab"]) == ("full", 600)
  _assert_same(snaps.params(3), _params(1, vocab=600, dim=12))


def test_a_reader_process_reads_pinned_versions_while_the_publisher_collects(tmp_path):
  """Another process pins the latest version, reads its tables and unpins, again and again,
  while versions are published and all but the newest (and the pinned) are collected."""
  snaps, p, published = Snapshots(tmp_path), _params(0, vocab=50, dim=4), {}
  snaps.publish(1, p, {}, full=True)
  published[1] = digest(snapshots.split_params(p)[0])
  reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import os
      from fmx.hypercast.snapshots import Snapshots, SnapshotError
      from fmx.runtime.checkpoint import digest
      s, seen = Snapshots({str(tmp_path)!r}, read_only=True), set()
      print("ready", flush=True)
      while not os.path.exists({str(tmp_path / "done")!r}) or not seen:
        v = s.latest()["version"]
        try:
          s.pin("reader", v)
        except SnapshotError:  # collected since latest(): try the next one
          continue
        if v not in seen:
          print(v, digest(s.tables(v)), flush=True)
          seen.add(v)
        s.pin("reader", None)
      """)], stdout=subprocess.PIPE, text=True)
  assert reader.stdout.readline() == "ready\n"
  for v in range(2, 16):
    p = _step(p, v, rows=(v,))
    snaps.publish(v, p, {}, full=v % 4 == 0)
    published[v] = digest(snapshots.split_params(p)[0])
    snaps.collect(keep=1)
  (tmp_path / "done").touch()
  out, _ = reader.communicate(timeout=120)
  assert reader.returncode == 0
  read = dict(line.split() for line in out.splitlines())
  assert read and all(published[int(v)] == d for v, d in read.items())
