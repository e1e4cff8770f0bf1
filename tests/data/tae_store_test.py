"""The materialised-TAE store: versions appear complete or not at all, are written by one process
at a time, never change once committed, and every shard verifies on read."""

import json
import pickle
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fmx.data import tae_store


def _shard(rows, seed):
  rng = np.random.default_rng(seed)
  return {"tae": rng.normal(size=(rows, 4)).astype(np.float32), "user": np.arange(rows) + seed}


def _write(root, version, shards, meta=None):
  with tae_store.write_version(root, version, meta) as w:
    assert [w.write_shard(s) for s in shards] == list(range(len(shards)))


def _assert_reads(root, version, shards, start_shard=0):
  got = list(tae_store.read(root, version, start_shard))
  assert [i for i, _ in got] == list(range(start_shard, len(shards)))
  for (_, arrays), want in zip(got, shards[start_shard:]):
    assert arrays.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(arrays[k], want[k])


def _run(root, body):
  """Starts a Python process that runs `body` with `tae_store`, `np`, `root` and `shard` bound."""
  code = textwrap.dedent(f"""
      import os, signal, sys
      import numpy as np
      from fmx.data import tae_store
      root, shard = {str(root)!r}, {{"tae": np.ones((2, 4), np.float32), "user": np.arange(2)}}
      """) + textwrap.dedent(body)
  return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)


def _meta(root, version):
  """`version_meta` less the shard checksums, which must list one per shard."""
  meta = tae_store.version_meta(root, version)
  assert len(meta.pop("sha256")) == meta["shards"]
  return meta


def test_round_trip_versions_and_resume(tmp_path):
  v1, v2 = [_shard(3, 0), _shard(2, 1), _shard(5, 2)], [_shard(4, 3)]
  assert tae_store.versions(tmp_path / "absent") == []
  _write(tmp_path, "v1", v1, {"fm_step": 7, "dataset": "synthetic"})
  _write(tmp_path, "v2", v2)
  assert tae_store.versions(tmp_path) == ["v1", "v2"]
  _assert_reads(tmp_path, "v1", v1)
  _assert_reads(tmp_path, "v2", v2)
  _assert_reads(tmp_path, "v1", v1, start_shard=1)  # resume positions
  _assert_reads(tmp_path, "v1", v1, start_shard=3)
  assert _meta(tmp_path, "v1") == {"fm_step": 7, "dataset": "synthetic",
                                                    "rows": 10, "shards": 3}
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock-v1", ".lock-v2", "v1", "v2"]
  assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == [
      "manifest.json", "meta.json"] + [f"shard-0000{i}.{ext}" for i in range(3)
                                      for ext in ("array_record", "json")]
  with pytest.raises(tae_store.StoreError,
                     match=re.escape("no FM version 'v3' (versions present: ['v1', 'v2'])")):
    tae_store.read(tmp_path, "v3")


def test_only_committed_versions_are_visible(tmp_path):
  with tae_store.write_version(tmp_path, "v1") as w:
    w.write_shard(_shard(3, 0))
    assert tae_store.versions(tmp_path) == []
    with pytest.raises(tae_store.StoreError, match="no FM version 'v1'"):
      tae_store.read(tmp_path, "v1")
  assert tae_store.versions(tmp_path) == ["v1"]


def test_exception_in_block_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with tae_store.write_version(tmp_path, "v1") as w:
      w.write_shard(_shard(3, 0))
      raise RuntimeError("boom")
  assert tae_store.versions(tmp_path) == []
  assert [p.name for p in tmp_path.iterdir()] == [".lock-v1"]
  _write(tmp_path, "v1", [_shard(2, 1)])
  _assert_reads(tmp_path, "v1", [_shard(2, 1)])


def test_killed_writer_leaves_nothing_visible(tmp_path):
  proc = _run(tmp_path, """
      with tae_store.write_version(root, "v1") as w:
        w.write_shard(shard)
        os.kill(os.getpid(), signal.SIGKILL)
        w.write_shard(shard)
      """)
  assert proc.wait(timeout=30) == -signal.SIGKILL
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock-v1", ".staging-v1"]
  assert tae_store.versions(tmp_path) == []
  with pytest.raises(tae_store.StoreError, match="no FM version 'v1'"):
    tae_store.read(tmp_path, "v1")
  shards = [_shard(3, 0), _shard(4, 1)]
  _write(tmp_path, "v1", shards)  # the kernel released the dead writer's lock
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock-v1", "v1"]
  _assert_reads(tmp_path, "v1", shards)


