"""ctxlr's own methods: the inversion-free solver and the float64 K_*.

Both are registered in `ctxlr.registry` next to the peers of
`ctxlr.baselines`, and run through the same pipeline on the same data.

`coala` takes one option, the weighting `power` p (docs/method.md §2): the
right projection `K V_r V_rᵀ` with V the right singular vectors of
`(XᵀX)^p K`, computed from R without a Gram matrix or an inverse as the SVD
of `Σ_R^{2p} V_Rᵀ K` (`R = U_R Σ_R V_Rᵀ`). p = ½ is `R K`, the exact
minimiser of (P); p = 1 is `XᵀX K = Rᵀ(R K)`, CorDA's weighting.
"""

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ctxlr import registry
from ctxlr import stats as stats_lib
from ctxlr.linalg import checks
from ctxlr.linalg import kstar
from ctxlr.linalg import qr
from ctxlr.linalg import solvers

EXACT_POWER = 0.5  # the weighting power of the objective (P) itself


def check_power(power: Any) -> None:
  """Raises ValueError unless `power` is a finite number > 0."""
  if (
      isinstance(power, (bool, np.bool_))
      or not isinstance(power, (int, float, np.integer, np.floating))
      or not (math.isfinite(power) and power > 0)
  ):
    raise ValueError(
        f'power: the weighting power must be a finite number '
        f'> 0 (0.5: the exact objective, 1: CorDA); got '
        f'{power!r}.'
    )


def _check_coala_options(options: Mapping[str, Any]) -> None:
  if 'power' in options:
    check_power(options['power'])


@jax.jit
def _power_full(
    kernel: jax.Array, r: jax.Array, power: jax.Array
) -> tuple[solvers.Factors, jax.Array]:
  hi = jax.lax.Precision.HIGHEST
  dtype = checks.compute_dtype(kernel.dtype, r.dtype)
  k = kernel.astype(dtype)
  _, s_r, vt_r = jnp.linalg.svd(r.astype(dtype), full_matrices=False)
  scale = jnp.power(s_r, 2 * power.astype(dtype))  # Σ_R^{2p}
  m = scale[:, None] * jnp.matmul(vt_r, k, precision=hi)  # f[p, d_out]
  _, sigma, vt = jnp.linalg.svd(m, full_matrices=False)  # f[p, d_out]
  rk = jnp.matmul(r.astype(dtype), k, precision=hi)
  gains = jnp.sum(jnp.square(jnp.matmul(rk, vt.T, precision=hi)), axis=0)
  a = jnp.matmul(k, vt.T, precision=hi)
  return (
      solvers.Factors(a.astype(kernel.dtype), vt.astype(kernel.dtype), sigma),
      gains,
  )


def power_factors(
    kernel: jax.Array, r: jax.Array, *, rank: int, power: float
) -> solvers.Factors:
  """Rank-`rank` projection of K weighted by `(XᵀX)^power`, from R.

  V are the right singular vectors of `Σ_R^{2p} V_Rᵀ K` (the same as those
  of `(RᵀR)^p K = V_R Σ_R^{2p} V_Rᵀ K`, one orthogonal factor removed); the
  factors are `a = K V_r`, `b = V_rᵀ`, as `solvers.ctx_factors`. Only SVDs
  and products: no Gram matrix, no inverse.

  Args:
    kernel: K, float[d_in, d_out].
    r: R of X (any float[m, d_in] with the same Gram, e.g. `regularize_r`).
    rank: 1 <= rank <= min(d_in, d_out).
    power: p > 0; 0.5 gives `ctx_factors` (same subspace), 1 CorDA's.

  Returns:
    Factors(a, b, sigma = σ(Σ_R^{2p} V_Rᵀ K)).
  """
  return power_gains(kernel, r, rank=rank, power=power)[0]


def power_gains(
    kernel: jax.Array, r: jax.Array, *, rank: int, power: float
) -> tuple[solvers.Factors, jax.Array]:
  """`power_factors` and the exact error curve of its directions in (P).

  `gains[i] = ||R K v_i||²`: the squared weighted error `||X(K − K_k)||²`
  of the rank-k projection onto the first k directions is
  `||R K||² − Σ_{i<k} gains[i]` (the projections are orthogonal), for every
  k from one SVD. For power ½ the gains are σ(R K)².
  """
  checks.check_matrix('kernel', kernel)
  checks.check_matrix('r', r, cols=kernel.shape[0])
  checks.check_rank(rank, *kernel.shape)
  checks.check_finite('kernel', kernel)
  checks.check_finite('r', r)
  check_power(power)
  full, gains = _power_full(
      jnp.asarray(kernel), jnp.asarray(r), jnp.asarray(power, jnp.float32)
  )
  return solvers.truncate(full, rank), gains


@registry.register(
    needs=('r',),
    takes_mu=True,
    nested=True,
    options=dict(power=EXACT_POWER),
    check=_check_coala_options,
    summary='inversion-free: SVD of R K (QR of X), ridge μ',
)
def coala(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
    power: float = EXACT_POWER,
) -> tuple[solvers.Factors, registry.SolveInfo]:
  """The inversion-free solver: `regularize_r` if μ > 0, then `ctx_factors`.

  Minimises `||X(K − K')||² + μ||K − K'||²` over rank-`rank` K' from R alone
  (docs/method.md §2, §4). No retries, no jitter: SolveInfo is all
  zero/False unless the factors are non-finite. Needs `stats.r`.

  With `power` p other than ½ the subspace comes from the SVD of
  `Σ_{R_μ}^{2p} V_{R_μ}ᵀ K` instead (`power_factors`): p = 1 is CorDA's
  weighting `(XᵀX + μ I) K`, without its inverse. That is no longer the
  minimiser of (P); it trades the layer objective for directions weighted
  more towards the dominant input directions.
  """
  r = stats.r if float(mu) == 0.0 else qr.regularize_r(stats.r, mu)
  if float(power) == EXACT_POWER:
    factors = solvers.ctx_factors(kernel, r, rank=rank)
  else:
    factors = power_factors(kernel, r, rank=rank, power=power)
  return factors, registry.solve_info(factors)


@registry.register(
    needs=('r',),
    float64=True,
    summary='reference K_*: the minimiser closest to K, float64',
)
def k_star(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
) -> tuple[solvers.Factors, registry.SolveInfo]:
  """The reference K_* (`ctxlr.linalg.kstar.k_star`), in float64 from R.

  The limit of the regularized solve as μ → 0 (docs/method.md §5): the
  minimiser of (P) closest to K. A reference for experiments, not a method
  one would ship (float64 SVDs); give it float64 statistics
  (`compress(stats_dtype=jnp.float64)`) where spectra are nearly tied.
  """
  del mu  # takes_mu=False: checked to be 0
  with jax.enable_x64(True):
    f = kstar.k_star(
        np.asarray(kernel, np.float64), np.asarray(stats.r), rank=rank
    )
    a, b = np.asarray(f.a), np.asarray(f.b)
  factors = solvers.Factors(
      jnp.asarray(a, kernel.dtype),
      jnp.asarray(b, kernel.dtype),
      jnp.asarray(np.asarray(f.sigma), jnp.float32),
  )
  return factors, registry.solve_info(factors)
