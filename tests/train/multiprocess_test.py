"""One run over two processes, and checkpoints that reshard on restore.

`python -m fmx.main` started as two processes on localhost (JAX's distributed runtime, 4
simulated CPU devices each, an 8x1 mesh across both) trains like one process with 8 devices;
its checkpoint, written by both, resumes in one process on a 2x4 mesh and ends where an
uninterrupted one-process run ends. A tiny synthetic retrieval run (4 steps per epoch).
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

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--config=fmx/configs/ml100k_hstu.py:runlocal", "--config.input.dataset=synthetic",
        "--config.input.max_len=20", "--config.evals.every_epochs=1", "--config.progress=False"]
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@200", "mrr", "steps")


def start(workdir, *extra, devices):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  env.pop("FMX_FAULT", None)
  return subprocess.Popen([sys.executable, "-m", "fmx.main", *TINY, f"--workdir={workdir}", *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(p):
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-4000:]
  return out, err


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


def test_two_processes_train_as_one_and_their_checkpoint_resumes_on_another_mesh(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  two, one = tmp_path / "two", tmp_path / "one"
  procs = [start(two, "--config.num_epochs=1", f"--coordinator_address=localhost:{port}",
                 "--num_processes=2", f"--process_id={i}", devices=4) for i in (0, 1)]
  outs = [finish(p) for p in procs]
  # the primary alone reports; both processes computed the same evaluation
  assert sorted(p.name for p in two.iterdir()) == [
      ".lock", ".loop.lock", "checkpoints", "metrics.jsonl", "results.json", "tensorboard"]
  assert [o.splitlines()[-2] for o, _ in outs][0] == [o.splitlines()[-2] for o, _ in outs][1]
  after_one_epoch = results(two)

  finish(start(one, "--config.num_epochs=2", devices=8))  # one process, 8 devices, 8x1
  assert_close(params(two, 4), params(one, 4))

  # the 2-process, 8x1 checkpoint resumes in one process on a 2x4 mesh (item table by rows
  # over 4 devices) and ends where the uninterrupted run ends
  _, err = finish(start(two, "--config.num_epochs=2", "--config.mesh.data=2",
                        "--config.mesh.model=4", devices=8))
  assert "fmx: resumed from step 4" in err
  assert_close(params(two, 8), params(one, 8))
  assert after_one_epoch["steps"] == 4
  got, want = results(two), results(one)
  assert got["steps"] == want["steps"] == 8
  for k in METRICS:
    assert abs(got[k] - want[k]) < 1e-6, (k, got, want)