def test_concurrent_writer_of_a_version_is_refused(tmp_path):
  proc = _run(tmp_path, """
      with tae_store.write_version(root, "v1") as w:
        w.write_shard(shard)
        print("writing", flush=True)
        sys.stdin.read()
      """)
  try:
    assert proc.stdout.readline() == "writing\n"
    with pytest.raises(tae_store.StoreError, match=f"in use by process {proc.pid} "):
      with tae_store.write_version(tmp_path, "v1"):
        pass
    _write(tmp_path, "v2", [_shard(2, 0)])  # other versions are not blocked
  finally:
    proc.communicate("", timeout=30)
  assert proc.returncode == 0
  assert tae_store.versions(tmp_path) == ["v1", "v2"]
  assert _meta(tmp_path, "v1") == {"rows": 2, "shards": 1}


def test_committed_version_is_immutable(tmp_path):
  _write(tmp_path, "v1", [_shard(3, 0)])
  with pytest.raises(tae_store.StoreError, match="version 'v1' is already committed"):
    with tae_store.write_version(tmp_path, "v1"):
      pass
  _assert_reads(tmp_path, "v1", [_shard(3, 0)])


@pytest.mark.parametrize("damage", ["delete", "garbage", "wrong types", "wrong rows"])
def test_lost_or_malformed_manifest_is_rebuilt(tmp_path, damage):
  shards = [_shard(3, 0), _shard(4, 1)]
  _write(tmp_path, "v1", shards, {"fm_step": 2})
  path = tmp_path / "v1" / tae_store.MANIFEST
  original = json.loads(path.read_text())
  if damage == "delete":
    path.unlink()
  elif damage == "garbage":
    path.write_bytes(b"\x00{not json")
  elif damage == "wrong types":
    path.write_text(json.dumps({**original, "shards": "shard-00000.array_record"}))
  else:
    path.write_text(json.dumps({**original, "rows": 8}))
  why = "missing" if damage == "delete" else "malformed"
  with pytest.warns(UserWarning, match=f"manifest.json: {why}.*rebuilt from 2 verified shards"):
    assert _meta(tmp_path, "v1") == {"fm_step": 2, "rows": 7, "shards": 2}
  assert json.loads(path.read_text()) == original
  _assert_reads(tmp_path, "v1", shards)


def test_corrupt_shard_is_named(tmp_path):
  shards = [_shard(3, 0), _shard(4, 1)]
  _write(tmp_path, "v1", shards)
  path = tmp_path / "v1" / "shard-00001.array_record"
  data = path.read_bytes()
  at = data.index(shards[1]["tae"][0].tobytes()) + 5
  path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
  error = (re.escape(f"{path}: corrupt shard (checksum mismatch)")
           + ".*re-run the logging tier for version 'v1'")
  got = tae_store.read(tmp_path, "v1")
  assert next(got)[0] == 0
  with pytest.raises(tae_store.StoreError, match=error):
    next(got)
  with pytest.raises(tae_store.StoreError, match=error):
    tae_store.RowSource(tmp_path, "v1")
  (tmp_path / "v1" / tae_store.MANIFEST).unlink()
  with pytest.raises(tae_store.StoreError, match=error):  # never rebuilt from a bad shard
    tae_store.read(tmp_path, "v1")
  assert not (tmp_path / "v1" / tae_store.MANIFEST).exists()


def test_truncated_shard_is_named(tmp_path):
  _write(tmp_path, "v1", [_shard(30, 0)])
  path = tmp_path / "v1" / "shard-00000.array_record"
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(tae_store.StoreError, match=re.escape(f"{path}: corrupt shard")):
    list(tae_store.read(tmp_path, "v1"))


