r"""The main job: compress the default model end to end.

  python launch.py --config=experiments/configs/compress.py
  python launch.py --config=experiments/configs/compress.py:quick   # < 2 min
  python launch.py --config=experiments/configs/compress.py \
      --config.ratio=0.6 --config.method=svd_llm --config.mode=sequential

Calibrates on Wikipedia's calibration split, solves every attention and MLP
projection, swaps in factored layers, and reports perplexity on the held-out
Wikipedia and State-of-the-Union sets, time per phase and per-layer errors.
The compressed model is saved with orbax and its factors as safetensors.
"""
import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.experiment = 'compress'
  config.model = dict(path='', param_dtype='float32')   # '': bundled SmolLM2
  config.calib = dict(corpus='wikipedia', num_tokens=8192, seq_len=512,
                      batch_size=4)
  config.eval = dict(corpora=('wikipedia', 'sotu'), num_tokens=8192,
                     seq_len=512, batch_size=4)
  config.ratio = 0.8             # kept fraction of the projections' parameters
  config.method = 'coala'        # or svd, asvd, svd_llm, svd_llm_eps, ...
  config.mu = 0.0                # μ₀ of the layer-scaled ridge (ctxlr)
  config.mu_rule = 'energy'      # or 'error_ratio' (docs/method.md §4)
  # μ₀ of the ridge for layers whose calibration rank is below their rank
  # (0: off). From the 64-token calibration sweep at kept ratio 0.8
  # (Wikipedia / SOTU perplexity): μ₀ = 1e-4 2,583 / 3,613, 1e-3 2,645 /
  # 3,738, 1e-2 2,635 / 3,780, 0.1 6,229 / 12,924, μ = 0 4,583 / 3,907; at
  # 128 tokens (2,048 eval tokens) 1e-4 869 / 1,512, 1e-2 1,033 / 2,025,
  # μ = 0 8,080 / 22,919. With the default 8,192 tokens no layer is short,
  # so it changes nothing here.
  config.auto_mu = 1e-4
  config.allocation = 'uniform'  # or 'global'
  config.mode = 'one_shot'       # or 'sequential'
  config.include = ('*_proj',)   # attention and MLP projections
  config.exclude = ()
  config.data_parallel = True    # split calibration over all devices (if >1)
  config.save = True             # orbax checkpoint + safetensors factors
  if arg == 'quick':             # a CI-sized run: one block, few tokens
    config.calib = dict(corpus='wikipedia', num_tokens=256, seq_len=64,
                        batch_size=2)
    config.eval = dict(corpora=('wikipedia', 'sotu'), num_tokens=128,
                       seq_len=64, batch_size=2)
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
