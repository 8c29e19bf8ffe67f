r"""The main job: compress the default model end to end.

  python launch.py --config=experiments/configs/compress.py
  python launch.py --config=experiments/configs/compress.py:quick   # < 2 min
  python launch.py --config=experiments/configs/compress.py \
      --config.ratio=0.6 --config.method=svd_llm --config.mode=sequential

The recommended pipeline: calibrates on the Wikipedia and State-of-the-Union
calibration splits in equal shares (8,192 tokens), measures each layer's
loss sensitivity with one backward pass, spends the parameter budget where
the exact error curves say the loss gains most ('fisher'), solves every
attention and MLP projection, swaps in factored layers, and reports
perplexity on the held-out Wikipedia and State-of-the-Union sets (the same
4,096 tokens each as docs/results/compare_methods), time per phase and
per-layer errors. The compressed model is saved with orbax and its factors
as safetensors. docs/results/ablation measures each of these choices.
"""

import ml_collections


def get_config(arg=None):
  """The main job; arg 'quick' is a CI-sized run (one block, few tokens).

  Writes results.json, summary.md, layer_errors.png, model/ and
  factors.safetensors to the workdir; a rerun resumes from workdir/progress.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'compress'
  config.model = dict(path='', param_dtype='float32')  # '': bundled SmolLM2
  # mixture: 'corpus:weight,…' draws rows from each corpus's calibration
  # split by weight; to calibrate on one corpus set mixture='' and corpus
  # (setting both is an error).
  config.calib = dict(
      corpus='',
      mixture='wikipedia:1,sotu:1',
      num_tokens=8192,
      seq_len=512,
      batch_size=4,
      field='text',
  )
  config.eval = dict(
      corpora=('wikipedia', 'sotu'),
      num_tokens=4096,
      seq_len=512,
      batch_size=4,
      field='text',
  )
  config.ratio = 0.8  # kept fraction of the projections' parameters
  config.method = 'coala'  # or svd, asvd, svd_llm, svd_llm_eps, ...
  config.mu = 0.0  # μ₀ of the layer-scaled ridge (coala)
  config.mu_rule = 'energy'  # or 'error_ratio', 'cholesky' (§4)
  # μ₀ of the ridge for layers whose calibration rank is below their rank.
  # None: the method's default (1e-4 for methods that take μ, else off);
  # docs/results/calibration_sweep/ measures it.
  config.auto_mu = ml_collections.config_dict.placeholder(float)
  config.auto_mu_rule = 'energy'  # the μ rule of auto_mu
  # coala's weighting power: None = ½, the exact objective; 1 = CorDA's.
  config.power = ml_collections.config_dict.placeholder(float)
  # 'fisher' (loss-driven), 'uniform', 'global', 'svd_llm_v2', 'coala_hetero'
  config.allocation = 'fisher'
  config.mode = 'one_shot'  # or 'sequential'
  config.include = ('*_proj',)  # attention and MLP projections
  config.exclude = ()
  config.data_parallel = True  # split calibration over all devices (if >1)
  config.save = True  # orbax checkpoint + safetensors factors
  config.keep_progress = (
      False  # keep progress/ (the resume store) after success
  )
  # Optional healing: train only the factors on the calibration stream for
  # `seconds` of training and/or `steps` (whichever ends first).
  config.heal = dict(
      enabled=False,
      seconds=ml_collections.config_dict.placeholder(float),
      steps=ml_collections.config_dict.placeholder(int),
      learning_rate=1e-4,
      batch_size=2,
      seq_len=256,
      num_tokens=65536,
      warmup_fraction=0.05,
      eval_every_seconds=0.0,
  )
  if arg == 'quick':  # a CI-sized run: one block, few tokens
    config.calib = dict(
        corpus='',
        mixture='wikipedia:1,sotu:1',
        num_tokens=256,
        seq_len=64,
        batch_size=2,
        field='text',
    )
    config.eval = dict(
        corpora=('wikipedia', 'sotu'),
        num_tokens=128,
        seq_len=64,
        batch_size=2,
        field='text',
    )
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
