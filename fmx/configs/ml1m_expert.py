"""Surface experts on the cross-surface MovieLens-1M view, on the TAEs of a trained FM.

Run (after the FM: python -m fmx.main --config=fmx/configs/ml1m_fm.py --workdir=/tmp/ml1m_fm):
  python -m fmx.main --config=fmx/configs/ml1m_expert.py:tae --workdir=/tmp/ml1m_expert_tae
Carriers: none, tae, ue, tae+ue, kd (+ runlocal). The TAEs of /tmp/ml1m_fm's latest checkpoint
are materialised into /tmp/ml1m_fm/taes (version v1) on first use; override tae.fm_workdir,
tae.store and tae.fm_version to read others.
"""

from fmx.configs import expert


def get_config(arg=None):
  return expert.get_config("ml-1m", arg, fm_workdir="/tmp/ml1m_fm")
