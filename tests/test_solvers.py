"""ctx_factors attains the float64 optimum of (P) at every rank, in float32."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctxlr
from ctxlr import baselines
from ctxlr import reference
from ctxlr import registry
from ctxlr.linalg import solvers
from ctxlr import stats as stats_lib

# Excess (err − opt) / ||XK||_F must stay at float32 rounding level.
F32_EXCESS = 2e-6


def _problem(seed, n, d_in, d_out, **kw):
  rng = np.random.default_rng(seed)
  x = reference.activations(rng, n, d_in, **kw).astype(np.float32)
  kernel = rng.standard_normal((d_in, d_out)).astype(np.float32)
  return x, kernel


@pytest.mark.parametrize(
    'cond,deficient', [(1.0, None), (1e6, None), (1e8, None), (1e2, 10)]
)
@pytest.mark.parametrize('d_in,d_out', [(32, 24), (24, 32)])
def test_optimal_at_every_rank_in_float32(cond, deficient, d_in, d_out):
  x, kernel = _problem(0, 4 * d_in, d_in, d_out, cond=cond, rank=deficient)
  opt = reference.optimal_errors(x, kernel)
  norm_xk = opt[0]
  p = min(d_in, d_out)
  full = ctxlr.ctx_factors(jnp.asarray(kernel), ctxlr.qr_r(x), rank=p)
  for k in range(1, p + 1):  # rank-k factors are the leading k of rank p
    err = reference.weighted_error(x, kernel, full.a[:, :k], full.b[:k])
    excess = (err - opt[k]) / norm_xk
    assert excess <= F32_EXCESS, (k, err, opt[k], excess)
    assert err >= opt[k] * (1 - 1e-6) - 1e-9 * norm_xk  # no one beats opt
  for k in (1, p // 2, p - 1):  # the static-rank path gives the same product
    f = ctxlr.ctx_factors(jnp.asarray(kernel), ctxlr.qr_r(x), rank=k)
    assert f.a.shape == (d_in, k) and f.b.shape == (k, d_out)
    err = reference.weighted_error(x, kernel, f.a, f.b)
    assert (err - opt[k]) / norm_xk <= F32_EXCESS


# The same float32 data through the Gram route fails where QR does not.
def test_ctxlr_optimal_where_gram_methods_are_not(ill_conditioned):
  x, kernel, stats = ill_conditioned
  rank = 200
  opt = reference.optimal_errors(x, kernel)
  ratio = {}
  for method in ('coala', 'svd_llm', 'svd_llm_eps', 'svd_llm_v2'):
    f, info = registry.solve(method, jnp.asarray(kernel), stats, rank=rank)
    err = reference.weighted_error(x, kernel, f.a, f.b)
    ratio[method] = err / opt[rank]
    if method == 'coala':
      assert (err - opt[rank]) / opt[0] <= 2e-6  # measured 5.9e-8
    if method == 'svd_llm_v2':  # f32 Gram has λ < 0: NaN
      assert info.nonfinite
  assert ratio['coala'] < 1.05  # measured 1.007
  assert ratio['svd_llm_eps'] > 3.0  # measured 7.0
  assert ratio['svd_llm'] > 3.0  # measured 21.1


def test_sigma_gives_every_ranks_error():
  x, kernel = _problem(1, 64, 16, 20, cond=1e3)
  f = ctxlr.ctx_factors(kernel, ctxlr.qr_r(x), rank=4)
  opt = reference.optimal_errors(x, kernel)
  errors = np.asarray(ctxlr.error_of_each_rank(f.sigma), np.float64)
  assert errors.shape == (17,) and errors[-1] == 0.0
  # rank(XK) <= d_in = 16: the reference's entries past 16 are rounding zeros.
  assert opt[16] < 1e-12 * opt[0]
  np.testing.assert_allclose(errors, opt[:17], rtol=1e-4, atol=1e-6 * opt[0])


def test_x_itself_in_place_of_r_when_short():
  # docs/method.md §2: with n < d_in, X already has the right Gram.
  x, kernel = _problem(2, 6, 16, 12)
  a = ctxlr.ctx_factors(kernel, jnp.asarray(x), rank=3)
  b = ctxlr.ctx_factors(kernel, ctxlr.qr_r(x), rank=3)
  np.testing.assert_allclose(a.a @ a.b, b.a @ b.b, atol=1e-5)


def test_float64_with_x64_is_exact():
  x, kernel = _problem(3, 96, 24, 24, cond=1e8)
  x, kernel = x.astype(np.float64), kernel.astype(np.float64)
  opt = reference.optimal_errors(x, kernel)
  with jax.enable_x64(True):
    f = ctxlr.ctx_factors(
        jnp.asarray(kernel), ctxlr.qr_r(jnp.asarray(x)), rank=20
    )
    assert f.a.dtype == jnp.float64
  err = reference.weighted_error(x, kernel, f.a, f.b)
  assert (err - opt[20]) / opt[0] < 1e-13


def test_bf16_kernel_computed_in_float32_and_cast_back():
  x, kernel = _problem(4, 64, 16, 16, cond=1e3)
  kb = jnp.asarray(kernel, jnp.bfloat16)
  f = ctxlr.ctx_factors(kb, ctxlr.qr_r(x), rank=8)
  assert f.a.dtype == jnp.bfloat16 and f.b.dtype == jnp.bfloat16
  assert f.sigma.dtype == jnp.float32
  # The float32 solve on the bf16-rounded kernel, then rounded once.
  kb64 = np.asarray(kb, np.float64)
  opt = reference.optimal_errors(x, kb64)
  err = reference.weighted_error(x, kb64, f.a, f.b)
  assert (err - opt[8]) / opt[0] < 2e-2  # bf16 rounding of a and b
  f32 = ctxlr.ctx_factors(jnp.asarray(kb64, jnp.float32), ctxlr.qr_r(x), rank=8)
  np.testing.assert_allclose(
      np.asarray(f.sigma), np.asarray(f32.sigma), rtol=1e-5
  )


def test_jit_and_vmap_over_layers():
  x, kernel = _problem(5, 64, 8, 8)
  r = ctxlr.qr_r(x)
  kernels = jnp.stack([kernel, 2 * kernel])
  rs = jnp.stack([r, r])
  f = jax.jit(jax.vmap(lambda k, r: ctxlr.ctx_factors(k, r, rank=3)))(
      kernels, rs
  )
  assert f.a.shape == (2, 8, 3)
  np.testing.assert_allclose(
      f.a[1] @ f.b[1], 2 * (f.a[0] @ f.b[0]), rtol=1e-4, atol=1e-5
  )


@pytest.mark.parametrize(
    'd_in,d_out,ratio,expected',
    [
        (576, 1536, 0.5, 209),
        (576, 576, 0.5, 144),
        (10, 10, 1e-6, 1),
        (4, 100, 1.0, 3),
    ],
)
def test_rank_for_ratio(d_in, d_out, ratio, expected):
  assert ctxlr.rank_for_ratio(d_in, d_out, ratio) == expected


def test_saves_parameters():
  assert ctxlr.linalg.saves_parameters(576, 576, 287)
  assert not ctxlr.linalg.saves_parameters(576, 576, 288)  # 288·1152 = 576²
  assert not ctxlr.linalg.saves_parameters(4, 100, 4)


@pytest.mark.parametrize(
    'call,match',
    [
        (
            lambda: ctxlr.ctx_factors(jnp.ones((4, 3)), jnp.eye(5), rank=2),
            r'r has shape \(5, 5\); expected 4 columns',
        ),
        (
            lambda: ctxlr.ctx_factors(jnp.ones(4), jnp.eye(4), rank=2),
            'kernel must be a matrix',
        ),
        (
            lambda: ctxlr.ctx_factors(jnp.ones((4, 3)), jnp.eye(4), rank=4),
            r'rank=4 is outside \[1, 3\]',
        ),
        (
            lambda: ctxlr.ctx_factors(jnp.ones((4, 3)), jnp.eye(4), rank=0),
            r'rank=0 is outside',
        ),
        (
            lambda: ctxlr.ctx_factors(jnp.ones((4, 3)), jnp.eye(4), rank=2.0),
            'rank must be a Python int',
        ),
        (
            lambda: ctxlr.ctx_factors(
                jnp.full((4, 3), jnp.nan), jnp.eye(4), rank=2
            ),
            'kernel contains 12 NaN',
        ),
        (
            lambda: ctxlr.ctx_factors(
                jnp.ones((4, 3)), jnp.eye(4).at[0, 0].set(jnp.inf), rank=2
            ),
            'r contains 1 NaN or Inf',
        ),
        (lambda: ctxlr.rank_for_ratio(4, 4, 0.0), r'ratio must be in \(0, 1\]'),
        (lambda: ctxlr.rank_for_ratio(4, 4, 1.5), r'ratio must be in \(0, 1\]'),
    ],
)
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_weighted_spectrum_is_sigma_of_rk():
  x, kernel = _problem(6, 64, 16, 24, cond=1e2)
  r = ctxlr.qr_r(x)
  expected = np.linalg.svd(
      np.asarray(x, np.float64) @ kernel, compute_uv=False
  )[:16]
  np.testing.assert_allclose(
      ctxlr.linalg.weighted_spectrum(kernel, r),
      expected,
      rtol=1e-5,
      atol=1e-6 * expected[0],
  )
  with pytest.raises(ValueError, match='r has shape'):
    ctxlr.linalg.weighted_spectrum(kernel, jnp.eye(5))


@pytest.mark.parametrize('method', ['coala', 'svd', 'svd_llm', 'corda'])
def test_new_ranks_compile_nothing(method):
  """The solvers compute every direction once per shape and truncate on the
  host, so the many ranks of an allocation cost one compile per shape; COALA's
  `a = K V` alone is compiled per padded width (a multiple of p/8), so at
  most 8 small programs per shape serve every rank."""
  x, kernel = _problem(7, 96, 12, 10)
  stats = stats_lib.stats_from_x(jnp.asarray(x), gram=True)
  registry.solve(method, kernel, stats, rank=1)  # compiles for this shape
  compiled = []

  class Grab(logging.Handler):

    def emit(self, record):
      if 'Compiling' in record.getMessage():
        compiled.append(record.getMessage())

  grab = Grab()
  logging.getLogger('jax').addHandler(grab)
  try:
    with jax.log_compiles(True):
      out = {
          r: registry.solve(method, kernel, stats, rank=r)[0]
          for r in range(2, 11)
      }
  finally:
    logging.getLogger('jax').removeHandler(grab)
  if method == 'coala':
    widths = {solvers.padded_width(r, 10) for r in range(1, 11)}
    assert all('_ctx_a' in m for m in compiled), compiled
    assert len(compiled) == len(widths) - 1 <= 7, compiled
  else:
    assert not compiled, compiled
  assert [f.a.shape[1] for f in out.values()] == list(range(2, 11))
  if method == 'coala':  # and each rank is the float64 optimum
    opt = reference.optimal_errors(x, kernel)
    for r, f in out.items():
      err = reference.weighted_error(x, kernel, f.a, f.b)
      assert (err - opt[r]) / opt[0] <= F32_EXCESS
