"""The session's servable workdir (fmx.serving.initialised), and servable.py on the path."""

import pathlib
import sys

import numpy as np
import pytest

from fmx.configs import hypercast_ml1m
from fmx.data import load as data_load
from fmx.serving.initialised import publish_fm, save_experts

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the tests import servable


@pytest.fixture(scope="session")
def served_workdir(tmp_path_factory):
  """(HyperCast workdir, pipeline config, data, FM params v1, expert params step 10)."""
  root = tmp_path_factory.mktemp("hypercast")
  c = hypercast_ml1m.get_config("synthetic")
  c.experts.stream.follow = ("newest",)
  data = data_load.load(c.fm.input, "surfaces")
  fm_params = publish_fm(root, data, c.fm, 1, seed=0)
  table = np.asarray(fm_params["item"]["embedding"])
  ex_params = save_experts(root, data, c.experts, 10, seed=1, fm_dim=table.shape[1],
                           fm_vocab=table.shape[0])
  return root, c, data, fm_params, ex_params

