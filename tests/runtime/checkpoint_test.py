"""Checkpoint checksums: what `fingerprint` tells apart, and steps written before it (a sha256
per item) still restore and are still checked. Its independence of the mesh is shown by the
reshard-on-restore tests (tests/train/mesh_equivalence_test.py, multiprocess_test.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmx.runtime import checkpoint


def tree():
  rng = np.random.default_rng(0)
  return {"table": rng.normal(size=(64, 8)).astype(np.float32),
          "bias": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16),
          "step": jnp.int32(7), "mask": np.array([True, False, True])}


def test_fingerprint_sees_every_bit_and_position():
  base = tree()
  want = checkpoint.fingerprint(base)
  assert want.startswith("fp64:") and checkpoint.fingerprint(jax.device_put(base)) == want
  rng = np.random.default_rng(1)
  for _ in range(32):  # one flipped bit anywhere in the table
    t = np.array(base["table"])
    t.view(np.uint32).flat[rng.integers(t.size)] ^= np.uint32(1 << int(rng.integers(32)))
    assert checkpoint.fingerprint({**base, "table": t}) != want
  swapped = np.array(base["table"])[[1, 0, *range(2, 64)]]
  changed = [{**base, "table": swapped},  # the same values at other positions
             {**base, "table": base["table"].reshape(8, 64)},  # another shape
             {**base, "table": base["table"].view(np.int32)},  # another dtype, the same bits
             {**base, "bias": base["bias"].at[3].set(0)},
             {**base, "step": jnp.int32(8)},
             {**base, "mask": ~base["mask"]}]
  assert len({want, *(checkpoint.fingerprint(c) for c in changed)}) == 1 + len(changed)


def test_fingerprint_sees_the_high_words_of_64_bit_host_arrays():
  ids, scores = np.arange(10, dtype=np.int64), np.linspace(0, 1, 5)
  want = checkpoint.fingerprint({"ids": ids, "scores": scores})
  assert checkpoint.fingerprint({"ids": ids + (1 << 40), "scores": scores}) != want
  assert checkpoint.fingerprint({"ids": ids, "scores": scores + 1e-12}) != want


def write_legacy(directory, items, hashed):
  """A step as fmx wrote them before checksums: a sha256 of the gathered arrays per item (of
  `hashed`, which differs from `items` to make a step whose arrays no longer match)."""
  meta = {"sha256": {k: checkpoint.digest(v) for k, v in hashed.items()},
          "shapes": {k: checkpoint.shapes(v) for k, v in items.items()}}
  with ocp.CheckpointManager(directory) as m:
    m.save(1, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta),
                                      **{k: ocp.args.StandardSave(v) for k, v in items.items()}))
    m.wait_until_finished()


@pytest.mark.parametrize("damaged", [False, True])
def test_steps_written_with_sha256_restore_and_are_checked(tmp_path, damaged, capsys):
  items = {"params": {k: jnp.asarray(v) for k, v in tree().items()}}
  hashed = {"params": {**items["params"], "step": jnp.int32(8)}} if damaged else items
  write_legacy(str(tmp_path), items, hashed)
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  abstract = {"params": checkpoint.on_one_device(jax.eval_shape(lambda: items["params"]))}
  if damaged:
    with pytest.raises(checkpoint.CheckpointError, match="damaged steps: \\[1\\]"):
      ckpt.restore(abstract)
    assert "checksum mismatch in 'params'" in capsys.readouterr().err
  else:
    step, got, meta = ckpt.restore(abstract)
    assert step == 1 and "checksums" not in meta
    jax.tree.map(np.testing.assert_array_equal, got["params"], items["params"])
  ckpt.close()
