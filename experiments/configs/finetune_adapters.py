r"""Adapter initialisations from few examples (rank 8), over seeds and rates.

  python launch.py --config=experiments/configs/finetune_adapters.py
  python launch.py --config=experiments/configs/finetune_adapters.py \
      --config.init.num_examples=96 --config.lr_from_examples=24 \
      --config.only="('coala_balanced',)"
  python launch.py --config=experiments/configs/finetune_adapters.py \
      --config.only="('coala_balanced',)" --config.sweep.examples="(8, 96)"
  python launch.py --config=experiments/configs/finetune_adapters.py:quick

Adapts the default model (SmolLM2-135M) to State of the Union speeches:
rank-8 adapters on every attention and MLP projection, initialised by each
method from `init.num_examples` examples of `init.seq_len` tokens of the
SOTU training (calib) split (coala_kpa: as many Wikipedia examples), so
that with 24 examples of 32 tokens (768 tokens) the MLP down projections
(d_in 1536) are short of data and with 8 every layer is. Then AdamW on the
same steps and schedule for every run; the seed fixes the order of the
batches and LoRA's random init. For each run label the rates of
`learning_rates` run on the first seed and the one with the lowest
validation SOTU perplexity (calib-split sequences that neither the init nor
training reads) is chosen; the other seeds run at it. Held-out (test) SOTU
perplexity measures learning, held-out Wikipedia perplexity forgetting.
`split='balanced'` re-splits an init as PiSSA splits its factors
(`adapters.balance`: same product and K_res). Run with
OPENBLAS_NUM_THREADS=1 on shared CPU cores. Results and timings:
docs/results/finetune_adapters/.
"""

import ml_collections

from experiments import configs


def get_config(arg=None):
  """Every adapter initialisation, the regularized coala inits among them,
  from 24 init examples: a 3-rate grid on seed 0, then seeds 1 and 2 at the
  chosen rate, 40 steps each. Writes results.json (a finished run is kept
  and skipped on a rerun; a killed one resumes from its checkpoint),
  summary.md, finetune_curves.png and examples_sweep.png. `only` picks run
  labels for one launch; `init.num_examples` with `lr_from_examples` adds a
  point of the example sweep at the rates chosen there, `sweep.examples`
  adds points after this launch's count at its rates. `quick`: 2 blocks,
  4 steps.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'finetune_adapters'
  config.model = dict(path='', param_dtype='float32', num_layers=0)  # 0: all
  # {label: variant} (experiments/common.py, check_variants); keys: method
  # (an initialisation of ctxlr.adapters.METHODS), split ('own', or
  # 'balanced': re-split as P √D, √D Qᵀ, PiSSA's split), mu (coala's ridge
  # μ₀) and mu_rule ('energy' or COALA's adaptive 'error_ratio').
  config.runs = configs.variants(
      lora=dict(method='lora'),
      pissa=dict(method='pissa'),
      milora=dict(method='milora'),
      corda=dict(method='corda'),
      coala=dict(method='coala'),
      coala_balanced=dict(method='coala', split='balanced'),
      coala_kpa=dict(method='coala_kpa'),
      coala_energy_balanced=dict(
          method='coala', split='balanced', mu=1.0, mu_rule='energy'
      ),
      coala_adaptive_balanced=dict(
          method='coala', split='balanced', mu=1.0, mu_rule='error_ratio'
      ),
  )
  config.only = ()  # run labels of this launch (empty: all of config.runs)
  config.rank = 8
  config.scaling = 1.0  # LoRA alpha / rank (alpha = rank)
  config.include = ('*_proj',)  # every attention and MLP projection
  config.exclude = ()
  config.task = 'sotu'  # trained on its calib split
  config.general = 'wikipedia'  # coala_kpa's general data; forgetting
  config.seq_len = 128  # training sequences
  # Init statistics: the first num_examples examples of seq_len tokens.
  config.init = dict(num_examples=24, seq_len=32, batch_size=8)
  config.train = configs.train(
      steps=40, batch_size=2, learning_rate=3e-4, warmup_steps=4, eval_every=20
  )  # learning_rate: unused, the grid below sets it
  config.learning_rates = (1e-4, 3e-4, 1e-3)  # grid on seeds[0]
  config.lr_from_examples = 0  # > 0: reuse the rates chosen there, no grid
  # The example sweep in the same launch: after the runs above, every count
  # of `examples` for the labels of `only` (empty: the launch's), all seeds
  # at the rates chosen at init.num_examples (or lr_from_examples), no grid.
  config.sweep = dict(examples=(), only=())
  # Test: the first windows of the held-out (eval) split of each corpus.
  config.eval = dict(
      corpora=('sotu', 'wikipedia'), num_tokens=1024, seq_len=128, batch_size=8
  )
  # Validation (rate choice): calib-split sequences after skip_sequences.
  config.val = dict(
      num_tokens=1024, seq_len=128, batch_size=8, skip_sequences=200
  )
  config.seeds = (0, 1, 2)  # the order of batches and lora's init
  if arg == 'quick':  # CPU test size: 2 blocks, a few steps
    config.model.num_layers = 2
    config.runs = configs.variants(
        lora=dict(method='lora'),
        coala_energy_balanced=dict(
            method='coala', split='balanced', mu=1.0, mu_rule='energy'
        ),
        coala_kpa_balanced=dict(method='coala_kpa', split='balanced'),
    )
    config.include = ('layers.1.attn.*',)
    config.seq_len = 32
    config.init = dict(num_examples=4, seq_len=8, batch_size=4)
    config.train = configs.train(
        steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1, eval_every=2
    )
    config.learning_rates = (1e-3, 3e-3)
    config.seeds = (0, 1)
    config.eval = dict(
        corpora=('sotu', 'wikipedia'), num_tokens=64, seq_len=32, batch_size=2
    )
    config.val = dict(num_tokens=64, seq_len=32, batch_size=2, skip_sequences=8)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
