r"""K_μ → K_* as μ → 0, with the proven bound (docs/method.md §5).

  python launch.py --config=experiments/configs/convergence.py
  python launch.py --config=experiments/configs/convergence.py:quick

For each setting (gap case, n < r, rank-deficient X, an exact tie) and seed,
||K_μ − K_*||_F / ||K_*||_F for μ = 1e-1 … 1e-8 in float64 and float32, the
bound C(μ) μ, fitted slopes, the float32 floor, plain and data errors of K_μ
next to the μ = 0 solution. The problems: `ctxlr.reference.make_problem`.
Results and timings: docs/results/convergence/.
"""

import ml_collections


def _setting(d_in, d_out, n, rank, *, cond=10.0, x_rank=None, tie=None):
  """One problem shape; `tie=(a, t)`: σ_{a+1} = … = σ_{a+t} of XK."""
  return dict(
      d_in=d_in, d_out=d_out, n=n, rank=rank, cond=cond, x_rank=x_rank, tie=tie
  )


def get_config(arg=None):
  """Five settings × 5 seeds, μ = 1e-1 … 1e-8 (half decades), float64 and
  float32. Writes results.json, summary.md, convergence.png and errors.png;
  no resume (a few minutes). `quick` (seconds): four small settings, two
  seeds, whole decades.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'convergence'
  config.seed = 0
  config.num_seeds = 5
  config.mus = tuple(10.0 ** (-e / 2) for e in range(2, 17))  # 1e-1 … 1e-8
  config.fit_max_mu = 1e-3  # slope fitted where μ <= this (asymptotics)
  config.dtypes = ('float64', 'float32')
  config.settings_order = (
      'gap',
      'few_tokens',
      'few_tokens_wide',
      'deficient_x',
      'tie',
  )
  config.settings = dict(
      gap=_setting(64, 48, 256, 16),
      few_tokens=_setting(30, 40, 6, 10),  # n < r: docs/method.md §5
      few_tokens_wide=_setting(128, 192, 32, 64, cond=100.0),
      deficient_x=_setting(64, 48, 256, 16, x_rank=8),
      tie=_setting(48, 64, 256, 12, tie=(9, 6)),
  )
  if arg == 'quick':  # a few seconds: run by a test
    config.num_seeds = 2
    config.mus = tuple(10.0**-e for e in range(1, 9))
    config.settings_order = ('gap', 'few_tokens', 'deficient_x', 'tie')
    config.settings = dict(
        gap=_setting(24, 16, 64, 6),
        few_tokens=_setting(30, 40, 6, 10),
        deficient_x=_setting(24, 16, 64, 8, x_rank=4),
        tie=_setting(16, 24, 64, 6, tie=(4, 4)),
    )
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
