r"""Speed: the per-layer solve and the streaming statistics, as ratios.

  OPENBLAS_NUM_THREADS=1 python launch.py \
      --config=experiments/configs/bench_solvers.py
  OPENBLAS_NUM_THREADS=1 python launch.py \
      --config=experiments/configs/bench_solvers.py:quick

(i) solve: wall time of `registry.solve` (statistics → factors) of coala
and svd_llm_v2 over svd_llm, same run, per (d_in, d_out); (ii) profile: the
same solves cut into their kernels; (iii) stream: the cost per token of
folding a block into R (`R ← qr_r([R; X_b])`) over adding `X_bᵀX_b` to the
Gram, with LAPACK's structured fold (`stpqrt`) and the QR of the block alone
beside it. Each part runs in a child process pinned to one core with one
LAPACK thread (on a GPU: `--config.platform=gpu`, no pinning). Medians of
>= `repeats` calls after a warm-up. Results and timings:
docs/results/bench_solvers/.
A rerun with `--config.parts` redoes those parts and keeps the others.
"""

import ml_collections


def get_config(arg=None):
  """solve, profile and stream on CPU, one pinned core, medians of >= 5
  calls. Writes results.json (a rerun with --config.parts redoes those
  parts, keeps the others), summary.md and bench_solvers.png. `quick`:
  64-wide shapes, under a minute.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'bench_solvers'  # experiments/bench_solvers.py
  config.seed = 0
  config.parts = ('solve', 'profile', 'stream')
  config.platform = 'cpu'  # 'cpu': pinned to one core; or gpu
  config.repeats = 5  # timings: median of >= 5 calls
  config.min_seconds = 0.0  # ... and of >= this much time
  config.timeout_s = 3600  # per child process
  config.blas_threads = 1  # OPENBLAS_NUM_THREADS of children
  config.solve = dict(
      shapes=(
          (576, 576),
          (576, 1536),
          (1536, 576),
          (2048, 2048),
          (4096, 4096),
      ),  # (d_in, d_out)
      methods=('coala', 'svd_llm', 'svd_llm_v2'),
      baseline='svd_llm',
      ratio=0.8,  # rank = rank_for_ratio(…, 0.8)
      rows_per_d=2,
  )  # X: rows_per_d · d_in tokens
  config.profile = dict(shapes=((576, 1536), (1536, 576), (2048, 2048)))
  config.stream = dict(
      d=(576, 1536),
      block_rows=(1024, 4096),
      tpqrt_nb=64,  # LAPACK stpqrt block size
      # The default model's distinct projection inputs: (width, count); 30
      # layers × (q/k/v, o_proj, gate/up at 576; down_proj at 1536).
      model_inputs=((576, 90), (1536, 30)),
      model_tokens=8192,
  )
  if arg == 'quick':  # < 1 min: run by a test
    config.timeout_s = 300
    config.solve.update(shapes=((64, 64), (64, 128)))
    config.profile.shapes = ((64, 128),)
    config.stream.update(
        d=(64,), block_rows=(64, 256), model_inputs=((64, 2),), model_tokens=512
    )
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
