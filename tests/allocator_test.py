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


def test_auto_is_tcmalloc_where_the_system_has_it_else_as_started():
  assert settings({}) == {"LD_PRELOAD": TC, allocator.APPLIED: "tcmalloc"}
  assert settings({"FMX_MALLOC": "tcmalloc"}) == settings({})
  assert settings({}, found=None) is None


def test_glibc_keeps_freed_memory_when_asked_for():
  env = settings({"FMX_MALLOC": "glibc"})  # even where tcmalloc exists
  assert env == {**allocator.GLIBC, allocator.APPLIED: "glibc"}
  assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_ARENA_MAX"] == "1"
  assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 36
  own = settings({"FMX_MALLOC": "glibc", "MALLOC_ARENA_MAX": "4"})
  assert "MALLOC_ARENA_MAX" not in own and own["MALLOC_MMAP_MAX_"] == "0"  # the user's is kept


@pytest.mark.parametrize("env, platform", [
    ({"FMX_MALLOC": "system"}, "linux"),
    ({allocator.APPLIED: "glibc"}, "linux"),  # restarted already, or a child of one that was
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "linux"),  # Colab preloads tcmalloc
    ({"LD_PRELOAD": "libmemusage.so"}, "linux"),  # a memory profiler's malloc stays in front
    ({"FMX_MALLOC": "glibc", "LD_PRELOAD": "libjemalloc.so.2"}, "linux"),
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
          "allocator.restart(); print(os.getpid(), allocator.active(), "
          "os.environ.get('MALLOC_MMAP_MAX_'), sys._xoptions.get('probe'), sys.argv[1:])")
  p = subprocess.run([sys.executable, "-X", "probe=1", "-c", code, "arg"], cwd=ROOT, text=True,
                     capture_output=True, timeout=120, env={**env, "FMX_MALLOC": "glibc"})
  assert p.returncode == 0, p.stderr
  pid = p.stdout.split()[0]  # the code ran twice in one process, restarted once, flags kept
  assert p.stdout.splitlines() == [pid, pid, f"{pid} glibc 0 1 ['arg']"]


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="no tcmalloc on this system")
def test_tcmalloc_is_mapped_after_the_restart():
  env = {k: v for k, v in os.environ.items() if k not in (allocator.APPLIED, "LD_PRELOAD")}
  code = "from fmx import allocator; allocator.restart(); print(allocator.active())"
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, env={**env, "FMX_MALLOC": "auto"})
  assert (p.returncode, p.stdout.strip()) == (0, "tcmalloc"), p.stderr


def test_a_bad_choice_stops_fmx_main_with_one_line():
  p = subprocess.run([sys.executable, "-m", "fmx.main", "--config=fmx/configs/ml100k_hstu.py"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "FMX_MALLOC": "fast"})
  assert p.returncode == 2 and p.stderr.strip() == (
      "fmx: FMX_MALLOC=fast: expected one of auto, tcmalloc, glibc, system"), p.stderr
