r"""Perplexity vs number of calibration tokens, at one kept ratio.

  python launch.py --config=experiments/configs/calibration_sweep.py
  python launch.py --config=experiments/configs/calibration_sweep.py:quick

With few tokens (n < d_in) XᵀX is singular: Gram methods fail, retry or
produce non-finite factors, and the μ = 0 solution is an arbitrary minimiser;
the regularized, inversion-free solve stays defined. Each size calibrates
once; all runs at that size see the same statistics. Finished rows are kept.

'k_star' is the float64 reference K_* (the limit of the ridge as μ → 0, the
minimiser closest to K; docs/method.md §5). It needs statistics accumulated in
float64, so sizes up to `kstar_max_tokens` calibrate in float64 (the float32
methods get them rounded to float32); above it K_* is not run (every layer
then has full data rank, and K_* is the μ = 0 solution).
"""
import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.experiment = 'calibration_sweep'
  config.model = dict(path='', param_dtype='float32')
  config.calib = dict(corpus='wikipedia', seq_len=512, batch_size=4)
  config.num_tokens = (32, 128, 512, 2048, 8192, 32768)
  config.eval = dict(corpora=('wikipedia', 'sotu'), num_tokens=2048,
                     seq_len=512, batch_size=4)
  config.ratio = 0.8
  # 'method' or 'coala@mu0' (μ₀ of the energy-scaled ridge, docs/method.md §4).
  config.runs = ('coala', 'coala@0.0001', 'k_star', 'svd_llm', 'svd_llm_eps',
                 'svd_llm_v2', 'corda', 'coala@0.01', 'asvd')
  config.kstar_max_tokens = 2048
  config.mu_rule = 'energy'
  config.include = ('*_proj',)
  config.exclude = ()
  if arg == 'quick':
    config.num_tokens = (32, 128)
    config.calib.seq_len = 64
    config.eval = dict(corpora=('wikipedia',), num_tokens=128, seq_len=64,
                       batch_size=2)
    config.runs = ('coala', 'coala@0.01', 'k_star', 'svd_llm_eps')
    config.kstar_max_tokens = 32
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
