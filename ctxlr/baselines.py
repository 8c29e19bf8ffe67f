"""Baselines with one call shape, reproduced faithfully (docs/method.md §6).

    factors, info = registry.solve('svd_llm', kernel, stats, rank=64)

Every method takes a kernel K (`float[d_in, d_out]`, `y = x @ K`; the
papers' `W = Kᵀ`), the layer's calibration statistics (`LayerStats`) and a
rank, and returns `Factors(a, b, sigma)` with `a b ≈ K` plus a `SolveInfo`
saying how hard the method had to try. For a baseline `sigma` is the
spectrum of the matrix that method takes the SVD of (not of `R K`), so
`error_of_each_rank(sigma)` is the method's own estimate, not the error.

The baselines copy their authors' code, numerical habits included, because
those habits are what is being compared: a float32 Gram matrix `XᵀX` (which
squares the condition number of X), Cholesky factors retried with a shift or
a jitter, explicit inverses, damping. Each function's docstring cites the
file and function it reproduces. They compute in float32 as the authors do
(`.float()`), float64 only where the authors use `.double()` (inside
`jax.enable_x64(True)`), and cast the factors back to the kernel's dtype.
This is the one module of ctxlr allowed to form Gram matrices and inverses.

Failures inside a method (a Cholesky that fails even after its retries, NaN
or Inf in the factors) are reported in `SolveInfo`, never raised and never
repaired; bad arguments raise `ValueError`.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ctxlr import registry
from ctxlr import stats as stats_lib
from ctxlr.linalg import checks
from ctxlr.linalg import qr
from ctxlr.linalg import solvers

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products as torch does them
_F32 = jnp.float32
_F64 = jnp.float64
# torch.linalg.{cholesky,eigh,eigvalsh} read the lower triangle only (LAPACK
# uplo='L'); JAX would first average A and Aᵀ. Read the triangle, as torch.
_cholesky = functools.partial(jnp.linalg.cholesky, symmetrize_input=False)
_eigh = functools.partial(jnp.linalg.eigh, UPLO='L', symmetrize_input=False)
_eigvalsh = functools.partial(
    jnp.linalg.eigvalsh, UPLO='L', symmetrize_input=False
)

SVD_LLM_SHIFT = 1e-6  # SVDLLM.py: shift by −λ_min + 1e-6 on failure
JITTER_START = 1e-9  # svd_llm_eps: first absolute jitter, then doubled
JITTER_MAX_TRIES = 100  # svd_llm_eps: jitters tried before giving up
CORDA_DAMP_START = 0.01  # CorDA: damping relative to mean(diag(XᵀX))
CORDA_INV_TOL = 0.05  # CorDA: accept when ||C C⁻¹ − I||_F < 0.05
CORDA_MAX_DOUBLINGS = 64  # not in CorDA (it loops forever): our cap
ASVD_ALPHA = 0.5  # ASVD4LLM asvd.py --alpha default
ASVD_EPS = 1e-6  # ASVD4LLM svd_linear.py "avoid zero division"
ASVD_NITER = 2  # torch.svd_lowrank default, as ASVD calls it
ASVD_SEED = 0  # key of svd_lowrank's Gaussian test matrix


SolveInfo = registry.SolveInfo
_all_finite = registry.all_finite
_info = registry.solve_info


# ------------------------------------------------------- shared numerics ---


def _scaled_svd_factors(
    kernel: jax.Array, s: jax.Array, s_inv: jax.Array, *, rank: int
) -> solvers.Factors:
  """`[W S]_rank S⁻¹` in float32, split by √σ, as SVD-LLM's `whitening()`.

  W = Kᵀ. `W_scale = W S`; `U, σ, Vᵀ = svd(W_scale)`; `svd_u = U_r √σ_r`,
  `svd_v = √σ_r (Vᵀ_r S⁻¹)`; the layer computes `x svd_vᵀ svd_uᵀ`, so
  `a = svd_vᵀ`, `b = svd_uᵀ`. CorDA (`S = C`, `S⁻¹ = C⁻¹`) and SVD-LLM V2
  (`S = U_s √Λ`, `S⁻¹ = √Λ⁻¹ U_sᵀ`) have the same structure. Every
  direction is computed (one compile per shape) and the first `rank` kept
  (`solvers.truncate`): column i of the factors does not depend on the rank.
  """
  return solvers.truncate(_scaled_svd_full(kernel, s, s_inv), rank)


@jax.jit
def _scaled_svd_full(
    kernel: jax.Array, s: jax.Array, s_inv: jax.Array
) -> solvers.Factors:
  w = kernel.astype(_F32).T  # f32[d_out, d_in]
  w_scale = jnp.matmul(w, s.astype(_F32), precision=_HIGHEST)
  u, sigma, vt = jnp.linalg.svd(w_scale, full_matrices=False)
  sqrt_sigma = jnp.sqrt(sigma)
  trunc_v = jnp.matmul(vt, s_inv.astype(_F32), precision=_HIGHEST)
  svd_u = u * sqrt_sigma  # f32[d_out, p]
  svd_v = sqrt_sigma[:, None] * trunc_v  # f32[p, d_in]
  return solvers.Factors(
      svd_v.T.astype(kernel.dtype), svd_u.T.astype(kernel.dtype), sigma
  )


# --------------------------------------------------------------- methods ---


@jax.jit
def _svd_full(kernel: jax.Array) -> solvers.Factors:
  k = kernel.astype(checks.compute_dtype(kernel.dtype))
  u, sigma, vt = jnp.linalg.svd(k, full_matrices=False)
  a = u * sigma  # f[d_in, p]
  return solvers.Factors(a.astype(kernel.dtype), vt.astype(kernel.dtype), sigma)


@registry.register(nested=True, needs=(), summary='truncated SVD of K, no data')
def svd(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
) -> tuple[solvers.Factors, SolveInfo]:
  """Truncated SVD of K, no data: `a = U_r Σ_r`, `b = V_rᵀ` (Eckart–Young).

  Computes in float32 (float64 for a float64 kernel with x64 on). `stats`
  is not read (pass any LayerStats, e.g. `LayerStats(None, None, None, 0)`).
  """
  factors = solvers.truncate(_svd_full(jnp.asarray(kernel)), rank)
  return factors, _info(factors)


@jax.jit
def _svd_llm_whitening(gram: jax.Array) -> tuple[jax.Array, ...]:
  """Float64 part of SVD-LLM; call inside `jax.enable_x64(True)`."""
  g = gram.astype(_F32).astype(_F64)  # f64[d, d]
  eye = jnp.eye(g.shape[0], dtype=_F64)
  l_first = _cholesky(g)  # NaN on failure
  first_ok = _all_finite(l_first)

  def shifted(_):
    shift = -_eigvalsh(g)[0] + SVD_LLM_SHIFT
    return _cholesky(g + shift * eye), shift

  l, shift = jax.lax.cond(
      first_ok, lambda _: (l_first, jnp.zeros((), _F64)), shifted, None
  )
  l_inv = jnp.linalg.inv(l)  # explicit, f64
  return (l.astype(_F32), l_inv.astype(_F32), ~first_ok, shift, ~_all_finite(l))


@registry.register(
    nested=True,
    needs=('gram',),
    summary='SVD-LLM whitening: float64 Cholesky of the float32 Gram',
)
def svd_llm(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
) -> tuple[solvers.Factors, SolveInfo]:
  """SVD-LLM truncation-aware whitening, as its authors' code does it.

  Reproduces AIoT-MLSys-Lab/SVD-LLM, `SVDLLM.py`: `profle_svdllm` /
  `profle_svdllm_low_resource` (Gram) and `whitening` (SVD):

  * Gram `XᵀX` accumulated in float32 (`inp.float()`; `stats.gram`).
  * `S = cholesky(XᵀX.double())` in float64; if it fails, one shift
    `XᵀX += (−λ_min + 1e-6) I` with `λ_min = eigvalsh(XᵀX)[0]` and one
    retry; a second failure raised in their code: here `failed=True`.
  * `S⁻¹ = inv(S)` in float64 (an explicit inverse); `S`, `S⁻¹` then cast
    to float32. (Their fallback `S += 1e-6 I` when `inv` raises cannot
    trigger: a Cholesky factor that exists has a positive diagonal.)
  * `W_scale = W S`, `U, σ, Vᵀ = svd(W_scale)` in float32, factors
    `U_r √σ_r` and `√σ_r Vᵀ_r S⁻¹`, float32, computed as in
    `_scaled_svd_factors`. In our convention (W = Kᵀ): SVD of `Sᵀ K`, then
    `K' = S⁻ᵀ V_r Σ_r U_rᵀ`.

  Float64 steps run in JAX under `jax.enable_x64(True)`. SolveInfo:
  retries = 1 and eps = the shift when the first Cholesky failed.
  Needs `stats.gram`.
  """
  with jax.enable_x64(True):
    s, s_inv, retried, shift, failed = _svd_llm_whitening(
        jnp.asarray(stats.gram)
    )
    retried, shift, failed = bool(retried), float(shift), bool(failed)
  factors = _scaled_svd_factors(jnp.asarray(kernel), s, s_inv, rank=rank)
  return factors, _info(factors, int(retried), shift, failed)


@jax.jit
def _jitter_cholesky(gram: jax.Array) -> tuple[jax.Array, ...]:
  g = gram.astype(_F32)
  eye = jnp.eye(g.shape[0], dtype=_F32)

  def keep_trying(state):
    tries, _, l = state
    return ~_all_finite(l) & (tries < JITTER_MAX_TRIES)

  def next_try(state):
    tries, eps, _ = state
    eps = jnp.where(tries == 0, jnp.asarray(JITTER_START, _F32), 2 * eps)
    return tries + 1, eps, _cholesky(g + eps * eye)

  start = (jnp.zeros((), jnp.int32), jnp.zeros((), _F32), _cholesky(g))
  tries, eps, l = jax.lax.while_loop(keep_trying, next_try, start)
  return l, jnp.linalg.inv(l), tries, eps, ~_all_finite(l)


def cholesky_shift(r: jax.Array) -> float:
  """The jitter `svd_llm_eps` would add for these statistics (0 if none).

  Forms the float32 Gram `RᵀR` of a layer's R and runs `svd_llm_eps`'s
  loop: float32 Cholesky, then `eps = 1e-9, 2e-9, 4e-9, …` added to the
  diagonal until it succeeds (`JITTER_MAX_TRIES` at most). Returns that eps:
  the shift a Cholesky of the same statistics needs, used as a per-layer μ
  (`pipeline`'s mu_rule 'cholesky'). Raises ValueError if every try fails.
  """
  r = jnp.asarray(r, _F32)
  checks.check_matrix('r', r)
  checks.check_finite('r', r)
  gram = jnp.matmul(r.T, r, precision=_HIGHEST)
  _, _, tries, eps, failed = _jitter_cholesky(gram)
  if bool(failed):
    raise ValueError(
        f'cholesky_shift: the float32 Cholesky of RᵀR failed '
        f'for every jitter up to {float(eps):.3g}.'
    )
  return float(eps) if int(tries) > 0 else 0.0


@registry.register(
    nested=True,
    needs=('gram',),
    summary='SVD-LLM with float32 Cholesky and eps jitter',
)
def svd_llm_eps(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
) -> tuple[solvers.Factors, SolveInfo]:
  """SVD-LLM as common re-implementations run it: float32 Cholesky + jitter.

  The habit reproduced: Cholesky of the float32 Gram in the working
  precision (float32), and on failure `cholesky(XᵀX + eps I)` with an
  ABSOLUTE jitter `eps = 1e-9, 2e-9, 4e-9, …` (each try adds to the original
  Gram), as the `A + eps * eye` idiom and e.g. GPyTorch's
  `psd_safe_cholesky` do (absolute jitter, grown geometrically). Capped at
  `JITTER_MAX_TRIES` jitters, then `failed=True`. Then, like `svd_llm`, the
  explicit inverse `S⁻¹ = inv(S)` (float32) and the float32 SVD of `W S`
  (SVD-LLM `SVDLLM.py`, `whitening`). SolveInfo: retries = jitters tried,
  eps = the last one. Needs `stats.gram`.
  """
  s, s_inv, tries, eps, failed = _jitter_cholesky(jnp.asarray(stats.gram))
  factors = _scaled_svd_factors(jnp.asarray(kernel), s, s_inv, rank=rank)
  return factors, _info(factors, tries, eps, failed)


@jax.jit
def _v2_scaling(gram: jax.Array) -> tuple[jax.Array, ...]:
  """Float64 part of SVD-LLM V2; call inside `jax.enable_x64(True)`."""
  g = gram.astype(_F32).astype(_F64)
  lam, u_s = _eigh(g)  # ascending λ
  sqrt_lam = jnp.sqrt(lam)  # NaN if λ < 0
  s = u_s * sqrt_lam  # U_s √Λ
  s_inv = (1.0 / sqrt_lam)[:, None] * u_s.T  # √Λ⁻¹ U_sᵀ
  return (s.astype(_F32), s_inv.astype(_F32), ~_all_finite(lam, u_s))


@registry.register(
    nested=True,
    needs=('gram',),
    summary='SVD-LLM V2: eigh of the Gram, 1/sqrt(lambda) scaling',
)
def svd_llm_v2(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
) -> tuple[solvers.Factors, SolveInfo]:
  """SVD-LLM V2's loss-optimised truncation: two SVDs instead of Cholesky.

  Wang et al. 2025, "SVD-LLM V2" (arXiv:2503.12340), §3.2: decompose
  `XXᵀ = U_s S_s U_sᵀ`, take `D = W U_s √S_s`, `D = U_d S_d V_dᵀ`,
  `W' = U_d Trunc(S_d) V_dᵀ (√S_s)⁻¹ U_sᵀ`. The V2 code is not released
  (AIoT-MLSys-Lab/SVD-LLM README: "Release the code of SVD-LLM V2" is still
  open), so the numerical habits are taken from the same authors' V1 code
  (`SVDLLM.py`): Gram accumulated in float32, its decomposition in float64
  (here `eigh`, the symmetric eigendecomposition docs/method.md §6 names), the
  scaling and its inverse formed in float64 and cast to float32, the SVD and
  products in float32, factors split by √σ.

  Nothing guards `1/√λ`: a zero eigenvalue gives Inf, a negative one (a
  rank-deficient Gram rounded in float32) NaN, and a tiny positive one huge
  factors. This is reported (`nonfinite`), not fixed; `failed` means `eigh`
  itself broke down. Needs `stats.gram`.
  """
  with jax.enable_x64(True):
    s, s_inv, failed = _v2_scaling(jnp.asarray(stats.gram))
    failed = bool(failed)
  factors = _scaled_svd_factors(jnp.asarray(kernel), s, s_inv, rank=rank)
  return factors, _info(factors, failed=failed)


def _svd_lowrank(
    a: jax.Array, key: jax.Array, *, q: int, niter: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`torch.svd_lowrank(a, q, niter)` (Halko et al. 2009, Alg. 5.1).

  Works on the tall orientation of `a`; Gaussian test matrix
  `normal(key, (short side, q))`; `niter` subspace iterations with a QR after
  every product; SVD of `Qᵀ A`. Returns U f[m, q], S f[q], V f[n, q] with
  `a ≈ U diag(S) Vᵀ`.
  """
  wide = a.shape[0] < a.shape[1]
  if wide:
    a = a.T
  mm = functools.partial(jnp.matmul, precision=_HIGHEST)
  test = jax.random.normal(key, (a.shape[1], q), a.dtype)
  basis = jnp.linalg.qr(mm(a, test))[0]  # f[m, q]
  for _ in range(niter):
    basis = jnp.linalg.qr(mm(a.T, basis))[0]
    basis = jnp.linalg.qr(mm(a, basis))[0]
  u, s, vh = jnp.linalg.svd(mm(basis.T, a), full_matrices=False)
  u, v = mm(basis, u), vh.T
  return (v, s, u) if wide else (u, s, v)


ASVD_SVDS = ('randomized', 'exact')
ASVD_SCALES = ('abs_mean', 'rms')


def _exact_svd(a: jax.Array, *, q: int) -> tuple[jax.Array, ...]:
  """The exact truncated SVD in `_svd_lowrank`'s shapes (U, S, V)."""
  u, s, vh = jnp.linalg.svd(a, full_matrices=False)
  return u[:, :q], s[:q], vh[:q].T


@functools.partial(jax.jit, static_argnames=('rank', 'svd'))
def _asvd(
    kernel: jax.Array,
    stat: jax.Array,
    alpha: jax.Array,
    *,
    rank: int,
    svd: str = 'randomized',
) -> tuple[solvers.Factors, jax.Array]:
  w = kernel.astype(_F32).T  # f32[d_out, d_in]
  scale = stat.astype(_F32) ** alpha + ASVD_EPS  # f32[d_in]
  if svd == 'exact':
    u, s, v = _exact_svd(w * scale[None, :], q=rank)
  else:
    u, s, v = _svd_lowrank(
        w * scale[None, :], jax.random.key(ASVD_SEED), q=rank, niter=ASVD_NITER
    )
  broke = ~_all_finite(u, s, v)  # their NaN check
  v = v / scale[:, None]  # f32[d_in, rank]
  a_weight = u * jnp.sqrt(s)  # ALinear, [out, r]
  b_weight = v.T * jnp.sqrt(s)[:, None]  # BLinear, [r, in]
  return (
      solvers.Factors(
          b_weight.T.astype(kernel.dtype), a_weight.T.astype(kernel.dtype), s
      ),
      broke,
  )


def _check_asvd_options(options) -> None:
  if 'svd' in options and options['svd'] not in ASVD_SVDS:
    raise ValueError(
        f"svd: expected one of {ASVD_SVDS} (asvd's SVD); got "
        f"{options['svd']!r}."
    )
  if 'scale' in options and options['scale'] not in ASVD_SCALES:
    raise ValueError(
        f'scale: expected one of {ASVD_SCALES} (the channel '
        f"statistic); got {options['scale']!r}."
    )
  if 'alpha' in options:
    alpha = options['alpha']
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.integer, np.floating))
        or not (np.isfinite(alpha) and alpha > 0)
    ):
      raise ValueError(
          f'alpha: expected a finite number > 0; got ' f'{alpha!r}.'
      )


