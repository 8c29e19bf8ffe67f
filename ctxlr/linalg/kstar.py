"""The limit K_* of the regularized solution, and how fast K_μ reaches it.

docs/method.md §5, proofs in docs/theory.md. With `M = X K` (`R K` has the same
right singular vectors and values), σ_i = σ_i(M) zero-padded to d_out, and
`s = σ_r`, the right singular vectors split into `V_1` (σ_i > s, `a` of them),
`V_T` (σ_i = s, `t` of them, `a < r <= a + t`) and the rest. Among all
minimisers of (P) the one closest to K is

    K_* = K (V_1 V_1ᵀ + V_T C Cᵀ V_Tᵀ),   C: top r − a right sing. vec. of K V_T

which is the μ = 0 solution `K V_r V_rᵀ` when σ_r > σ_{r+1} ('gap'),
`K P + [K (I − P)]_{r−k}` (P: projector on the row space of M, k = rank M)
when k < r ('deficient'), and the minimal-change choice inside the tied
singular space when σ_r = σ_{r+1} > 0 ('tie'). `K_μ → K_*` linearly in μ;
`error_bound` gives an explicit `C μ`.

This is a reference for tests, experiments and model-level comparisons: its
case split depends on values (numerical rank), so it is not jit-able as a
whole; its SVDs are jitted. No Gram matrix, no inverse.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ctxlr.linalg import checks
from ctxlr.linalg import qr
from ctxlr.linalg import solvers

_HIGHEST = jax.lax.Precision.HIGHEST
CASES = ('gap', 'tie', 'deficient')


class Structure(NamedTuple):
  """Where (P) sits for one (K, X, r), and the numbers the bounds use.

  Arrays are float64 NumPy (host) copies of values computed in the compute
  dtype; `tol` is the absolute threshold under which two σ coincide or one
  is zero.
  """

  case: str  # 'gap' | 'tie' | 'deficient'
  rank: int  # r
  data_rank: int  # k: numerical rank of X K
  num_above: int  # a: #{i : σ_i > σ_r}
  num_tied: int  # t: #{i : σ_i = σ_r}, a < r <= a + t
  sigma: np.ndarray  # shape=(d_out,): σ_i(XK), zero-padded, descending
  nu: np.ndarray  # shape=(t,): eigenvalues of (K V_T)ᵀ K V_T, desc.
  kernel_sv: np.ndarray  # shape=(min(d_in, d_out),): singular values of K
  tol: float  # σ_i <= tol counts as 0, |σ_i − σ_r| <= tol as tied

  @property
  def beta(self) -> float:
    """||K||_2."""
    return float(self.kernel_sv[0])

  @property
  def gap(self) -> float:
    """σ_r² − σ_{r+1}² (σ_{d_out+1} = 0); 0 when tied or deficient."""
    if self.case != 'gap':
      return 0.0
    nxt = self.sigma[self.rank] if self.rank < len(self.sigma) else 0.0
    return float(self.sigma[self.rank - 1] ** 2 - nxt**2)


def _as_r(r_or_x: jax.Array) -> jax.Array:
  """R (or X itself when it has at most d_in rows): same Gram, few rows."""
  if r_or_x.shape[0] > r_or_x.shape[1]:
    return qr.qr_r(r_or_x)  # tall X: QR, never XᵀX
  return jnp.asarray(r_or_x)


@jax.jit
def _spectrum(kernel: jax.Array, r: jax.Array):
  dtype = checks.compute_dtype(kernel.dtype, r.dtype)
  k = kernel.astype(dtype)
  rk = jnp.matmul(r.astype(dtype), k, precision=_HIGHEST)  # f[m, d_out]
  _, sigma, vt = jnp.linalg.svd(rk, full_matrices=True)  # vt: [d, d]
  kernel_sv = jnp.linalg.svd(k, compute_uv=False)
  return sigma, vt.T, kernel_sv


@functools.partial(jax.jit, static_argnames=('a', 't', 'rank'))
def _cluster_basis(
    kernel: jax.Array, v: jax.Array, *, a: int, t: int, rank: int
):
  """V_* = [V_1, V_T C] (float[d_out, rank]) and τ (float[t], padded)."""
  k = kernel.astype(v.dtype)
  v_t = v[:, a : a + t]  # f[d_out, t]
  kt = jnp.matmul(k, v_t, precision=_HIGHEST)  # f[d_in, t]
  _, tau, ct = jnp.linalg.svd(kt, full_matrices=True)  # ct: [t, t]
  chosen = jnp.matmul(v_t, ct[: rank - a].T, precision=_HIGHEST)  # [d, r − a]
  tau = jnp.pad(tau, (0, t - tau.shape[0]))
  return jnp.concatenate([v[:, :a], chosen], axis=1), tau


def _analyze(kernel: Any, r_or_x: Any, rank: int, rtol: float | None):
  """(Structure, V_* float[d_out, rank], σ(R K) unpadded)."""
  checks.check_matrix('kernel', kernel)
  d_in, d_out = kernel.shape
  checks.check_matrix('r_or_x', r_or_x, cols=d_in)
  checks.check_rank(rank, d_in, d_out)
  checks.check_finite('kernel', kernel)
  checks.check_finite('r_or_x', r_or_x)
  if rtol is not None and not (np.isfinite(rtol) and rtol > 0):
    raise ValueError(f'rtol must be a finite number > 0; got {rtol}.')
  if not (checks.is_concrete(kernel) and checks.is_concrete(r_or_x)):
    raise ValueError(
        'k_star needs concrete arrays (its case split '
        'depends on values); call it outside jit.'
    )
  kernel = jnp.asarray(kernel)
  r = _as_r(jnp.asarray(r_or_x))
  sigma_j, v, kernel_sv = _spectrum(kernel, r)
  if rtol is None:  # R's precision, not the compute dtype's
    eps = float(jnp.finfo(checks.compute_dtype(r.dtype)).eps)
    rtol = max(r.shape[0], d_out, d_in) * eps
  sigma = np.zeros(d_out)
  sigma[: sigma_j.shape[0]] = np.asarray(sigma_j, np.float64)
  tol = rtol * sigma[0]
  k = int(np.sum(sigma > tol))
  s = sigma[rank - 1]
  if s <= tol:  # k < r: the tie is at zero, V_T = null(M)
    case, a, t = 'deficient', k, d_out - k
  else:
    a = int(np.sum(sigma > s + tol))
    t = int(np.sum(sigma >= s - tol)) - a
    case = 'gap' if a + t == rank else 'tie'
  if case == 'gap':
    v_star, nu = v[:, :rank], np.zeros(t)
  else:
    v_star, tau = _cluster_basis(kernel, v, a=a, t=t, rank=rank)
    tau = np.asarray(tau, np.float64)
    nu = tau**2
    j = rank - a  # C keeps τ_1 … τ_j
    tau_tol = rtol * float(kernel_sv[0])
    if j < t and tau[j] > tau_tol and tau[j - 1] - tau[j] <= tau_tol:
      raise ValueError(
          f'K_* is not unique for rank={rank}: the {case} leaves {j} of {t} '
          f'directions to choose, and singular values {j} and {j + 1} of K '
          f'restricted to them coincide ({tau[j - 1]:.6g}, {tau[j]:.6g}); '
          'several minimisers of (P) are equally close to K.'
      )
  st = Structure(
      case=case,
      rank=rank,
      data_rank=k,
      num_above=a,
      num_tied=t,
      sigma=sigma,
      nu=nu,
      kernel_sv=np.asarray(kernel_sv, np.float64),
      tol=float(tol),
  )
  return st, v_star, sigma_j


def solution_structure(
    kernel: jax.Array,
    r_or_x: jax.Array,
    *,
    rank: int,
    rtol: float | None = None,
) -> Structure:
  """The case of (P) (gap, tie or deficient data) and the bound's numbers.

  Args:
    kernel: K, float[d_in, d_out]; y = x @ K.
    r_or_x: R of X, float[m, d_in] (e.g. `qr_r(x)`), or X itself. A matrix
      with more rows than d_in is reduced by `qr_r` first.
    rank: r, 1 <= r <= min(d_in, d_out).
    rtol: relative tolerance: σ_i(XK) <= rtol σ_1 counts as zero and
      |σ_i − σ_r| <= rtol σ_1 as a tie (the τ of K V_T likewise, relative to
      ||K||_2). Default `max(m, d_in, d_out) · eps`, eps of R's dtype (at
      least float32's): NumPy's `matrix_rank` rule, set by the accuracy of R,
      so a float32 R keeps the float32 threshold even when the computation
      runs in float64. An R streamed from fewer than d_in tokens carries
      rounding-level rows that this threshold absorbs; for sharp decisions
      accumulate R in float64.

  Returns:
    A `Structure`.
  """
  return _analyze(kernel, r_or_x, rank, rtol)[0]


def k_star(
    kernel: jax.Array,
    r_or_x: jax.Array,
    *,
    rank: int,
    rtol: float | None = None,
) -> solvers.Factors:
  """K_*: the minimiser of (P) closest to K, as rank-`rank` factors (§5).

  `K_* = argmin { ||K − K'||_F : K' minimises ||X(K − K')||_F, rank K' <= r }`,
  the limit of the regularized solution K_μ as μ → 0. It equals the μ = 0
  solution when σ_r(XK) > σ_{r+1}(XK), and differs from it (which is then an
  arbitrary minimiser) when data are insufficient (rank XK < r) or tied.

  >>> x = jax.random.normal(jax.random.key(0), (6, 30))   # n = 6 < r
  >>> kernel = jax.random.normal(jax.random.key(1), (30, 40))
  >>> f = k_star(kernel, x, rank=10)
  >>> f.a.shape, f.b.shape
  ((30, 10), (10, 40))

  Args:
    kernel: K, float[d_in, d_out].
    r_or_x: R of X, float[m, d_in], or X itself (see `solution_structure`).
    rank: r, 1 <= r <= min(d_in, d_out). Python int.
    rtol: numerical rank / tie tolerance (see `solution_structure`).

  Returns:
    Factors(a = K V_*: [d_in, rank], b = V_*ᵀ: [rank, d_out] in the kernel's
    dtype, sigma: σ(R K) in the compute dtype), `a @ b = K_*`.

  Raises:
    ValueError: bad shapes, NaN/Inf, rank out of range, rtol <= 0, traced
      input, or a tie that leaves K_* not unique.
  """
  _, v_star, sigma = _analyze(kernel, r_or_x, rank, rtol)
  kernel = jnp.asarray(kernel)
  a = jnp.matmul(kernel.astype(v_star.dtype), v_star, precision=_HIGHEST)
  return solvers.Factors(
      a.astype(kernel.dtype), v_star.T.astype(kernel.dtype), sigma
  )


def gap_bound_constant(st: Structure) -> float:
  """C of `||K_μ − K_*||_F <= C μ` for all μ > 0 in the gap case (§5).

  `C = √2 ||KᵀK||_F ||K||_2 / (σ_r² − σ_{r+1}²)` (Davis–Kahan;
  docs/method.md §5, in K notation). `inf` outside the gap case.
  """
  if st.case != 'gap':
    return math.inf
  norm_h = float(np.sqrt(np.sum(st.kernel_sv**4)))  # ||KᵀK||_F from σ(K)
  return math.sqrt(2.0) * norm_h * st.beta / st.gap


def degenerate_bound_constant(st: Structure, mu: float) -> float:
  """C(μ) of `||K_μ − K_*||_F <= C(μ) μ`, every case (docs/theory.md, Thm 5).

  With β = ||K||_2, s = σ_r, g₁ = σ_a² − s², g₃ = s² − σ_{a+t+1}² (∞ when
  absent), ν the eigenvalues of (K V_T)ᵀ K V_T, j = r − a, τ = √ν_{j+1},
  δ = ν_j − ν_{j+1} and ε = μβ²/g₁:

      C(μ) = √2 β [ (τβ√a / g₁)² + (τβ³√j · h / (δ − εν_j))² + (β²√r / g₃)² ]^½
      h = ( 1/(g₁(1−ε))² + 1/g₃² )^½

  valid while ε < 1 and εν_j < δ when j < t (else `inf`). For k < r
  (s = 0, g₁ = σ_k², g₃ = ∞) it grows like β²/σ_k² · β²/δ; in the gap case
  (j = t) only the g₃ term remains (a Davis–Kahan variant, valid for all μ).
  """
  beta, a, t, r = st.beta, st.num_above, st.num_tied, st.rank
  s2 = 0.0 if st.case == 'deficient' else st.sigma[r - 1] ** 2
  g1 = st.sigma[a - 1] ** 2 - s2 if a else math.inf
  g3 = s2 - st.sigma[a + t] ** 2 if a + t < len(st.sigma) else math.inf
  w3 = beta**2 * math.sqrt(r) / g3 if math.isfinite(g3) else 0.0
  j = r - a
  z1 = z2 = 0.0
  if j < t:  # directions to choose inside the tie
    tau = math.sqrt(st.nu[j])  # τ_{j+1} = ||K V_T C_2||_2
    eps1 = mu * beta**2 / g1 if a else 0.0
    delta = st.nu[j - 1] - st.nu[j]
    if eps1 >= 1 or eps1 * st.nu[j - 1] >= delta:
      return math.inf
    inv_g1 = 1.0 / (g1 * (1.0 - eps1)) if a else 0.0
    inv_g3 = 1.0 / g3 if math.isfinite(g3) else 0.0
    z1 = tau * beta * math.sqrt(a) / g1 if a else 0.0
    z2 = (
        tau
        * beta**3
        * math.sqrt(j)
        * math.hypot(inv_g1, inv_g3)
        / (delta - eps1 * st.nu[j - 1])
    )
  return math.sqrt(2.0) * beta * math.sqrt(z1**2 + z2**2 + w3**2)


def error_bound(st: Structure, mu: float) -> float:
  """A proven upper bound on `||K_μ − K_*||_F` for μ > 0 (`inf` if none).

  μ times the smaller of `gap_bound_constant` and `degenerate_bound_constant`
  (both valid where finite). μ = 0 is excluded: K_0 is an arbitrary minimiser.
  """
  if not (np.isfinite(mu) and mu > 0):
    raise ValueError(f'mu must be a finite number > 0; got {mu}.')
  return mu * min(gap_bound_constant(st), degenerate_bound_constant(st, mu))
