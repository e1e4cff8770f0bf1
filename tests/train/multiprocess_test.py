"""One run over two processes, and checkpoints that reshard on restore; the logging tier over
two processes.

`python -m fmx.main` started as two processes on localhost (JAX's distributed runtime, 4
simulated CPU devices each, a 4x2 mesh across both) trains like one process with 8 devices,
each process building only the rows of each batch (of each row group, cut to the group's
length bucket) that its devices hold; its checkpoint, written by both, resumes in one process
on a 2x4 mesh and ends where an uninterrupted one-process run ends. A tiny synthetic retrieval
run (4 steps per epoch).

The logging tier started as two processes writes the same rows as one process, each process its
own shards, and one commit; when the primary cannot open the version, both processes fail.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmx import files

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--config=fmx/configs/ml100k_hstu.py:runlocal", "--config.input.dataset=synthetic",
        "--config.input.max_len=20", "--config.evals.every_epochs=1", "--config.progress=False",
        "--config.input.row_groups=2", "--config.input.length_buckets=(8,12,16)",
        "--config.mesh.data=4", "--config.mesh.model=2"]
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@200", "mrr", "steps")


def start(workdir, *extra, devices, flags=TINY):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  env.pop("FMX_FAULT", None)
  return subprocess.Popen([sys.executable, "-m", "fmx.main", *flags, f"--workdir={workdir}", *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish_all(procs, status=0):
  """Each process's (stdout, stderr), once all exited with `status`; none is left running."""
  try:
    done = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, done):
      assert p.returncode == status, err[-4000:]
    return done
  finally:
    for p in procs:
      p.kill()


def results(workdir):
  r = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  return {k: r[k] for k in METRICS}


def params(workdir, step):
  """The parameters of a checkpoint step, restored onto this process's first device."""
  path = str(pathlib.Path(workdir, "checkpoints", str(step), "params").resolve())
  meta = ocp.StandardCheckpointer().metadata(path)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                          getattr(meta, "item_metadata", meta))
  return jax.device_get(ocp.StandardCheckpointer().restore(path, abstract))


def assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def two_processes(port):
  return [[f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
          for i in (0, 1)]


def test_two_processes_train_as_one_and_their_checkpoint_resumes_on_another_mesh(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  procs = [start(two, "--config.num_epochs=1", *who, devices=4) for who in two_processes(free_port())]
  outs = finish_all(procs)
  # the primary alone reports; both processes computed the same evaluation
  assert sorted(p.name for p in two.iterdir()) == [
      ".lock", ".loop.lock", "checkpoints", "metrics.jsonl", "results.json", "tensorboard"]
  assert [o.splitlines()[-2] for o, _ in outs][0] == [o.splitlines()[-2] for o, _ in outs][1]
  for i, (_, err) in enumerate(outs):  # 64 rows in 2 groups; 8 per data shard, 2 shards each
    assert f"fmx: process {i} of 2 builds rows {16 * i}:{16 * i + 16} of each batch" in err
  after_one_epoch = results(two)

  finish_all([start(one, "--config.num_epochs=2", devices=8)])  # one process, 8 devices, 4x2
  assert_close(params(two, 4), params(one, 4))

  # the 2-process, 4x2 checkpoint resumes in one process on a 2x4 mesh (item table by rows
  # over 4 devices) and ends where the uninterrupted run ends
  [(_, err)] = finish_all([start(two, "--config.num_epochs=2", "--config.mesh.data=2",
                                "--config.mesh.model=4", devices=8)])
  assert "fmx: resumed from step 4" in err
  assert_close(params(two, 8), params(one, 8))
  assert after_one_epoch["steps"] == 4
  got, want = results(two), results(one)
  assert got["steps"] == want["steps"] == 8
  for k in METRICS:
    assert abs(got[k] - want[k]) < 1e-6, (k, got, want)


def test_two_processes_log_their_own_shards_and_one_commits(tmp_path):
  from fmx.configs import synthetic_fm
  from fmx.data import load as data_load, tae_store
  from fmx.train import fm as fm_train
  c = synthetic_fm.get_config("runlocal")
  c.num_epochs, c.progress, c.input.synthetic.num_users = 1, False, 60
  c.input.max_history, c.input.num_candidates, c.model.max_len = 20, 4, 24
  data = data_load.load(c.input, "surfaces")
  fm_train.train_one(c, str(tmp_path / "fm"), data, data.spec.fm_tasks.astype(np.float32))
  flags = ["--config=fmx/configs/logging_tier.py:synthetic", f"--config.fm_workdir={tmp_path / 'fm'}",
           "--config.batch_size=16", "--config.mesh.data=4", "--config.mesh.model=2"]
  stores = {n: tmp_path / f"store{n}" for n in (1, 2)}
  log2 = lambda: [start(tmp_path / "log2", f"--config.store={stores[2]}", *who, devices=4,
                       flags=flags) for who in two_processes(free_port())]
  with files.exclusive(stores[2] / ".lock-v1", "another writer"):  # the primary cannot open v1
    (_, err0), (_, err1) = finish_all(log2(), status=2)  # both fail; neither waits forever
  assert f"in use by process {os.getpid()}" in err0 and "process(es) [0] failed" in err1
  assert tae_store.versions(stores[2]) == []
  finish_all(log2())
  finish_all([start(tmp_path / "log1", f"--config.store={stores[1]}", devices=8, flags=flags)])
  assert sorted(p.name for p in stores[2].iterdir()) == [".lock-v1", "v1"]  # committed once
  assert json.loads((tmp_path / "log2" / "results.json").read_text())["rows"] == sum(
      t["rows"] for t in tae_store.manifest(stores[2], "v1")["shards"])
  shards = {n: [t["rows"] for t in tae_store.manifest(stores[n], "v1")["shards"]] for n in stores}
  assert len(shards[2]) == 4 and len(shards[1]) == 2  # (valid, test) x processes
  assert [shards[2][0] + shards[2][1], shards[2][2] + shards[2][3]] == shards[1]
  assert all(rows > 0 for rows in shards[2])  # each process wrote its part of each split
  rows = {n: {k: np.concatenate([a[k] for _, a in tae_store.read(stores[n], "v1")])
              for k in ("user", "cand", "tae", "fm_probs")} for n in stores}
  for k in rows[1]:
    np.testing.assert_allclose(rows[2][k], rows[1][k], rtol=1e-5, atol=1e-6)
