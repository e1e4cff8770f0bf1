"""Two file primitives every stage relies on: atomic writes and exclusive OS locks.

`atomic_write` makes a file appear complete or not at all (write a temporary, fsync, rename,
fsync the directory). `exclusive` holds an OS lock (`fcntl.flock`) that the kernel releases
when the holder dies, so a killed writer never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import sys


class LockedError(RuntimeError):
  """Another live process holds the lock; the message names it and its PID."""


def fsync_dir(path: os.PathLike | str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write(path: os.PathLike | str, data: bytes | str) -> None:
  """Writes `data` to `path` so a reader sees the old file or the whole new one, never a part."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive(path: os.PathLike | str, what: str, wait: bool = False):
  """Holds an exclusive lock on `path` (created if needed) for the `with` block.

  Raises `LockedError` at once, naming `what` and the holder's PID, if another process holds it;
  with `wait`, blocks until the holder releases it instead.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      if not wait:
        raise LockedError(f"{what} is in use by process {holder} (lock {path}); wait for it to "
                          "finish or stop it") from None
      print(f"fmx: waiting for process {holder}, which is {what} (lock {path})", file=sys.stderr)
      fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    yield
  finally:
    os.close(fd)  # closing the descriptor releases the lock
