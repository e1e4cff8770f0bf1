"""HSTU next-item retrieval on MovieLens-100k (the official HSTU protocol).

Run:
  python -m fmx.main --config=fmx/configs/ml100k_hstu.py:runlocal --workdir=/tmp/ml100k_hstu
Variants: base (d=50, 2 blocks, 1 head, N=200, 128 negatives, batch 128, lr 1e-3, betas
(0.9, 0.98), 101 epochs), large (8 blocks, 2 heads, dqk=dv=25), runlocal; append
",validation" for a held-out validation item with best-epoch selection.
"""

from fmx.configs import retrieval


def get_config(arg=None):
  return retrieval.get_config("ml-100k", "hstu", arg)
