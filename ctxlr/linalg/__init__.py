"""Inversion-free numerics: R factors (one-shot, streamed) and the solver."""
from ctxlr.linalg.desired import degenerate_bound_constant
from ctxlr.linalg.desired import desired_solution
from ctxlr.linalg.desired import error_bound
from ctxlr.linalg.desired import gap_bound_constant
from ctxlr.linalg.desired import solution_structure
from ctxlr.linalg.desired import Structure
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
