"""Foundation model (HSTU, MTML, TAEs) on the cross-surface view of MovieLens-1M.

Run:
  python -m fmx.main --config=fmx/configs/ml1m_fm.py:runlocal --workdir=/tmp/ml1m_fm
Variants: base, large, runlocal (+ nobaseline). Also trains the per-surface non-sequential
baseline on the same windows and reports `rel_ne/<surface>/<task>`.
"""

from fmx.configs import foundation


def get_config(arg=None):
  return foundation.get_config("ml-1m", arg)