@registry.register(
    needs=('abs_sum',),
    options=dict(svd='randomized', scale='abs_mean', alpha=ASVD_ALPHA),
    check=_check_asvd_options,
    summary='ASVD: mean|x|^alpha channel scaling, randomized SVD',
)
def asvd(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
    svd: str = 'randomized',
    scale: str = 'abs_mean',
    alpha: float = ASVD_ALPHA,
) -> tuple[solvers.Factors, SolveInfo]:
  """ASVD (activation-aware SVD), as hahnyuan/ASVD4LLM does it.

  Reproduces `act_aware_utils.py`, `calib_input_distribution` ("abs_mean")
  and `modules/svd_linear.py`, `SVDLinear.from_linear` (act_aware, alpha =
  0.5 from `asvd.py`, sigma_fuse "UV"):

  * per input channel `s = mean_tokens(|x|)^α + 1e-6` (their "+= 1e-6 #
    avoid zero division"), from `stats.abs_sum / stats.count`. (Their hook
    sums per-sequence means, i.e. this mean times the number of equal-length
    sequences: a constant factor that only shifts the 1e-6.) The scale
    multiplies the input channels, the columns of W = Kᵀ, as theirs does
    (`w * scaling_diag_matrix.view(1, -1)`).
  * `torch.svd_lowrank(W diag(s), q=rank)`: a RANDOMISED SVD with no
    oversampling and `niter=2` (their habit; not the exact truncated SVD),
    reproduced in `_svd_lowrank` with a fixed key (`ASVD_SEED`) where torch
    draws from its global generator. All in float32.
  * `V ← V / s`; factors `U √S` and `Vᵀ √S`.

  On NaN in U, S or V the authors replace the layer by a fresh randomly
  initialised `nn.Linear`; here that is `failed=True` (and the factors are
  returned as computed). `sigma` holds the `rank` values of the randomised
  SVD. Needs `stats.abs_sum` and `stats.count`.

  Options that take it apart (the defaults are the authors'): `svd='exact'`
  (the exact truncated SVD of the same scaled matrix: the SVD habit apart
  from the scaling), `alpha` (their exponent α), and `scale='rms'`, the
  channel statistic `sqrt(mean_t x²)` (the column norms of R over √n, i.e.
  the diagonal of XᵀX) in place of `mean_t |x|`: with `alpha=1` this is the
  exact solution of (P) when the input channels are uncorrelated.
  """
  _check_asvd_options(dict(svd=svd, scale=scale, alpha=alpha))
  if scale == 'rms':
    r = jnp.asarray(stats.r, _F32)
    stat = jnp.sqrt(jnp.sum(jnp.square(r), axis=0) / stats.count)
  else:
    stat = jnp.asarray(stats.abs_sum, _F32) / jnp.asarray(stats.count, _F32)
  factors, broke = _asvd(
      jnp.asarray(kernel), stat, jnp.asarray(alpha, _F32), rank=rank, svd=svd
  )
  return factors, _info(factors, failed=broke)


