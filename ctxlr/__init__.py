"""coala: inversion-free context-aware low-rank approximation in JAX.

    r = ctxlr.qr_r(x)                         # or fold_r over blocks
    f = ctxlr.ctx_factors(kernel, r, rank=8)  # minimises ||X(K - a b)||_F
    report = ctxlr.compress(model, batches, ratio=0.8)   # an NNX model
"""
from ctxlr.linalg import accumulate_r
from ctxlr.linalg import canonical_signs
from ctxlr.linalg import ctx_factors
from ctxlr.linalg import k_star
from ctxlr.linalg import error_bound
from ctxlr.linalg import error_of_each_rank
from ctxlr.linalg import Factors
from ctxlr.linalg import fold_r
from ctxlr.linalg import layer_mu
from ctxlr.linalg import qr_r
from ctxlr.linalg import rank_for_ratio
from ctxlr.linalg import regularize_r
from ctxlr.linalg import saves_parameters
from ctxlr.linalg import weighted_spectrum
from ctxlr.pipeline import compress

__version__ = '0.1.0'
