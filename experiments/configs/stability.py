r"""Nearly singular activations: every method against the float64 optimum.

  OPENBLAS_NUM_THREADS=1 python launch.py \
      --config=experiments/configs/stability.py
  OPENBLAS_NUM_THREADS=1 python launch.py \
      --config=experiments/configs/stability.py:quick
  OPENBLAS_NUM_THREADS=1 python launch.py \
      --config=experiments/configs/stability.py \
      --config.parts='("real_all",)'            # one part; the others kept

Three parts (experiments/stability.py), each kept in results.json so that a
rerun skips the parts (and the real layers) already done with the same
settings:

* synthetic: X with controlled singular values (cond(X) = 1 … 1e10, and an
  exactly rank-deficient X), d_in ∈ {256, 1024}, n ∈ {d_in/2, 4 d_in}, K
  Gaussian d_in × d_in; every method in float32 (coala also with the kernel
  stored in bf16) over ranks up to d_in.
* real_layer: one early attention projection of the default model
  (layers.1.attn.q_proj), the same measurement on its real inputs (the
  paper's Figure 1).
* real_all: all 210 projections at the uniform-0.8 rank and at
  0.95 and 0.99 · min(d_in, d_out).

Run with OPENBLAS_NUM_THREADS=1 on shared cores. Results and timings:
docs/results/stability/.
"""

import ml_collections

from ctxlr import registry


def get_config(arg=None):
  """All three parts, every registered method but the float64 reference;
  writes results.json (each part as it finishes; a rerun skips parts with
  unchanged settings, real_all resumes by layer group), summary.md and four
  figures. `quick` (about a minute): small shapes, two layers of block 0.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'stability'  # experiments/stability.py
  config.seed = 0
  config.parts = ('synthetic', 'real_layer', 'real_all')
  config.methods = tuple(registry.names(float64=False))
  config.bf16 = True  # also 'coala_bf16': K in bf16
  config.synthetic = dict(
      shapes=((256, 128), (256, 1024), (1024, 512), (1024, 4096)),  # (d, n)
      conds=(1.0, 1e2, 1e4, 1e6, 1e8, 1e10),  # cond(X), log-spaced σ
      # One more X per shape with n >= d: rank = this fraction of d (cond 1e2
      # among its non-zero σ, exact zeros after); 0 turns it off.
      rank_deficient=0.75,
      rank_fractions=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 1.0),
  )
  config.model = dict(path='', param_dtype='float32')  # '': bundled SmolLM2
  config.calib = dict(
      corpus='wikipedia', num_tokens=4096, seq_len=512, batch_size=4
  )
  config.real = dict(
      layer='layers.1.attn.q_proj',  # real_layer: the Figure-1 layer
      layer_rank_fractions=(
          0.05,
          0.1,
          0.2,
          0.3,
          0.4,
          0.5,
          0.6,
          0.7,
          0.8,
          0.9,
          0.95,
          0.99,
          1.0,
      ),  # of min(d_in, d_out)
      include=('*_proj',),  # real_all: these projections
      exclude=(),
      ratio=0.8,  # real_all: uniform-ratio rank
      high_fractions=(0.95, 0.99),  # real_all: × min(d_in, d_out)
      loss_tol=0.01,
  )  # "lost > 1% of the optimum"
  if arg == 'quick':  # about a minute: run by a test
    config.synthetic = dict(
        shapes=((32, 16), (32, 128)),
        conds=(1.0, 1e8),
        rank_deficient=0.75,
        rank_fractions=(0.25, 0.5, 0.95, 1.0),
    )
    config.calib = dict(
        corpus='wikipedia', num_tokens=1024, seq_len=256, batch_size=4
    )
    config.real.update(
        layer='layers.0.attn.o_proj',
        layer_rank_fractions=(0.5, 0.95),
        include=('layers.0.attn.[ko]_proj',),
    )
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
