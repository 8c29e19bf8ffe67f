r"""Streaming and multi-device TSQR benchmark.

  python launch.py --config=experiments/configs/bench_tsqr.py
  python launch.py --config=experiments/configs/bench_tsqr.py:quick

(i) fold cost vs block size b = d … 16d, as a ratio to the Gram update
XᵀX of the same block; (ii) strong scaling of `tsqr` over 1, 2, 4, 8 forced
host devices; (iii) peak RSS of streaming 16k, 128k, 1M rows of d = 1536.
The full run takes several minutes on 2 CPU cores; `quick` well under one.
Results: docs/results/bench_tsqr/.
"""

import ml_collections


def get_config(arg=None):
  """fold, scaling and memory, each in a child process. Writes results.json,
  summary.md and bench_tsqr.png; no resume (a rerun measures again).
  `quick`: small widths and rows, under a minute.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'bench_tsqr'  # experiments/bench_tsqr.py
  config.seed = 0
  config.parts = ('fold', 'scaling', 'memory')  # which measurements to run
  config.repeats = 5  # timings: min over >= 5 calls
  config.min_seconds = 2.0  # ... and over >= 2 s of calls
  config.timeout_s = 3600  # per child process
  config.blas_threads = 1  # OPENBLAS_NUM_THREADS of the children
  config.fold = dict(d=1536, multiples=(1, 2, 4, 8, 16))
  config.scaling = dict(
      rows=262144, d=256, devices=(1, 2, 4, 8), combines=('tree', 'gather')
  )
  config.memory = dict(
      d=1536,
      rows=(16384, 131072, 1048576),
      gen_block=4096,
      block_size=0,  # 0: streaming.default_block_size(d)
      # glibc MALLOC_MMAP_THRESHOLD_ (bytes), 0: default
      mmap_thresholds=(0, 1 << 20),
  )
  if arg == 'quick':  # < 1 min on 2 cores: run by a test
    config.repeats, config.min_seconds, config.timeout_s = 3, 0.02, 300
    config.fold.d = 64
    config.scaling.update(rows=4096, d=32)
    config.memory.update(
        d=64, rows=(2048, 16384, 131072), gen_block=1024, mmap_thresholds=(0,)
    )
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
