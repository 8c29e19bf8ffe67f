"""ctxlr: inversion-free context-aware low-rank approximation in JAX.

    r = ctxlr.qr_r(x)                         # or fold_r over blocks
    f = ctxlr.ctx_factors(kernel, r, rank=8)  # minimises ||X(K - a b)||_F
    report = ctxlr.compress(model, batches, ratio=0.8)   # an NNX model

`import ctxlr` loads the user-facing modules too: `ctxlr.registry` (the
methods), `ctxlr.baselines`, `ctxlr.calibration`, `ctxlr.pipeline`,
`ctxlr.surgery`, `ctxlr.checkpoint`, `ctxlr.adapters`, `ctxlr.training`,
`ctxlr.models`, `ctxlr.data`, `ctxlr.evaluation`. The names in `__all__` and
those modules' public functions are the stable API; underscore names and
`*_unchecked` kernels are internal.
"""

from ctxlr import adapters
from ctxlr import baselines
from ctxlr import calibration
from ctxlr import checkpoint
from ctxlr import data
from ctxlr import evaluation
from ctxlr import methods
from ctxlr import models
from ctxlr import pipeline
from ctxlr import registry
from ctxlr import surgery
from ctxlr import training
from ctxlr.linalg import accumulate_r
from ctxlr.linalg import ctx_factors
from ctxlr.linalg import error_of_each_rank
from ctxlr.linalg import Factors
from ctxlr.linalg import fold_r
from ctxlr.linalg import k_star
from ctxlr.linalg import layer_mu
from ctxlr.linalg import qr_r
from ctxlr.linalg import rank_for_ratio
from ctxlr.linalg import regularize_r
from ctxlr.pipeline import compress
from ctxlr.pipeline import compress_from_stats
from ctxlr.stats import LayerStats
from ctxlr.stats import stats_from_x

__all__ = [
    'LayerStats',
    'Factors',
    'accumulate_r',
    'compress',
    'compress_from_stats',
    'ctx_factors',
    'error_of_each_rank',
    'fold_r',
    'k_star',
    'layer_mu',
    'qr_r',
    'rank_for_ratio',
    'regularize_r',
    'stats_from_x',
    # modules
    'adapters',
    'baselines',
    'calibration',
    'checkpoint',
    'data',
    'evaluation',
    'methods',
    'models',
    'pipeline',
    'registry',
    'surgery',
    'training',
]

__version__ = '0.1.0'
