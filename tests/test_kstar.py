"""k_star (K_*) against float64 NumPy references (docs/method.md §5).

References here are written in the paper's notation (W = Kᵀ, M_p = W Xᵀ) with
NumPy SVDs, independently of ctxlr.linalg.kstar.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr.linalg import kstar
from ctxlr.linalg import qr
from ctxlr.linalg import solvers

# (d_in, d_out, n, rank, extra make_problem arguments)
FEW_TOKENS = (30, 40, 6, 10, {})  # n < r: docs/method.md §5
DEFICIENT_X = (24, 16, 64, 8, dict(x_rank=4))  # rank X = 4 < r, n > d_in
GAP = (24, 16, 64, 6, {})
TIE = (16, 24, 64, 6, dict(tie=(4, 4)))  # σ_5 = … = σ_8 of XK


def _problem(spec, seed):
  d_in, d_out, n, rank, extra = spec
  rng = np.random.default_rng(seed)
  x, kernel = reference.make_problem(
      rng, d_in=d_in, d_out=d_out, n=n, rank=rank, **extra
  )
  return x, kernel, rank


def _k_star(kernel, r_or_x, rank, **kw):
  with jax.enable_x64(True):
    f = kstar.k_star(kernel, r_or_x, rank=rank, **kw)
    assert f.a.dtype == jnp.float64 and f.a.shape == (kernel.shape[0], rank)
    return np.asarray(f.a) @ np.asarray(f.b)


def _best(a, j):
  u, s, vt = np.linalg.svd(a)
  return (u[:, :j] * s[:j]) @ vt[:j]


def _paper_w_star(x, kernel, rank):
  """docs/method.md §5 in paper notation: W = Kᵀ, M = W Xᵀ (d_out × n)."""
  w = kernel.T
  m = w @ x.T
  u, s, _ = np.linalg.svd(m)
  k = int(np.sum(s > 1e-10 * s[0]))
  if k >= rank:  # gap case
    return u[:, :rank] @ u[:, :rank].T @ w
  p_m = u[:, :k] @ u[:, :k].T
  return p_m @ w + _best((np.eye(len(w)) - p_m) @ w, rank - k)


def _numpy_k_mu(x, kernel, rank, mu):
  """K_μ from the SVD of [X; √μ I] K in NumPy (no ctxlr)."""
  xm = np.vstack([x, np.sqrt(mu) * np.eye(x.shape[1])])
  v = np.linalg.svd(xm @ kernel)[2][:rank].T
  return kernel @ v @ v.T


@pytest.mark.parametrize('spec', [FEW_TOKENS, DEFICIENT_X, GAP])
def test_matches_math_md_formula(spec):
  for seed in range(6):
    x, kernel, rank = _problem(spec, seed)
    want = _paper_w_star(x, kernel, rank).T
    for r_or_x in (x, reference.r_factor(x)):  # X itself or its R
      got = _k_star(kernel, r_or_x, rank)
      np.testing.assert_allclose(got, want, atol=1e-10 * np.linalg.norm(want))


@pytest.mark.parametrize('spec', [FEW_TOKENS, DEFICIENT_X, GAP, TIE])
def test_attains_optimal_data_error(spec):
  for seed in range(4):
    x, kernel, rank = _problem(spec, seed)
    opt = reference.optimal_errors(x, kernel)
    opt_r = opt[rank] if rank < len(opt) else 0.0
    k_star = _k_star(kernel, x, rank)
    assert (
        np.linalg.matrix_rank(k_star, tol=1e-9 * np.linalg.norm(k_star)) <= rank
    )
    err = np.linalg.norm(x @ (kernel - k_star))
    assert abs(err - opt_r) <= 1e-10 * opt[0], (err, opt_r)


def test_mu0_solution_is_a_different_minimiser_when_n_lt_r():
  """The μ = 0 solver fits the data as well as K_* but changes K more."""
  for seed in range(10):
    x, kernel, rank = _problem(FEW_TOKENS, seed)
    k_star = _k_star(kernel, x, rank)
    with jax.enable_x64(True):
      r = qr.qr_r(jnp.asarray(x))
      f0 = solvers.ctx_factors(jnp.asarray(kernel), r, rank=rank)
    k0 = np.asarray(f0.a) @ np.asarray(f0.b)
    norm_xk = np.linalg.norm(x @ kernel)
    assert np.linalg.norm(x @ (kernel - k0)) <= 1e-12 * norm_xk  # optimal
    dist = np.linalg.norm(k0 - k_star) / np.linalg.norm(k_star)
    assert dist > 0.1, dist  # measured 0.65 … 0.75
    plain0, plain_star = (np.linalg.norm(kernel - k) for k in (k0, k_star))
    assert plain0 > 1.05 * plain_star, (plain0, plain_star)
    # ... and the regularized solution picks K_*: NumPy's K_μ at μ = 1e-9.
    k_mu = _numpy_k_mu(x, kernel, rank, 1e-9)
    assert np.linalg.norm(k_mu - k_star) <= 1e-5 * np.linalg.norm(k_star)


def test_tie_is_the_closest_minimiser():
  """σ_r = σ_{r+1} > 0: K_* beats every other minimiser of (P) in ‖K − K'‖."""
  rng = np.random.default_rng(123)
  for seed in range(4):
    x, kernel, rank = _problem(TIE, seed)
    with jax.enable_x64(True):
      st = kstar.solution_structure(kernel, x, rank=rank)
    assert (st.case, st.num_above, st.num_tied) == ('tie', 4, 4)
    k_star = _k_star(kernel, x, rank)
    opt = reference.optimal_errors(x, kernel)[rank]
    # Every minimiser is K Π_S with span V_1 ⊆ S ⊆ span[V_1, V_T] (X has
    # full column rank): sample S and compare.
    v = np.linalg.svd(x @ kernel)[2].T
    v1, vt = v[:, :4], v[:, 4:8]
    best_other = np.inf
    for _ in range(200):
      q = np.linalg.qr(rng.standard_normal((4, 2)))[0]
      s = np.hstack([v1, vt @ q])
      k_other = kernel @ s @ s.T
      assert abs(np.linalg.norm(x @ (kernel - k_other)) - opt) <= 1e-10 * opt
      best_other = min(best_other, np.linalg.norm(kernel - k_other))
    assert np.linalg.norm(kernel - k_star) < best_other
    # The closest choice in closed form (paper notation): inside the tie,
    # the top-2 right singular vectors of K V_T.
    c = np.linalg.svd(kernel @ vt)[2][:2].T
    s = np.hstack([v1, vt @ c])
    np.testing.assert_allclose(
        k_star, kernel @ s @ s.T, atol=1e-9 * np.linalg.norm(k_star)
    )


