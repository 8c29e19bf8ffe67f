r"""Solver demo on synthetic data: error vs rank for every method.

  python launch.py --config=experiments/configs/solver_demo.py
  python launch.py --config=experiments/configs/solver_demo.py:quick

X (n × d_in) has log-spaced singular values 1 … 1/cond; K is Gaussian. Each
method's rank-r factors are scored by ||X(K − K')||_F in float64 against the
float64 optimum (experiments/scoring.py). Runs in well under a minute on 2
CPU cores.
"""

import ml_collections

from ctxlr import registry


def get_config(arg=None):
  """One X of cond 1e6 (2048 × 256), every registered method but the
  float64 reference, ranks 0.125 … 1 of 256. Writes results.json,
  summary.md and error_vs_rank.png; no resume (seconds). `quick`: 256 × 32.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'solver_demo'
  config.seed = 0
  config.n = 2048
  config.d_in = 256
  config.d_out = 256
  config.cond = 1e6  # cond(X)
  config.methods = tuple(registry.names(float64=False))
  config.rank_fractions = (0.125, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)
  if arg == 'quick':  # a few seconds: run by a test
    config.n, config.d_in, config.d_out = 256, 32, 32
    config.rank_fractions = (0.25, 0.5, 1.0)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
