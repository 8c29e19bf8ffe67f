r"""Perplexity, time and memory against calibration size, from one stream.

  python launch.py --config=experiments/configs/calibration_curve.py
  python launch.py --config=experiments/configs/calibration_curve.py:quick

The main job's pipeline (coala, 'fisher' ranks, the Wikipedia + State of the
Union calibration mixture) at kept ratio 0.8, calibrated on 8,192 …
262,144 tokens read as one stream. Results: docs/results/calibration_curve/.
"""

import ml_collections

from experiments import configs


def get_config(arg=None):
  """The curve: 8,192 … 262,144 calibration tokens (doubling), one run.

  Writes results.json (rows and per-chunk seconds and peak RSS, kept as they
  finish: a rerun continues the stream), summary.md and
  calibration_curve.png. `quick`: one block, 128 and 256 tokens.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'calibration_curve'
  config.model = dict(path='', param_dtype='float32')
  config.calib = dict(
      corpus='',
      mixture='wikipedia:1,sotu:1',
      seq_len=512,
      batch_size=4,
  )
  config.num_tokens = (8192, 16384, 32768, 65536, 131072, 262144)
  # Loss sensitivities (for 'fisher') from the stream's first tokens, the
  # same for every size.
  config.sensitivity_tokens = 8192
  config.eval = dict(
      corpora=('wikipedia', 'sotu'), num_tokens=4096, seq_len=512, batch_size=4
  )
  config.ratio = 0.8
  config.runs = configs.variants(
      recommended=dict(method='coala', allocation='fisher')
  )
  config.include = ('*_proj',)
  config.exclude = ()
  if arg == 'quick':
    config.calib = dict(
        corpus='',
        mixture='wikipedia:1,sotu:1',
        seq_len=64,
        batch_size=2,
    )
    config.num_tokens = (128, 256)
    config.sensitivity_tokens = 128
    config.eval = dict(
        corpora=('wikipedia',), num_tokens=128, seq_len=64, batch_size=2
    )
    config.include = ('layers.0.*',)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
