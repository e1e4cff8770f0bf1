"""fmx's commands restart once under an allocator that keeps freed memory (fmx/allocator.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

from fmx import allocator

ROOT = pathlib.Path(__file__).resolve().parents[1]
TC = "/usr/lib/libtcmalloc_minimal.so.4"


def settings(env, found=TC, platform="linux"):
  return allocator.settings(env, lambda: found, platform)


def test_auto_prefers_tcmalloc_and_keeps_other_preloads():
  assert settings({}) == {"LD_PRELOAD": TC, allocator.APPLIED: "tcmalloc"}
  assert settings({"LD_PRELOAD": "libx.so"})["LD_PRELOAD"] == f"{TC} libx.so"
  assert settings({"FMX_MALLOC": "tcmalloc"})["LD_PRELOAD"] == TC


def test_auto_falls_back_to_glibc_that_keeps_freed_memory():
  env = settings({}, found=None)
  assert env == {**allocator.GLIBC, allocator.APPLIED: "glibc"}
  assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_ARENA_MAX"] == "1"
  assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 36
  assert settings({"FMX_MALLOC": "glibc"}) == env  # asked for, even where tcmalloc exists


@pytest.mark.parametrize("env, platform", [
    ({"FMX_MALLOC": "system"}, "linux"),
    ({allocator.APPLIED: "glibc"}, "linux"),  # restarted already, or a child of one that was
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "linux"),  # Colab preloads tcmalloc
    ({"LD_PRELOAD": "libjemalloc.so.2"}, "linux"),
    ({}, "darwin"),
])
def test_left_as_started(env, platform):
  assert settings(env, platform=platform) is None


def test_bad_choices_say_what_to_do():
  with pytest.raises(allocator.AllocatorError, match="expected one of auto, tcmalloc, glibc"):
    settings({"FMX_MALLOC": "jemalloc"})
  with pytest.raises(allocator.AllocatorError, match="libtcmalloc-minimal4.*FMX_MALLOC=glibc"):
    settings({"FMX_MALLOC": "tcmalloc"}, found=None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_restart_is_the_same_process_with_the_settings_and_its_arguments():
  env = {k: v for k, v in os.environ.items() if k not in (allocator.APPLIED, "LD_PRELOAD")}
  code = ("import os, sys; print(os.getpid(), flush=True); from fmx import allocator; "
          "allocator.restart(); print(os.getpid(), os.environ.get('FMX_MALLOC_APPLIED'), "
          "os.environ.get('MALLOC_MMAP_MAX_'), sys.flags.dont_write_bytecode)")
  p = subprocess.run([sys.executable, "-B", "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, env={**env, "FMX_MALLOC": "glibc"})
  assert p.returncode == 0, p.stderr
  pid = p.stdout.split()[0]  # the code ran twice in one process, restarted once, flags kept
  assert p.stdout.splitlines() == [pid, pid, f"{pid} glibc 0 1"]


def test_a_bad_choice_stops_fmx_main_with_one_line():
  p = subprocess.run([sys.executable, "-m", "fmx.main", "--config=fmx/configs/ml100k_hstu.py"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "FMX_MALLOC": "fast"})
  assert p.returncode == 2 and p.stderr.strip() == (
      "fmx: FMX_MALLOC=fast: expected one of auto, tcmalloc, glibc, system"), p.stderr
