r"""Perplexity vs number of calibration tokens, at one kept ratio.

  python launch.py --config=experiments/configs/calibration_sweep.py
  python launch.py --config=experiments/configs/calibration_sweep.py:quick

With few tokens (n < d_in) XᵀX is singular: Gram methods fail, retry or
produce non-finite factors, and the μ = 0 solution is an arbitrary minimiser;
the regularized, inversion-free solve stays defined. Each size calibrates
once; all runs at that size see the same statistics. Finished rows are kept.
"""
import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.experiment = 'calibration_sweep'
  config.model = dict(path='', param_dtype='float32')
  config.calib = dict(corpus='wikipedia', seq_len=512, batch_size=4)
  config.num_tokens = (32, 128, 512, 2048, 8192, 32768)
  config.eval = dict(corpora=('wikipedia', 'sotu'), num_tokens=4096,
                     seq_len=512, batch_size=4)
  config.ratio = 0.8
  # 'method' or 'ctxlr@mu0' (μ₀ of the energy-scaled ridge, MATH.md §4).
  config.runs = ('ctxlr', 'ctxlr@0.001', 'ctxlr@0.01', 'ctxlr@0.1',
                 'svd_llm', 'svd_llm_eps', 'svd_llm_v2', 'corda', 'asvd')
  config.mu_rule = 'energy'
  config.include = ('*_proj',)
  config.exclude = ()
  if arg == 'quick':
    config.num_tokens = (32, 128)
    config.calib.seq_len = 64
    config.eval = dict(corpora=('wikipedia',), num_tokens=128, seq_len=64,
                       batch_size=2)
    config.runs = ('ctxlr', 'ctxlr@0.01', 'svd_llm_eps')
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
