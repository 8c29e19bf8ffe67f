r"""Every method at several kept ratios, same calibration, perplexity.

  python launch.py --config=experiments/configs/compare_methods.py
  python launch.py --config=experiments/configs/compare_methods.py:quick

One calibration pass gathers the statistics every run needs (R, XᵀX, Σ|x|)
of every projection of the default model; each (run, ratio) then compresses
a copy and is evaluated on the held-out Wikipedia and State-of-the-Union
sets. Results: docs/results/compare_methods/.
"""

import ml_collections

from ctxlr import registry
from experiments import configs


def get_config(arg=None):
  """The sweep: every registered method (the float64 reference aside) at
  kept ratios 0.9 … 0.5, coala also with global ranks. Writes results.json
  (one row per run and ratio, kept as it finishes: a rerun skips them),
  summary.md and perplexity_vs_ratio.png. `quick`: one block, two runs.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'compare_methods'
  config.model = dict(path='', param_dtype='float32')
  config.calib = dict(
      corpus='wikipedia', num_tokens=8192, seq_len=512, batch_size=4
  )
  config.eval = dict(
      corpora=('wikipedia', 'sotu'), num_tokens=4096, seq_len=512, batch_size=4
  )
  config.ratios = (0.9, 0.8, 0.7, 0.6, 0.5)
  # {label: variant} (experiments/common.py, check_variants); keys: method,
  # allocation, mu, mu_rule, auto_mu. In this order in tables and figures.
  methods = ['coala'] + registry.names(float64=False)  # coala first
  runs = {m: dict(method=m) for m in methods}
  runs['coala_global'] = dict(method='coala', allocation='global')
  config.runs = configs.variants(**runs)
  config.include = ('*_proj',)
  config.exclude = ()
  if arg == 'quick':
    config.calib = dict(
        corpus='wikipedia', num_tokens=256, seq_len=64, batch_size=2
    )
    config.eval = dict(
        corpora=('wikipedia',), num_tokens=128, seq_len=64, batch_size=2
    )
    config.ratios = (0.8,)
    config.runs = configs.variants(
        coala=dict(method='coala'), svd_llm=dict(method='svd_llm')
    )
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
