"""ctxlr: inversion-free context-aware low-rank approximation in JAX.

    r = ctxlr.qr_r(x)                         # or fold_r over blocks
    f = ctxlr.ctx_factors(kernel, r, rank=8)  # minimises ||X(K - a b)||_F
"""
from ctxlr.pipeline import compress
from ctxlr.linalg import canonical_signs
from ctxlr.linalg import ctx_factors
from ctxlr.linalg import error_of_each_rank
from ctxlr.linalg import Factors
from ctxlr.linalg import layer_mu
from ctxlr.linalg import fold_r
from ctxlr.linalg import qr_r
from ctxlr.linalg import rank_for_ratio
from ctxlr.linalg import regularize_r
from ctxlr.linalg import saves_parameters

__version__ = '0.1.0'
