r"""Perplexity vs number of calibration tokens, at one kept ratio.

  python launch.py --config=experiments/configs/calibration_sweep.py
  python launch.py --config=experiments/configs/calibration_sweep.py:quick

With few tokens (n < d_in) XᵀX is singular: Gram methods fail, retry or
produce non-finite factors, and the μ = 0 solution is an arbitrary minimiser;
the regularized, inversion-free solve stays defined. Each size calibrates
once; all runs at that size see the same statistics.

'k_star' is the float64 reference K_* (the limit of the ridge as μ → 0, the
minimiser closest to K; docs/method.md §5). It needs statistics accumulated in
float64, so sizes up to `kstar_max_tokens` calibrate in float64 (the float32
methods get them rounded to float32); above it K_* is not run (every layer
then has full data rank, and K_* is the μ = 0 solution).
Results: docs/results/calibration_sweep/.
"""

import ml_collections

from ctxlr import registry
from experiments import configs


def get_config(arg=None):
  """The sweep: every method that reads calibration data, and coala's ridge
  at μ₀ = 1e-4 and 1e-2, at 32 … 32,768 tokens. Writes results.json (one
  row per run and size, kept as it finishes: a rerun skips them),
  summary.md and perplexity_vs_tokens.png. `quick`: one block, 32 and 128
  tokens, four runs.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'calibration_sweep'
  config.model = dict(path='', param_dtype='float32')
  config.calib = dict(corpus='wikipedia', seq_len=512, batch_size=4)
  config.num_tokens = (32, 128, 512, 2048, 8192, 32768)
  config.eval = dict(
      corpora=('wikipedia', 'sotu'), num_tokens=2048, seq_len=512, batch_size=4
  )
  config.ratio = 0.8
  # {label: variant} (experiments/common.py, check_variants); keys: method,
  # allocation, mu (μ₀ of the ridge, docs/method.md §4), mu_rule, auto_mu.
  # Labels are identifiers (overridable as --config.runs.<label>.mu=…):
  # coala_mu_0p0001 is coala with μ₀ = 0.0001.
  runs = {
      m: dict(method=m)
      for m in ['coala'] + registry.names()
      if registry.get(m).context_aware
  }
  runs['coala_mu_0p0001'] = dict(method='coala', mu=1e-4)
  runs['coala_mu_0p01'] = dict(method='coala', mu=1e-2)
  config.runs = configs.variants(**runs)
  config.kstar_max_tokens = 2048  # float64 statistics (and K_*) up to here
  config.include = ('*_proj',)
  config.exclude = ()
  if arg == 'quick':
    config.num_tokens = (32, 128)
    config.calib.seq_len = 64
    config.eval = dict(
        corpora=('wikipedia',), num_tokens=128, seq_len=64, batch_size=2
    )
    config.runs = configs.variants(
        coala=dict(method='coala'),
        coala_mu_0p01=dict(method='coala', mu=1e-2),
        k_star=dict(method='k_star'),
        svd_llm_eps=dict(method='svd_llm_eps'),
    )
    config.kstar_max_tokens = 32
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
