r"""Every method at several kept ratios, same calibration, perplexity.

  python launch.py --config=experiments/configs/compare_methods.py
  python launch.py --config=experiments/configs/compare_methods.py:quick

One calibration pass gathers the statistics every run needs (R, XᵀX, Σ|x|)
of every projection of the default model; each (run, ratio) then compresses
a copy and is evaluated on the held-out Wikipedia and State-of-the-Union
sets. Results: docs/results/compare_methods/.
"""

import ml_collections

from experiments import configs


def get_config(arg=None):
  """The sweep: the main job's recommended pipeline (coala, loss-driven
  ranks) and every peer at kept ratios 0.9 … 0.5. Writes results.json
  (one row per run and ratio, kept as it finishes: a rerun skips them),
  summary.md and perplexity_vs_ratio.png. `quick`: one block, two runs.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'compare_methods'
  config.model = dict(path='', param_dtype='float32')
  # The main job's calibration: Wikipedia and State-of-the-Union calibration
  # splits in equal shares (held-out splits untouched).
  config.calib = dict(
      corpus='',
      mixture='wikipedia:1,sotu:1',
      num_tokens=8192,
      seq_len=512,
      batch_size=4,
  )
  config.eval = dict(
      corpora=('wikipedia', 'sotu'), num_tokens=4096, seq_len=512, batch_size=4
  )
  config.ratios = (0.9, 0.8, 0.7, 0.6, 0.5)
  # {label: variant} (experiments/common.py, check_variants); keys: method,
  # allocation, mu, mu_rule, auto_mu, options (the method's own), mode. In
  # this order in tables and figures. Each peer runs with its own published
  # allocation, uniform where it has none (ASVD's perplexity-probing rank
  # search is not reproduced). Sequential mode is measured at 0.8 in
  # docs/results/ablation (it does not change the ranking there).
  runs = dict(
      recommended=dict(method='coala', allocation='fisher'),
      corda=dict(method='corda'),
      svd_llm=dict(method='svd_llm'),
      svd_llm_v2=dict(method='svd_llm_v2', allocation='svd_llm_v2'),
      asvd=dict(method='asvd'),
      coala=dict(method='coala'),
      coala_published=dict(method='coala', mu=1.0, mu_rule='error_ratio'),
      coala_hetero=dict(method='coala', allocation='coala_hetero'),
      corda_fisher=dict(method='corda', allocation='fisher'),
      # CorDA's weighting without its inverse (coala's power 1) on the same
      # ranks: what separates the two rows above is the weighting.
      recommended_p1=dict(
          method='coala', allocation='fisher', options=dict(power=1.0)
      ),
      svd=dict(method='svd'),
  )
  config.runs = configs.variants(**runs)
  config.include = ('*_proj',)
  config.exclude = ()
  if arg == 'quick':
    config.calib = dict(
        corpus='',
        mixture='wikipedia:1,sotu:1',
        num_tokens=256,
        seq_len=64,
        batch_size=2,
    )
    config.eval = dict(
        corpora=('wikipedia',), num_tokens=128, seq_len=64, batch_size=2
    )
    config.ratios = (0.8,)
    config.runs = configs.variants(
        recommended=dict(method='coala', allocation='fisher'),
        svd_llm=dict(method='svd_llm', mode='sequential'),
    )
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