def test_limit_of_numpy_regularized_solution():
  """K_* is the μ → 0 limit of an independent NumPy K_μ, in every case."""
  for spec in (FEW_TOKENS, DEFICIENT_X, GAP, TIE):
    x, kernel, rank = _problem(spec, 0)
    k_star = _k_star(kernel, x, rank)
    d = [
        np.linalg.norm(_numpy_k_mu(x, kernel, rank, mu) - k_star)
        for mu in (1e-6, 1e-7)
    ]
    assert d[1] <= 1e-4 * np.linalg.norm(k_star), (spec, d)
    assert 5 < d[0] / d[1] < 20, (spec, d)  # linear in μ


def test_structure_cases():
  expect = [
      (FEW_TOKENS, ('deficient', 6, 6, 34)),
      (DEFICIENT_X, ('deficient', 4, 4, 12)),
      (GAP, ('gap', 16, 5, 1)),
      (TIE, ('tie', 16, 4, 4)),
  ]
  with jax.enable_x64(True):
    for spec, (case, k, a, t) in expect:
      x, kernel, rank = _problem(spec, 0)
      st = kstar.solution_structure(kernel, reference.r_factor(x), rank=rank)
      assert (st.case, st.data_rank, st.num_above, st.num_tied) == (
          case,
          k,
          a,
          t,
      ), spec
      assert st.beta == pytest.approx(np.linalg.norm(kernel, 2), rel=1e-12)


def test_gap_constant_is_math_md_formula():
  x, kernel, rank = _problem(GAP, 1)
  with jax.enable_x64(True):
    st = kstar.solution_structure(kernel, x, rank=rank)
  s = np.linalg.svd(x @ kernel, compute_uv=False)
  want = (
      np.sqrt(2)
      * np.linalg.norm(kernel.T @ kernel)
      * np.linalg.norm(kernel, 2)
      / (s[rank - 1] ** 2 - s[rank] ** 2)
  )
  assert kstar.gap_bound_constant(st) == pytest.approx(want, rel=1e-10)
  assert st.gap == pytest.approx(s[rank - 1] ** 2 - s[rank] ** 2, rel=1e-10)


