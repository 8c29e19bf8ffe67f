r"""Healing compressed models: train the factors a, b for a small budget.

  python launch.py --config=experiments/configs/heal.py
  python launch.py --config=experiments/configs/heal.py:quick

Compresses the default model at kept ratio 0.6 from one set of Wikipedia
calibration statistics with coala and with svd_llm (the same projection in
exact arithmetic, split differently into a and b; `coala_balanced` re-splits
coala's factors as `P √D`, `√D Qᵀ`, `adapters.balance`), then trains only the
factors `a`, `b` of every factored layer (everything else frozen) on
Wikipedia calib-split sequences that follow the calibration ones, with the
same steps and schedule, and reports the held-out perplexity recovered.
Per run label the rates of `learning_rates` run on the first seed, the one
with the lowest validation perplexity (Wikipedia calib-split sequences after
the training ones) is chosen and the other seeds (the order of the training
batches) run at it; the summary gives mean ± std over seeds. Run with OPENBLAS_NUM_THREADS=1 on shared CPU cores. Results and
timings: docs/results/heal/.
"""

import ml_collections

from experiments import configs


def get_config(arg=None):
  """coala and svd_llm at kept ratio 0.6, 60 steps each: a 3-rate grid on
  seed 0, seeds 1 and 2 at the chosen rate (add coala_balanced with
  --config.runs.coala_balanced.method=coala
  --config.runs.coala_balanced.split=balanced). Writes results.json (a
  finished run is kept: a rerun skips it; a killed one resumes from its
  orbax checkpoint), summary.md and heal_curves.png. `quick`: two blocks,
  two runs, two rates, two seeds, four steps.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'heal'
  config.model = dict(path='', param_dtype='float32', num_layers=0)  # 0: all
  config.calib = dict(
      corpus='wikipedia', num_tokens=8192, seq_len=512, batch_size=4
  )
  config.eval = dict(
      corpora=('wikipedia', 'sotu'), num_tokens=2048, seq_len=512, batch_size=4
  )
  config.ratio = 0.6
  # {label: variant} (experiments/common.py, check_variants); keys: method,
  # split ('own', or 'balanced': the factors re-split as P √D, √D Qᵀ, same
  # products), allocation, mu, mu_rule, auto_mu.
  config.runs = configs.variants(
      coala=dict(method='coala'),
      svd_llm=dict(method='svd_llm'),
  )
  config.include = ('*_proj',)
  config.exclude = ()
  config.seq_len = 128  # training sequences
  config.train = configs.train(
      steps=60, batch_size=2, learning_rate=1e-4, warmup_steps=6, eval_every=20
  )  # learning_rate: unused, the grid below sets it
  config.learning_rates = (5e-5, 1e-4, 2e-4)  # grid on seeds[0]
  config.seeds = (0, 1, 2)  # the order of the training batches
  # Validation (rate choice): the calib-split tokens after the training ones.
  config.val = dict(num_tokens=1024, batch_size=4)
  if arg == 'quick':  # CPU test size: 2 blocks, a few steps
    config.model.num_layers = 2
    config.runs = configs.variants(
        coala=dict(method='coala'),
        coala_balanced=dict(method='coala', split='balanced'),
    )
    config.calib = dict(
        corpus='wikipedia', num_tokens=256, seq_len=64, batch_size=2
    )
    config.eval = dict(
        corpora=('wikipedia',), num_tokens=64, seq_len=32, batch_size=2
    )
    config.include = ('layers.1.attn.[qo]_proj',)
    config.seq_len = 32
    config.train = configs.train(
        steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1, eval_every=2
    )
    config.learning_rates = (1e-3, 2e-3)
    config.seeds = (0, 1)
    config.val = dict(num_tokens=64, batch_size=2)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
