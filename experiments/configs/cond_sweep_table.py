r"""The small conditioning table: Gram methods vs coala as cond(X) grows.

  python launch.py --config=experiments/configs/cond_sweep_table.py
  python launch.py --config=experiments/configs/cond_sweep_table.py:quick

X is 2048 × 256 with log-spaced singular values 1 … 1/cond (built in float64
from a controlled SVD, then cast to float32), K is 256 × 256 Gaussian
(float32). Every method sees the same float32 X; errors are evaluated in
float64 against the float64 optimum (experiments/scoring.py). Results:
docs/results/stability/ (the compact table of its synthetic section).
"""

import ml_collections

from ctxlr import registry


def get_config(arg=None):
  """cond(X) = 1e4, 1e6, 1e8; coala and every Gram method; ranks 32 … 256.

  Writes results.json and summary.md (the table); no resume (seconds).
  `quick`: X 512 × 64, ranks 8 … 64.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'cond_sweep_table'
  config.seed = 0
  config.n, config.d_in, config.d_out = 2048, 256, 256
  config.conds = (1e4, 1e6, 1e8)
  config.ranks = (32, 128, 200, 240, 256)
  config.methods = ('coala',) + tuple(registry.names(needs='gram'))
  if arg == 'quick':  # a few seconds: run by a test
    config.n, config.d_in, config.d_out = 512, 64, 64
    config.ranks = (8, 32, 60, 64)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