def test_low_rank_kernel_is_its_own_limit():
  """rank K <= r: K_* = K (ν_{j+1} = 0 is unique), and K_μ = K too."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((3, 12))
  kernel = rng.standard_normal((12, 4)) @ rng.standard_normal((4, 10))
  k_star = _k_star(kernel, x, 5)
  np.testing.assert_allclose(
      k_star, kernel, atol=1e-12 * np.linalg.norm(kernel)
  )


def test_float32_kernel_keeps_its_dtype():
  x, kernel, rank = _problem(FEW_TOKENS, 0)
  f = kstar.k_star(
      jnp.asarray(kernel, jnp.bfloat16), jnp.asarray(x, jnp.float32), rank=rank
  )
  assert f.a.dtype == jnp.bfloat16 and f.b.dtype == jnp.bfloat16
  want = _paper_w_star(x, kernel, rank).T
  got = np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
  assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)


def _non_unique_problem():
  """n < r and K(I − P) with τ_2 = τ_3 (j = r − k = 2): two closest fits."""
  rng = np.random.default_rng(0)
  d_in, d_out, n = 12, 10, 3
  x = rng.standard_normal((n, d_in))
  null_x = np.linalg.svd(x)[2][n:].T  # [d_in, 9]
  basis = np.linalg.qr(rng.standard_normal((d_out, d_out)))[0]
  b, c = basis[:, :n], basis[:, n : n + 4]
  kernel = (
      rng.standard_normal((d_in, n)) @ b.T
      + (null_x[:, :4] * np.array([3.0, 2.0, 2.0, 1.0])) @ c.T
  )
  return x, kernel


def test_errors():
  x, kernel, rank = _problem(FEW_TOKENS, 0)
  cases = [
      (dict(kernel=kernel[0]), 'kernel must be a matrix'),
      (dict(r_or_x=x[:, :5]), 'r_or_x has shape'),
      (dict(rank=0), 'rank=0 is outside'),
      (dict(rank=31), 'rank=31 is outside'),
      (dict(rank=2.0), 'rank must be a Python int'),
      (dict(rtol=0.0), 'rtol must be a finite number > 0'),
      (
          dict(kernel=np.where(np.eye(30, 40) > 0, np.nan, kernel)),
          'kernel contains 30 NaN',
      ),
      (
          dict(r_or_x=np.where(np.eye(6, 30) > 0, np.inf, x)),
          'r_or_x contains 6 NaN or Inf',
      ),
  ]
  for change, message in cases:
    args = dict(kernel=kernel, r_or_x=x, rank=rank, rtol=None) | change
    with pytest.raises(ValueError, match=message):
      kstar.k_star(args.pop('kernel'), args.pop('r_or_x'), **args)
  with pytest.raises(ValueError, match='needs concrete arrays'):
    jax.jit(lambda k: kstar.k_star(k, x, rank=rank).a)(kernel)
  x_nu, k_nu = _non_unique_problem()
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match='K_\\* is not unique'):
      kstar.k_star(k_nu, x_nu, rank=5)
    st = kstar.solution_structure(kernel, x, rank=rank)
  for mu in (0.0, -1.0, np.inf):
    with pytest.raises(ValueError, match='mu must be a finite number > 0'):
      kstar.error_bound(st, mu)


def test_streamed_float32_r_keeps_float32_threshold():
  """n < d_in tokens folded in float32: R has rounding-level rows, which the
  default rtol (set by R's dtype, even when computing in float64) ignores."""
  for seed in range(3):
    rng = np.random.default_rng(seed)
    # 16 tokens spanning 8 directions: float32 R of rank 8 up to rounding.
    x = rng.standard_normal((16, 8)) @ reference.activations(
        rng, 8, 48, cond=10.0
    )  # float64, exactly rank 8
    kernel = rng.standard_normal((48, 40)) / 7
    r = jnp.zeros((48, 48), jnp.float32)
    for block in np.split(x.astype(np.float32), 2):
      r = qr.fold_r(r, jnp.asarray(block))
    assert 0 < float(jnp.abs(r[8:]).max())  # not exactly rank 8
    with jax.enable_x64(True):
      st = kstar.solution_structure(kernel, r, rank=12)
      assert (st.case, st.data_rank) == ('deficient', 8)
      got = _k_star(kernel, r, 12)
    want = _paper_w_star(x, kernel, 12).T
    assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)
