"""The OS lock every writer takes: refused at once, or waited for, and released when its holder
dies."""

import subprocess
import sys
import time

import pytest

from fmx import files

HOLD = """
import sys, time
from fmx import files
with files.exclusive(sys.argv[1], "holding"):
  print("held", flush=True)
  time.sleep(float(sys.argv[2]))
"""


def hold(path, seconds):
  p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)],
                       stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "held"
  return p


def test_a_held_lock_is_refused_or_waited_for(tmp_path, capsys):
  lock = tmp_path / ".lock"
  p = hold(lock, 2)
  t0 = time.monotonic()
  try:
    with pytest.raises(files.LockedError, match=f"in use by process {p.pid}"):
      with files.exclusive(lock, "the store"):
        pass
    with files.exclusive(lock, "preparing ml-1m", wait=True):
      assert time.monotonic() - t0 > 1  # only once the holder let go
    assert f"waiting for process {p.pid}, which is preparing ml-1m" in capsys.readouterr().err
  finally:
    p.kill()


def test_a_killed_holder_releases_its_lock(tmp_path):
  lock = tmp_path / ".lock"
  p = hold(lock, 60)
  p.kill()
  p.wait()
  with files.exclusive(lock, "the store"):
    pass
