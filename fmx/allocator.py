"""The memory allocator of fmx's commands: memory a step frees is kept for the next step.

XLA:CPU allocates every step's temporaries afresh. Under glibc's defaults a buffer over its mmap
threshold (which rises to at most 32 MB) is its own mmap, unmapped when freed, so its pages
fault in (and the kernel zeroes them) on first touch in every step: on ML-1M, HSTU `large` took
221,000 page faults and 0.5 s of kernel CPU time per 0.7 s step. `python -m fmx.main` (and the
training benchmarks) therefore restart themselves once, as the same process (`os.execve`),
under an allocator that keeps freed memory:

  FMX_MALLOC=auto      tcmalloc if the system has it (Debian: libtcmalloc-minimal4), else the
                       process as started (the default)
  FMX_MALLOC=tcmalloc  tcmalloc, preloaded (an error if it is missing)
  FMX_MALLOC=glibc     glibc with one arena, no mmap and no trimming (MALLOC_ARENA_MAX=1,
                       MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_): fast, but
                       memory is never returned to the kernel
  FMX_MALLOC=system    the process as started

A process that already preloads anything (Colab preloads tcmalloc; memory profilers preload
their own malloc) is left as started. The cost is memory: peak RSS grows (HSTU `large` on
ML-1M: 3.0 GB as started, 4.9 GB under tcmalloc, 7.0 GB under the glibc settings).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Callable, Mapping

ENV = "FMX_MALLOC"
APPLIED = "FMX_MALLOC_APPLIED"  # set in the restarted process (and inherited by its children)
CHOICES = ("auto", "tcmalloc", "glibc", "system")
GLIBC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
         "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(256 << 20)}


class AllocatorError(ValueError):
  pass


def find_tcmalloc() -> str | None:
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def settings(environ: Mapping[str, str], find: Callable[[], str | None] = find_tcmalloc,
             platform: str = sys.platform) -> dict[str, str] | None:
  """The environment variables to restart with, or None to run as started."""
  choice = environ.get(ENV, "auto") or "auto"
  if choice not in CHOICES:
    raise AllocatorError(f"{ENV}={choice}: expected one of {', '.join(CHOICES)}")
  if (choice == "system" or APPLIED in environ or not platform.startswith("linux")
      or environ.get("LD_PRELOAD", "").strip()):
    return None
  if choice == "glibc":  # a MALLOC_* setting of the user's own is kept
    return {**{k: v for k, v in GLIBC.items() if k not in environ}, APPLIED: "glibc"}
  lib = find()
  if lib:
    return {"LD_PRELOAD": lib, APPLIED: "tcmalloc"}
  if choice == "tcmalloc":
    raise AllocatorError(f"{ENV}=tcmalloc: no libtcmalloc on this system (Debian: apt-get install "
                         f"libtcmalloc-minimal4), or use {ENV}=glibc or {ENV}=system")
  return None


def restart() -> None:
  """Restarts this process's command under the allocator `settings` pick (once; returns if
  none). Call it first thing in a command's `__main__`, before threads start."""
  try:
    env = settings(os.environ)
  except AllocatorError as e:
    print(f"fmx: {e}", file=sys.stderr)
    sys.exit(2)
  if env is not None and sys.executable and sys.orig_argv[-1:] != ["-"]:  # not a stdin script
    for stream in (sys.stdout, sys.stderr):
      if stream is not None:
        stream.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **env})


def active() -> str:
  """The allocator this process runs under: a preloaded one found in its memory map, else
  `glibc` (with fmx's settings) or `system`."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    maps = ""
  for name in ("tcmalloc", "jemalloc", "mimalloc"):
    if f"lib{name}" in maps:
      return name
  return "glibc" if os.environ.get(APPLIED) == "glibc" else "system"