@jax.jit
def _corda_damped_inverse(gram: jax.Array) -> tuple[jax.Array, ...]:
  c = gram.astype(_F32)
  eye = jnp.eye(c.shape[0], dtype=_F32)
  mean_diag = jnp.mean(jnp.diagonal(c))

  def attempt(damp):
    fixed = c + eye * (mean_diag * damp)
    inv = jnp.linalg.inv(fixed)
    err = jnp.linalg.norm(jnp.matmul(fixed, inv, precision=_HIGHEST) - eye)
    return fixed, inv, err

  def keep_trying(state):
    doublings, _, _, _, err = state
    return ~(err < CORDA_INV_TOL) & (doublings < CORDA_MAX_DOUBLINGS)

  def next_try(state):
    doublings, damp, _, _, _ = state
    return (doublings + 1, 2 * damp) + attempt(2 * damp)

  damp = jnp.asarray(CORDA_DAMP_START, _F32)
  start = (jnp.zeros((), jnp.int32), damp) + attempt(damp)
  doublings, damp, fixed, inv, err = jax.lax.while_loop(
      keep_trying, next_try, start
  )
  return fixed, inv, doublings, mean_diag * damp, ~(err < CORDA_INV_TOL)


@registry.register(
    nested=True,
    needs=('gram',),
    summary='CorDA: SVD of W C, damped explicit inverse',
)
def corda(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
) -> tuple[solvers.Factors, SolveInfo]:
  """CorDA context-oriented decomposition, as iboing/CorDA does it.

  Reproduces `cordalib/decomposition.py`, `decompose_to_adapter` /
  `full_decompose` with `cov_aware=True` (first_eigen: keep the top `rank`
  components), covariance from `cordalib/act_aware_utils.py`,
  `calib_cov_distribution`:

  * `C = XᵀX` (float32, `stats.gram`). Their hook also divides each
    sequence by its max and the sum by 256: positive rescalings that a
    single calibration Gram cannot reproduce and that cancel for one block.
  * damping `C + damp · mean(diag C) · I`, `damp = 0.01, 0.02, 0.04, …`
    until the float32 explicit inverse passes their check
    `||C_fix C_fix⁻¹ − I||_F < 0.05`. (Their loop has no cap; ours stops
    after `CORDA_MAX_DOUBLINGS` doublings with `failed=True`.)
  * `svd(W C_fix)` in float32, `V ← (Vᵀ C_fix⁻¹)ᵀ`, factors `U √S`,
    `Vᵀ √S`.

  Note the weighting is by C itself, not by its square root: CorDA
  minimises `||(W − W') C_fix||_F`, which is not the problem (P) of
  docs/method.md §1, so it does not reach the optimum of (P) even on
  well-conditioned data.
  SolveInfo: retries = doublings, eps = the damping added to the diagonal
  (`damp · mean(diag C)`, absolute). Needs `stats.gram`.
  """
  fixed, inv, doublings, added, failed = _corda_damped_inverse(
      jnp.asarray(stats.gram)
  )
  factors = _scaled_svd_factors(jnp.asarray(kernel), fixed, inv, rank=rank)
  return factors, _info(factors, doublings, added, failed)
