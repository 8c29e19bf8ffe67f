r"""Every method at several kept ratios, same calibration, perplexity.

  python launch.py --config=experiments/configs/compare_methods.py
  python launch.py --config=experiments/configs/compare_methods.py:quick

One calibration pass gathers every statistic (R, XᵀX, Σ|x|) of every
projection of the default model; each (method, ratio) then compresses a copy
and is evaluated on the held-out Wikipedia and State-of-the-Union sets.
Finished rows are kept in results.json: a rerun skips them.
"""
import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.experiment = 'compare_methods'
  config.model = dict(path='', param_dtype='float32')
  config.calib = dict(corpus='wikipedia', num_tokens=8192, seq_len=512,
                      batch_size=4)
  config.eval = dict(corpora=('wikipedia', 'sotu'), num_tokens=4096,
                     seq_len=512, batch_size=4)
  config.ratios = (0.9, 0.8, 0.7, 0.6, 0.5)
  # (method, allocation) pairs; 'coala' also with the global allocation.
  config.runs = ('coala:uniform', 'coala:global', 'svd:uniform',
                 'asvd:uniform', 'svd_llm:uniform', 'svd_llm_eps:uniform',
                 'svd_llm_v2:uniform', 'corda:uniform')
  config.include = ('*_proj',)
  config.exclude = ()
  if arg == 'quick':
    config.calib = dict(corpus='wikipedia', num_tokens=256, seq_len=64,
                        batch_size=2)
    config.eval = dict(corpora=('wikipedia',), num_tokens=128, seq_len=64,
                       batch_size=2)
    config.ratios = (0.8,)
    config.runs = ('coala:uniform', 'svd_llm:uniform')
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
