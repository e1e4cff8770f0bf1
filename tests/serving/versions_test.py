"""Serving from training workdirs: an FM workdir (job=fm, its steps are versions) and an expert
workdir (job=expert), where each surface's expert is at its own version; a damaged new version
is skipped while the old one keeps serving."""

import flax.linen as nn
import jax
import numpy as np

from servable import rank_body
from fmx.configs import synthetic_expert, synthetic_fm
from fmx.data import load as data_load
from fmx.data.items import item_table
from fmx.models.embeddings import padded_vocab
from fmx.models.expert import example_batch, from_config
from fmx.runtime import checkpoint, fm as fm_runtime
from fmx.serving.expert_tier import ExpertRequest, ExpertTier
from fmx.serving.initialised import plain
from fmx.serving.versions import ExpertSource, FMSource, Registry


def save(directory, step, params, config):
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=None)
  ckpt.save(step, {"params": params}, {"config": plain(config)})
  ckpt.close()


def damage(step_dir):
  """Flips a byte in the largest array file of a checkpoint step's parameters."""
  target = max((f for f in step_dir.rglob("*") if f.is_file() and "/d/" in str(f)),
               key=lambda f: f.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0xFF
  target.write_bytes(bytes(data))


def test_fm_and_per_surface_expert_workdirs(tmp_path, capsys):
  fm_c, ex_c = synthetic_fm.get_config("runlocal"), synthetic_expert.get_config("runlocal")
  data = data_load.load(fm_c.input, "surfaces")
  model, items = fm_runtime.build(fm_c, data)
  fm_params = fm_runtime.init_params(fm_c, model, items, jax.random.PRNGKey(0))
  save(tmp_path / "fm" / "checkpoints", 30, fm_params, fm_c)
  d_fm = fm_params["item"]["embedding"].shape[1]
  vocab = padded_vocab(data.num_items, ex_c.mesh.model)
  ex_items = item_table(data, vocab)
  experts = {}
  for k, name in enumerate(data.spec.surfaces):
    ex = from_config(ex_c, vocab, int(data.spec.valid[k].sum()))
    experts[name] = nn.meta.unbox(ex.init(jax.random.PRNGKey(k),
                                          example_batch(1, ex_c.input.short_len, d_fm),
                                          ex_items)["params"])
    save(tmp_path / "experts" / name / "checkpoints", 100 + k, experts[name], ex_c)

  registry = Registry(FMSource(str(tmp_path / "fm"), data),
                      ExpertSource(str(tmp_path / "experts"), data, "follow_0"),
                      on_new=lambda served: None, every=1.0)
  assert registry.refresh()
  served = registry.current
  assert served.fm.version == 30
  assert {n: e.version for n, e in served.experts.items()} == {
      n: 100 + k for k, n in enumerate(data.spec.surfaces)}  # each surface at its own step
  assert not any(e.uses_table for e in served.experts.values())
  assert not registry.refresh()  # nothing newer
  save(tmp_path / "experts" / "s1" / "checkpoints", 200, experts["s1"], ex_c)
  assert registry.refresh() and registry.current.experts["s1"].version == 200
  assert registry.current.experts["s0"] is served.experts["s0"]  # the others stay as they were

  save(tmp_path / "experts" / "s1" / "checkpoints", 300, experts["s1"], ex_c)
  damage(tmp_path / "experts" / "s1" / "checkpoints" / "300")
  assert not registry.refresh()  # a damaged new version is skipped; the old one keeps serving
  assert registry.current.experts["s1"].version == 200
  assert "not serving" in capsys.readouterr().err
  save(tmp_path / "experts" / "s1" / "checkpoints", 400, experts["s1"], ex_c)
  assert registry.refresh() and registry.current.experts["s1"].version == 400

  tier = ExpertTier(ex_items, data.spec, batch_buckets=(1,), micro_batch=4,
                    weights={"click": 1.0})
  body = rank_body(data, n_hist=6, n_cand=5)
  cands = np.array([c["item"] for c in body["candidates"]], np.int32)
  req = ExpertRequest("s1", {f: np.zeros(0, np.int32) for f in ("ids", "actions", "timestamps")},
                      body["request_time"], cands, np.asarray(ex_items["content"])[cands],
                      np.zeros((5, d_fm), np.float32), np.zeros(d_fm, np.float32))
  (probs, scores), = tier.run(registry.current.fm, registry.current.experts, [req])
  assert probs.shape == (5, int(data.spec.valid[1].sum())) and np.isfinite(scores).all()
  np.testing.assert_allclose(scores, probs[:, tier.tasks["s1"].index("click")])
