"""Inversion-free numerics: R factors (one-shot, streamed) and the solver."""

from ctxlr.linalg.kstar import degenerate_bound_constant
from ctxlr.linalg.kstar import k_star
from ctxlr.linalg.kstar import error_bound
from ctxlr.linalg.kstar import gap_bound_constant
from ctxlr.linalg.kstar import solution_structure
from ctxlr.linalg.kstar import Structure
from ctxlr.linalg.qr import canonical_signs
from ctxlr.linalg.qr import fold_r
from ctxlr.linalg.qr import qr_r
from ctxlr.linalg.qr import regularize_r
from ctxlr.linalg.solvers import ctx_factors
from ctxlr.linalg.solvers import error_of_each_rank
from ctxlr.linalg.solvers import Factors
from ctxlr.linalg.solvers import layer_mu
from ctxlr.linalg.solvers import rank_for_ratio
from ctxlr.linalg.solvers import saves_parameters
from ctxlr.linalg.solvers import weighted_spectrum
from ctxlr.linalg.streaming import accumulate_r
from ctxlr.linalg.streaming import fold_padded
from ctxlr.linalg.streaming import RAccumulator
from ctxlr.linalg.tsqr import accumulate_r_sharded
from ctxlr.linalg.tsqr import combine_r
from ctxlr.linalg.tsqr import fold_sharded
from ctxlr.linalg.tsqr import reduce_r
from ctxlr.linalg.tsqr import ShardedRAccumulator
from ctxlr.linalg.tsqr import zeros_sharded
