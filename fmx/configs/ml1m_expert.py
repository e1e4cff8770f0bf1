"""Surface experts on the cross-surface MovieLens-1M view, on the TAEs of a trained FM.

Run (after the FM and the logging tier:
  python -m fmx.main --config=fmx/configs/ml1m_fm.py --workdir=/tmp/ml1m_fm
  python -m fmx.main --config=fmx/configs/logging_tier.py:ml-1m --workdir=/tmp/ml1m_logging):
  python -m fmx.main --config=fmx/configs/ml1m_expert.py:tae --workdir=/tmp/ml1m_expert_tae
Carriers: none, tae, ue, tae+ue, kd (+ runlocal). Reads version v1 of the store
/tmp/ml1m_fm/taes; tae.store and tae.fm_version choose others.
"""

from fmx.configs import expert


def get_config(arg=None):
  return expert.get_config("ml-1m", arg, fm_workdir="/tmp/ml1m_fm")
