"""Foundation model on seeded synthetic cross-surface data with known ground truth.

Run:
  python -m fmx.main --config=fmx/configs/synthetic_fm.py:runlocal --workdir=/tmp/synthetic_fm
Variants: base, large, runlocal (+ nobaseline).
"""

from fmx.configs import foundation


def get_config(arg=None):
  return foundation.get_config("synthetic", arg)
