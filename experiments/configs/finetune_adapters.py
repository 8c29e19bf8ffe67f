r"""Adapter initialisations compared on one fine-tuning task (rank 8).

  python launch.py --config=experiments/configs/finetune_adapters.py
  python launch.py --config=experiments/configs/finetune_adapters.py:quick
  python launch.py --config=experiments/configs/finetune_adapters.py:gpu

Adapts the default model (SmolLM2-135M) to State of the Union speeches:
rank-8 adapters on every attention and MLP projection, initialised by each
method from the first `init.num_sequences` sequences of the SOTU training
(calib) split (coala_kpa: from as many Wikipedia calib sequences), then
trained with the same steps, batches, schedule and seed. Held-out SOTU
perplexity measures learning, held-out Wikipedia perplexity forgetting.
A variant with split='balanced' is the same initialisation re-split as PiSSA
splits its factors (`adapters.balance`: same product and K_res). Run with
OPENBLAS_NUM_THREADS=1 on shared CPU cores. Results and timings:
docs/results/finetune_adapters/.
"""

import ml_collections

from experiments import configs


def get_config(arg=None):
  """Every adapter initialisation (and two balanced splits), 80 steps each;
  writes results.json (a finished run and seed is kept and skipped on a
  rerun; a killed one resumes from its checkpoint), summary.md and
  finetune_curves.png. `quick`: 2 blocks, 4 steps; `gpu`: 400 steps, 3 seeds.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'finetune_adapters'
  config.model = dict(path='', param_dtype='float32', num_layers=0)  # 0: all
  # {label: variant} (experiments/common.py, check_variants); keys: method
  # (an initialisation of ctxlr.adapters.METHODS) and split ('own', or
  # 'balanced': re-split as P √D, √D Qᵀ, PiSSA's split).
  config.runs = configs.variants(
      lora=dict(method='lora'),
      pissa=dict(method='pissa'),
      milora=dict(method='milora'),
      corda=dict(method='corda'),
      coala=dict(method='coala'),
      coala_kpa=dict(method='coala_kpa'),
      coala_balanced=dict(method='coala', split='balanced'),
      coala_kpa_balanced=dict(method='coala_kpa', split='balanced'),
  )
  config.rank = 8
  config.scaling = 1.0  # LoRA alpha / rank (alpha = rank)
  config.include = ('*_proj',)  # every attention and MLP projection
  config.exclude = ()
  config.task = 'sotu'  # trained on its calib split
  config.general = 'wikipedia'  # coala_kpa's general data; forgetting
  config.seq_len = 128
  config.init = dict(num_sequences=32, batch_size=4)  # 4,096 tokens
  config.train = configs.train(
      steps=80, batch_size=2, learning_rate=2e-4, warmup_steps=8, eval_every=20
  )
  config.eval = dict(
      corpora=('sotu', 'wikipedia'), num_tokens=2048, seq_len=128, batch_size=4
  )
  config.seeds = (0,)  # lora's init and the order of batches
  if arg == 'quick':  # CPU test size: 2 blocks, a few steps
    config.model.num_layers = 2
    config.runs = configs.variants(
        lora=dict(method='lora'),
        coala=dict(method='coala'),
        coala_kpa_balanced=dict(method='coala_kpa', split='balanced'),
    )
    config.include = ('layers.1.attn.*',)
    config.seq_len = 32
    config.init = dict(num_sequences=8, batch_size=4)
    config.train = configs.train(
        steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1, eval_every=2
    )
    config.eval = dict(
        corpora=('sotu', 'wikipedia'), num_tokens=64, seq_len=32, batch_size=2
    )
  elif arg == 'gpu':  # where an accelerator is lent
    config.seq_len = 256
    config.init = dict(num_sequences=64, batch_size=8)
    config.train = configs.train(
        steps=400,
        batch_size=8,
        learning_rate=2e-4,
        warmup_steps=20,
        eval_every=50,
    )
    config.eval = dict(
        corpora=('sotu', 'wikipedia'),
        num_tokens=16384,
        seq_len=256,
        batch_size=16,
    )
    config.seeds = (0, 1, 2)
  elif arg:
    raise ValueError(
        f'Unknown config arg {arg!r}; expected "quick", "gpu" ' 'or none.'
    )
  return config
