"""Surface experts on seeded synthetic cross-surface data, on the TAEs of a trained FM.

Run (after the FM and the logging tier:
  python -m fmx.main --config=fmx/configs/synthetic_fm.py --workdir=/tmp/synthetic_fm
  python -m fmx.main --config=fmx/configs/logging_tier.py:synthetic --workdir=/tmp/synthetic_logging):
  python -m fmx.main --config=fmx/configs/synthetic_expert.py:tae --workdir=/tmp/synthetic_expert_tae
Carriers: none, tae, ue, tae+ue, kd (+ runlocal). Reads version v1 of the store
/tmp/synthetic_fm/taes; tae.store and tae.fm_version choose others.
"""

from fmx.configs import expert


def get_config(arg=None):
  return expert.get_config("synthetic", arg, fm_workdir="/tmp/synthetic_fm")
