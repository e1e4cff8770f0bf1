"""Surface experts on seeded synthetic cross-surface data, on the TAEs of a trained FM.

Run (after the FM: python -m fmx.main --config=fmx/configs/synthetic_fm.py --workdir=/tmp/synthetic_fm):
  python -m fmx.main --config=fmx/configs/synthetic_expert.py:tae --workdir=/tmp/synthetic_expert_tae
Carriers: none, tae, ue, tae+ue, kd (+ runlocal). The TAEs of /tmp/synthetic_fm's latest
checkpoint are materialised into /tmp/synthetic_fm/taes (version v1) on first use.
"""

from fmx.configs import expert


def get_config(arg=None):
  return expert.get_config("synthetic", arg, fm_workdir="/tmp/synthetic_fm")
