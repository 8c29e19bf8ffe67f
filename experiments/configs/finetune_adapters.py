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
A method 'name:balanced' is the same initialisation re-split as PiSSA splits
its factors (`adapters.balance`: same product and K_res). Finished methods are kept in results.json; a killed method resumes from its
last orbax checkpoint.

Sized for 2 CPU cores: one method took about 7 minutes (80 steps of 2 × 128
tokens at 4.1–4.4 s, four evaluations) on 2 cores shared with other jobs,
with OPENBLAS_NUM_THREADS=1 (LAPACK's QR in calibration is ~30x slower when
OpenBLAS threads compete for the cores). `:gpu` runs more steps, longer
batches and three seeds.
"""
import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.experiment = 'finetune_adapters'
  config.model = dict(path='', param_dtype='float32', num_layers=0)  # 0: all
  # 'name:balanced': the same init re-split as P √D, √D Qᵀ (PiSSA's split).
  config.methods = ('lora', 'pissa', 'milora', 'corda', 'coala', 'coala_kpa',
                    'coala:balanced', 'coala_kpa:balanced')
  config.rank = 8
  config.scaling = 1.0              # LoRA alpha / rank (alpha = rank)
  config.include = ('*_proj',)      # every attention and MLP projection
  config.exclude = ()
  config.task = 'sotu'              # trained on its calib split
  config.general = 'wikipedia'      # coala_kpa's general data; forgetting
  config.seq_len = 128
  config.init = dict(num_sequences=32, batch_size=4)   # 4,096 tokens
  config.train = dict(steps=80, batch_size=2, learning_rate=2e-4,
                      warmup_steps=8, clip_norm=1.0, weight_decay=0.0,
                      eval_every=20, checkpoint_every=20)
  config.eval = dict(corpora=('sotu', 'wikipedia'), num_tokens=2048,
                     seq_len=128, batch_size=4)
  config.seeds = (0,)               # lora's init and the order of batches
  if arg == 'quick':                # CPU test size: 2 blocks, a few steps
    config.model.num_layers = 2
    config.methods = ('lora', 'coala', 'coala_kpa:balanced')
    config.include = ('layers.1.attn.*',)
    config.seq_len = 32
    config.init = dict(num_sequences=8, batch_size=4)
    config.train = dict(steps=4, batch_size=2, learning_rate=1e-3,
                        warmup_steps=1, clip_norm=1.0, weight_decay=0.0,
                        eval_every=2, checkpoint_every=2)
    config.eval = dict(corpora=('sotu', 'wikipedia'), num_tokens=64,
                       seq_len=32, batch_size=2)
  elif arg == 'gpu':                # where an accelerator is lent
    config.seq_len = 256
    config.init = dict(num_sequences=64, batch_size=8)
    config.train = dict(steps=400, batch_size=8, learning_rate=2e-4,
                        warmup_steps=20, clip_norm=1.0, weight_decay=0.0,
                        eval_every=50, checkpoint_every=50)
    config.eval = dict(corpora=('sotu', 'wikipedia'), num_tokens=16384,
                       seq_len=256, batch_size=16)
    config.seeds = (0, 1, 2)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick", "gpu" '
                     'or none.')
  return config