def test_rows_are_random_access_for_grain(tmp_path):
  import grain
  shards = [_shard(3, 0), _shard(0, 9), _shard(5, 1), _shard(4, 2)]
  _write(tmp_path, "v1", shards)
  want = {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}
  source = tae_store.RowSource(tmp_path, "v1")
  assert len(source) == 12
  order = [11, 0, 3, 7, 2, 2]
  got = source.rows(order)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k][order])
  ds = grain.MapDataset.source(source).shuffle(seed=3).batch(4)
  seen = np.concatenate([b["user"] for b in ds])
  np.testing.assert_array_equal(np.sort(seen), np.sort(want["user"]))
  np.testing.assert_array_equal(source[5]["tae"], want["tae"][5])
  with pytest.raises(IndexError):
    source.rows([12])
  copy = pickle.loads(pickle.dumps(source))  # as grain sends it to worker processes
  np.testing.assert_array_equal(copy.rows(order)["user"], want["user"][order])
  source.close()
  copy.close()


def test_shards_written_by_other_processes_commit_together(tmp_path):
  with tae_store.write_version(tmp_path, "v1", {"a": 1}) as w:
    procs = [_run(tmp_path, f"""
        shard = {{"tae": np.full((2, 4), {i}, np.float32), "user": np.arange(2) + {i}}}
        tae_store.write_shard({str(w.staging)!r}, "v1", {i}, shard, {{"part": {i}}})
        """) for i in (3, 1, 0, 2)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    w.meta["b"] = 2
  got = dict(tae_store.read(tmp_path, "v1"))
  assert [int(got[i]["user"][0]) for i in range(4)] == [0, 1, 2, 3]
  assert [s["info"] for s in tae_store.manifest(tmp_path, "v1")["shards"]] == [
      {"part": i} for i in range(4)]
  assert _meta(tmp_path, "v1") == {"a": 1, "b": 2, "rows": 8, "shards": 4}


def test_a_gap_in_the_staged_shards_is_not_committed(tmp_path):
  with pytest.raises(tae_store.StoreError, match="not the tag of shard 1"):
    with tae_store.write_version(tmp_path, "v1") as w:
      tae_store.write_shard(w.staging, "v1", 0, _shard(2, 0))
      tae_store.write_shard(w.staging, "v1", 2, _shard(2, 0))
  assert tae_store.versions(tmp_path) == []


def test_version_without_manifest_or_shards_is_an_error(tmp_path):
  (tmp_path / "v1").mkdir()
  with pytest.raises(tae_store.StoreError, match=re.escape(f"{tmp_path / 'v1'}: no manifest and "
                                                           "no shards; delete it")):
    tae_store.version_meta(tmp_path, "v1")


@pytest.mark.parametrize("version", ["../x", "", "a/b", ".hidden", "v1\n", None])
def test_unsafe_version_names_are_refused(tmp_path, version):
  error = re.escape(f"unsafe FM version name {version!r}")
  with pytest.raises(tae_store.StoreError, match=error):
    with tae_store.write_version(tmp_path, version):
      pass
  with pytest.raises(tae_store.StoreError, match=error):
    tae_store.read(tmp_path, version)
  with pytest.raises(tae_store.StoreError, match=error):
    tae_store.version_meta(tmp_path, version)
  assert list(tmp_path.iterdir()) == []


def test_negative_start_shard_is_refused(tmp_path):
  _write(tmp_path, "v1", [_shard(3, 0)])
  with pytest.raises(tae_store.StoreError, match="start_shard must be a non-negative int, got -1"):
    tae_store.read(tmp_path, "v1", start_shard=-1)


def test_ragged_shard_is_refused_and_nothing_is_committed(tmp_path):
  with pytest.raises(tae_store.StoreError, match="version 'v1': shard arrays differ in length"):
    with tae_store.write_version(tmp_path, "v1") as w:
      w.write_shard({"a": np.zeros(2), "b": np.zeros(3)})
  assert tae_store.versions(tmp_path) == []


def test_empty_version_is_not_committed(tmp_path):
  with pytest.raises(tae_store.StoreError, match="version 'v1': no shard was written"):
    with tae_store.write_version(tmp_path, "v1"):
      pass
  assert [p.name for p in tmp_path.iterdir()] == [".lock-v1"]
