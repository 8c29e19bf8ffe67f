"""ctxlr's own methods: the inversion-free solver and the float64 K_*.

Both are registered in `ctxlr.registry` next to the peers of
`ctxlr.baselines`, and run through the same pipeline on the same data.
"""
import jax
import jax.numpy as jnp
import numpy as np

from ctxlr import registry
from ctxlr import stats as stats_lib
from ctxlr.linalg import kstar
from ctxlr.linalg import qr
from ctxlr.linalg import solvers


@registry.register(needs=('r',), takes_mu=True,
                   summary='inversion-free: SVD of R K (QR of X), ridge μ')
def coala(kernel: jax.Array, stats: stats_lib.LayerStats, *, rank: int,
          mu: float = 0.0) -> tuple[solvers.Factors, registry.SolveInfo]:
  """The inversion-free solver: `regularize_r` if μ > 0, then `ctx_factors`.

  Minimises `||X(K − K')||² + μ||K − K'||²` over rank-`rank` K' from R alone
  (docs/method.md §2, §4). No retries, no jitter: SolveInfo is all
  zero/False unless the factors are non-finite. Needs `stats.r`.
  """
  r = stats.r if float(mu) == 0.0 else qr.regularize_r(stats.r, mu)
  factors = solvers.ctx_factors(kernel, r, rank=rank)
  return factors, registry.solve_info(factors)


@registry.register(needs=('r',), float64=True,
                   summary='reference K_*: the minimiser closest to K, float64')
def k_star(kernel: jax.Array, stats: stats_lib.LayerStats, *, rank: int,
           mu: float = 0.0) -> tuple[solvers.Factors, registry.SolveInfo]:
  """The reference K_* (`ctxlr.linalg.kstar.k_star`), in float64 from R.

  The limit of the regularized solve as μ → 0 (docs/method.md §5): the
  minimiser of (P) closest to K. A reference for experiments, not a method
  one would ship (float64 SVDs); give it float64 statistics
  (`compress(stats_dtype=jnp.float64)`) where spectra are nearly tied.
  """
  del mu                                   # takes_mu=False: checked to be 0
  with jax.enable_x64(True):
    f = kstar.k_star(np.asarray(kernel, np.float64), np.asarray(stats.r),
                     rank=rank)
    a, b = np.asarray(f.a), np.asarray(f.b)
  factors = solvers.Factors(jnp.asarray(a, kernel.dtype),
                            jnp.asarray(b, kernel.dtype),
                            jnp.asarray(np.asarray(f.sigma), jnp.float32))
  return factors, registry.solve_info(factors)
