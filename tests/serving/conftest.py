"""The session's servable workdir (see servable.py)."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the tests import servable
from servable import data_load, hypercast_ml1m, publish_fm, save_experts  # pylint: disable=wrong-import-position


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

