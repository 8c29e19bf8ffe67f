r"""Pipeline throughput: forward floor, evaluation, calibration, solve.

  python launch.py --config=experiments/configs/bench_pipeline.py
  python launch.py --config=experiments/configs/bench_pipeline.py:quick

Tokens/s of the plain forward pass, perplexity evaluation and calibration
(R only, Gram only, both) at the same batch shape; the 210-layer solve
against back-to-back LAPACK SVDs; one fold against the Gram update; cost and
peak RSS vs calibration tokens; 2-process weak scaling. Ratios are measured
in the same run; results in docs/results/bench_pipeline/.
"""

import ml_collections


def get_config(arg=None):
  """The benchmark; 'quick' is a CI-sized run (two blocks, few tokens).

  Writes results.json (a rerun skips finished parts), summary.md and
  bench_pipeline.png to the workdir.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'bench_pipeline'
  config.parts = ('throughput', 'solve', 'fold', 'scaling', 'processes')
  config.num_layers = 0  # 0: every block of the default model
  config.include = ('*_proj',)
  config.seq_len = 512
  config.batch_size = 4  # the evaluation and calibration batch
  config.calib_tokens = 8192
  config.ratio = 0.8
  config.repeats = 3
  config.fold_widths = (576, 1536)  # the default model's distinct d_in
  config.scaling_tokens = (8192, 32768, 131072)
  config.timeout_s = 3600
  # Another run's workdir (the same parts on other BLAS kernels, say): its
  # results are kept and its headline ratios shown beside this run's.
  config.compare_with = ''
  if arg == 'quick':
    config.parts = ('throughput', 'solve', 'fold', 'scaling')
    config.num_layers = 1
    config.seq_len = 64
    config.batch_size = 2
    config.calib_tokens = 256
    config.repeats = 2
    config.fold_widths = (64,)
    config.scaling_tokens = (256, 512)
    config.timeout_s = 600
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
