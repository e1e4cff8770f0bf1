"""The materialised-TAE store: atomic shards tagged with their FM version, verified on read."""

import numpy as np
import pytest

from fmx.data import tae_store


def _shard(rows, seed):
  rng = np.random.default_rng(seed)
  return {"tae": rng.normal(size=(rows, 4)).astype(np.float32), "user": np.arange(rows)}


def test_round_trip_versions_and_resume(tmp_path):
  a0, a1, b0 = _shard(3, 0), _shard(2, 1), _shard(4, 2)
  tae_store.write_shard(tmp_path, "v1", a0)
  tae_store.write_shard(tmp_path, "v2", b0)
  tae_store.write_shard(tmp_path, "v1", a1)
  assert tae_store.versions(tmp_path) == ["v1", "v2"]
  got = list(tae_store.read(tmp_path, "v1"))
  assert [i for i, _ in got] == [0, 1]
  np.testing.assert_array_equal(got[1][1]["tae"], a1["tae"])
  assert [i for i, _ in tae_store.read(tmp_path, "v1", start_shard=1)] == [1]  # resume position
  assert not list((tmp_path).glob("*.tmp"))


def test_corrupt_shard_is_named(tmp_path):
  name = tae_store.write_shard(tmp_path, "v1", _shard(3, 0))
  path = tmp_path / name
  data = bytearray(path.read_bytes())
  data[-10] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(tae_store.StoreError, match=f"{name}: checksum mismatch"):
    list(tae_store.read(tmp_path, "v1"))


def test_ragged_shard_is_rejected(tmp_path):
  with pytest.raises(tae_store.StoreError, match="differ in length"):
    tae_store.write_shard(tmp_path, "v1", {"a": np.zeros(2), "b": np.zeros(3)})
