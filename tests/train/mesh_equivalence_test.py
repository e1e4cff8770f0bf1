"""The same training on 8 simulated devices as on one: for the retrieval, FM and expert jobs,
meshes 8x1, 4x2 and 2x4 give the 1-device run's losses and parameters after a few steps, the
item table's shards sit where the rules say, and the logging tier's TAEs (the FM forward on
the mesh) and the full-ranking ranks (a reduction over the sharded item table) are the same.

The jobs' own pieces run: `sharding.compile_train` (what the loop jits), each job's init and
train step, `sharding.Layout.jit_eval` (what evaluation and the logging tier jit) and the real
batch pipelines, on small synthetic data. The devices are simulated in a subprocess, since XLA
fixes the device count at start-up.
"""

import os
import subprocess
import sys
import time
T0 = time.time()

MESHES = ((8, 1), (4, 2), (2, 4))
STEPS = 3


def test_jobs_on_8_simulated_devices_match_one_device():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  procs = {part: subprocess.Popen([sys.executable, __file__, part], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
           for part in ("retrieval", "fm")}  # side by side: compiling uses one core
  for part, p in procs.items():
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, out[-2000:] + err[-4000:]
    for job in {"retrieval": ("retrieval",), "fm": ("fm", "logging", "expert")}[part]:
      for data, model in MESHES:
        assert f"{job} {data}x{model} ok" in out, out


# ---------------------------------------------------------------------------- the subprocess


def _run(part):
  import jax
  import numpy as np

  from fmx.configs import expert as expert_configs, foundation, retrieval as retrieval_configs
  from fmx.data import expert_examples, load as data_load, ranking, sequences as seqlib
  from fmx.hypercast import logging_tier
  from fmx.models.embeddings import padded_vocab
  from fmx.runtime import fm as fm_runtime
  from fmx.train import expert, fm, retrieval, sharding
  from fmx.train.state import make_optimizer

  assert len(jax.devices()) == 8
  meshes = ((1, 1),) + MESHES

  def layout(c, data, model):
    return sharding.Layout(sharding.make_mesh(data, model), sharding.logical_rules(c.mesh))

  def train(c, init, train_step, batches, mesh_shape):
    """(losses, parameters, state) after STEPS steps on `mesh_shape`."""
    lay = layout(c, *mesh_shape)
    init_rng, rng = jax.random.split(jax.random.PRNGKey(c.seed))
    _, shardings, init_fn, step_fn = sharding.compile_train(init, train_step, lay, init_rng)
    state, losses = init_fn(init_rng), []
    for b in batches:
      state, scalars = step_fn(state, b, rng)
      losses.append(float(scalars["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, state.params), state

  def check_table(job, state, path, mesh_shape, vocab):
    table = state.params
    for k in path:
      table = table[k]
    rows = vocab // mesh_shape[1]  # item_table="rows": split by rows over `model`
    assert {s.data.shape[0] for s in table.addressable_shards} == {rows}, (job, table.sharding)
    assert table.sharding.spec[0] == "model", table.sharding

  def same(job, mesh_shape, ref, got, rtol=1e-4, atol=1e-6):
    ref_losses, ref_params = ref
    losses, params = got
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"{job} losses")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=rtol, atol=atol,
                                                         err_msg=f"{job} params"),
                 ref_params, params)
    print(f"{job} {mesh_shape[0]}x{mesh_shape[1]} ok {time.time() - T0:.0f}", flush=True)

  if part == "retrieval":
    # ---- retrieval: HSTU next-item training, and the full ranking of every user
    c = retrieval_configs.get_config("synthetic", "hstu", "runlocal")
    c.model.num_layers = 1
    c.input.update(batch_size=16, length_buckets=(), sort_chunk=0)
    c.input.synthetic.update(num_users=64, num_items=123)
    c.loss.num_negatives = 16
    data = data_load.load(c.input, "sequences")
    vocab = padded_vocab(data.num_items, 4)
    task = retrieval.RetrievalTask(c, retrieval.build_model(c.model, vocab),
                                   make_optimizer(c.optimizer), data.num_items)
    ds, _ = seqlib.train_batches(data, c.input.protocol, c.input.max_len, 16, c.seed, 1)
    batches = [ds[i] for i in range(STEPS)]
    arrays = seqlib.eval_arrays(data, c.input.protocol, "test", c.input.max_len)
    ref = ranks_ref = None
    for mesh_shape in meshes:
      losses, params, state = train(c, task.init, task.train_step, batches, mesh_shape)
      lay = layout(c, *mesh_shape)
      rank_fn = lay.jit_eval(task.eval_ranks, lay.params(task.init))
      ranks = retrieval.evaluate_ranks(rank_fn, state.params, arrays, 16)
      if ref is None:
        ref, ranks_ref = (losses, params), ranks
        continue
      check_table("retrieval", state, ("items", "embedding"), mesh_shape, vocab)
      np.testing.assert_array_equal(ranks, ranks_ref)
      same("retrieval", mesh_shape, ref, (losses, params))
    return

  # ---- FM: MTML ranking with candidates, then its TAEs as the logging tier writes them
  c = foundation.get_config("synthetic", "runlocal,nobaseline")
  c.input.update(batch_size=16, max_history=24, num_candidates=4)
  c.input.synthetic.update(num_users=48, num_items=93, num_surfaces=2, min_len=16, max_len=40)
  c.model.max_len = 28
  c.model.num_layers = 1
  data = data_load.load(c.input, "surfaces")
  model, items = fm_runtime.build(c, data)
  mask = data.spec.fm_tasks.astype(np.float32)
  init, train_step, _ = fm.make_steps(c, model, items, data.spec, mask)
  ds, _ = ranking.train_batches(data, 24, 4, 16, c.seed, 1, c.input.windows_per_user)
  batches = [ds[i] for i in range(STEPS)]
  ref = rows_ref = None
  for mesh_shape in meshes:
    losses, params, state = train(c, init, train_step, batches, mesh_shape)
    pinned = fm_runtime.PinnedFM(c, model, items, state.params, STEPS, data, "",
                                 layout(c, *mesh_shape))
    rows = [logging_tier.window_rows(pinned, b, split) for split in ("valid", "test")
            for b in ranking.eval_batches(data, split, 24, 4, 16)]
    rows = {k: np.concatenate([r[k] for r in rows]) for k in logging_tier.COLUMNS}
    if ref is None:
      ref, rows_ref = (losses, params), rows
      continue
    check_table("fm", state, ("item", "embedding"), mesh_shape, padded_vocab(data.num_items, 4))
    same("fm", mesh_shape, ref, (losses, params))
    for k in logging_tier.COLUMNS:
      np.testing.assert_allclose(rows[k], rows_ref[k], rtol=1e-4, atol=2e-5, err_msg=k)
    print(f"logging {mesh_shape[0]}x{mesh_shape[1]} ok", flush=True)

  # ---- expert: the first surface's expert on those TAEs (the 1-device FM's rows)
  c = expert_configs.get_config("synthetic", "tae,runlocal", fm_workdir="")
  c.input.update(batch_size=16, short_len=8)
  ex = expert_examples.surface_examples(data, rows_ref, 0, c.input.short_len)
  fit = expert_examples.partition(ex, 0.25)["fit"]
  vocab = padded_vocab(data.num_items, 4)
  _, init, train_step, _ = expert.make_steps(c, data.spec, 0, vocab, items,
                                             next(expert_examples.eval_batches(fit, 1)))
  ds, _ = expert_examples.train_batches(fit, 16, c.seed, 1)
  batches = [ds[i] for i in range(STEPS)]
  ref = None
  for mesh_shape in meshes:
    losses, params, state = train(c, init, train_step, batches, mesh_shape)
    if ref is None:
      ref = losses, params
      continue
    same("expert", mesh_shape, ref, (losses, params))


if __name__ == "__main__":
  _run(sys.argv[1])
