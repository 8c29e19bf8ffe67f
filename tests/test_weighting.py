"""coala's weighting power, the μ rules, asvd's exact-SVD option, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import baselines
from ctxlr import methods
from ctxlr import pipeline
from ctxlr import registry
from ctxlr import stats as stats_lib
from tests import toy_model


def _data(n=300, d=12, d_out=20, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * np.logspace(0, -1.5, d)
  x = x @ np.linalg.qr(rng.normal(size=(d, d)))[0]
  k = rng.normal(size=(d, d_out))
  return x, k


def _projection(k, m, rank):
  """float64 K V_r V_rᵀ, V_r the top right singular vectors of m."""
  v = np.linalg.svd(m)[2][:rank].T
  return k @ v @ v.T


def _solve(k, x, rank, **kw):
  stats = stats_lib.stats_from_x(jnp.asarray(x, jnp.float32))
  f, _ = registry.solve(
      'coala', jnp.asarray(k, jnp.float32), stats, rank=rank, **kw
  )
  return np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)


@pytest.mark.parametrize('power', [0.5, 0.75, 1.0, 1.5])
def test_power_is_the_projection_of_the_gram_power(power):
  x, k = _data()
  c = x.T @ x
  w, u = np.linalg.eigh(c)
  m = (u * np.maximum(w, 0) ** power) @ u.T @ k  # (XᵀX)^p K
  got = _solve(k, x, 5, power=power)
  ref = _projection(k, m, 5)
  assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-4


def test_half_is_the_exact_minimiser_and_one_is_worse_in_the_objective():
  x, k = _data()
  errors = {
      p: np.linalg.norm(x @ (k - _solve(k, x, 4, power=p))) for p in (0.5, 1.0)
  }
  opt = np.sqrt(np.sum(np.linalg.svd(x @ k, compute_uv=False)[4:] ** 2))
  assert abs(errors[0.5] - opt) / opt < 1e-4
  assert errors[1.0] > errors[0.5] * (1 + 1e-3)


def test_power_one_with_ridge_is_corda_without_the_inverse():
  # CorDA projects onto the top left singular vectors of W (C + δI), δ its
  # damping; power 1 with μ = δ takes the same subspace from R.
  x, k = _data(n=400)
  stats = stats_lib.stats_from_x(jnp.asarray(x, jnp.float32))
  fc, info = registry.solve('corda', jnp.asarray(k, jnp.float32), stats, rank=5)
  assert info.retries == 0
  delta = info.eps
  ref = np.asarray(fc.a, np.float64) @ np.asarray(fc.b, np.float64)
  got = _solve(k, x, 5, power=1.0, mu=delta)
  assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3


def test_power_gains_are_the_exact_error_curve():
  x, k = _data()
  r = stats_lib.stats_from_x(jnp.asarray(x, jnp.float32)).r
  for power in (0.5, 1.0):
    _, gains = methods.power_gains(
        jnp.asarray(k, jnp.float32), r, rank=1, power=power
    )
    gains = np.asarray(gains, np.float64)
    total = np.linalg.norm(x @ k) ** 2
    for rank in (2, 6):
      err2 = np.linalg.norm(x @ (k - _solve(k, x, rank, power=power))) ** 2
      np.testing.assert_allclose(total - gains[:rank].sum(), err2, rtol=2e-3)


@pytest.mark.parametrize('power', [0, -1.0, float('nan'), True, 'one'])
def test_bad_power_is_refused(power):
  x, k = _data()
  with pytest.raises(ValueError, match='power: the weighting power'):
    _solve(k, x, 3, power=power)
  with pytest.raises(ValueError, match='power: the weighting power'):
    pipeline.check_options(
        ratio=0.5,
        method='coala',
        mu=0.0,
        allocation='uniform',
        mu_rule='energy',
        mode='one_shot',
        method_options=dict(power=power),
    )


def test_options_are_checked_before_calibration():
  def exploding():
    raise AssertionError('data were read before the options were checked')
    yield  # pylint: disable=unreachable

  for options, match in (
      (dict(power=0.0), 'power'),
      (dict(pow=1.0), "takes \\['power'\\]"),
      (dict(svd='fast'), "takes \\['power'\\]"),
  ):
    with pytest.raises(ValueError, match=match):
      pipeline.compress(
          toy_model.Toy(), exploding(), ratio=0.5, method_options=options
      )
  with pytest.raises(ValueError, match='takes no options'):
    pipeline.compress(
        toy_model.Toy(),
        exploding(),
        ratio=0.5,
        method='svd_llm',
        method_options=dict(power=1.0),
    )
  with pytest.raises(ValueError, match='svd: expected one of'):
    pipeline.compress(
        toy_model.Toy(),
        exploding(),
        ratio=0.5,
        method='asvd',
        method_options=dict(svd='fast'),
    )
  with pytest.raises(ValueError, match='mu_rule must be one of'):
    pipeline.compress(
        toy_model.Toy(), exploding(), ratio=0.5, mu=1.0, mu_rule='best'
    )


def test_pipeline_passes_the_power_through():
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 12))) for _ in range(3)]
  errs = {}
  for power in (0.5, 1.0):
    report = pipeline.compress(
        toy_model.Toy(),
        batches,
        ratio=0.5,
        include=('layers.0.*',),
        method_options=dict(power=power),
    )
    errs[power] = sum(
        l['rel_err'] for l in report['layers'].values() if l['rank']
    )
  assert errs[1.0] > errs[0.5]


def test_cholesky_rule_is_svd_llm_eps_jitter():
  x, k = _data(n=6)  # rank-deficient: Cholesky fails
  stats = stats_lib.stats_from_x(jnp.asarray(x, jnp.float32))
  shift = baselines.cholesky_shift(stats.r)
  gram = jnp.matmul(stats.r.T, stats.r, precision=jax.lax.Precision.HIGHEST)
  _, info = registry.solve(
      'svd_llm_eps',
      jnp.asarray(k, jnp.float32),
      stats._replace(gram=gram),
      rank=3,
  )
  assert info.retries > 0 and shift == pytest.approx(info.eps)
  assert pipeline.layer_mu(
      jnp.asarray(k), stats.r, 2.0, rank=3, rule='cholesky'
  ) == pytest.approx(2 * shift)
  full = stats_lib.stats_from_x(jnp.asarray(_data(n=400)[0], jnp.float32))
  assert baselines.cholesky_shift(full.r) == 0.0


def test_asvd_exact_option_is_the_exact_svd_of_the_scaled_kernel():
  x, k = _data(n=200)
  stats = stats_lib.stats_from_x(jnp.asarray(x, jnp.float32))
  f, _ = registry.solve(
      'asvd', jnp.asarray(k, jnp.float32), stats, rank=4, svd='exact'
  )
  s = (np.abs(x).mean(0)) ** 0.5 + 1e-6
  w = k.T * s[None, :]  # W diag(s)
  u, sig, vt = np.linalg.svd(w)
  ref = (u[:, :4] * sig[:4]) @ vt[:4] / s[None, :]  # W'
  got = (np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)).T
  assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
  rand, _ = registry.solve('asvd', jnp.asarray(k, jnp.float32), stats, rank=4)
  # The exact SVD is optimal in ASVD's own norm ||(W − W') diag(s)||.
  err = lambda g: np.linalg.norm(
      ((np.asarray(g.a, np.float64) @ np.asarray(g.b, np.float64)).T - k.T)
      * s[None, :]
  )
  assert err(f) <= err(rand) * (1 + 1e-6)


def test_asvd_rms_scale_is_exact_for_uncorrelated_channels():
  rng = np.random.default_rng(4)
  q = np.linalg.qr(rng.normal(size=(200, 10)))[0]
  x = q * np.logspace(1, -1, 10)  # XᵀX diagonal
  k = rng.normal(size=(10, 14))
  stats = stats_lib.stats_from_x(jnp.asarray(x, jnp.float32))
  f, _ = registry.solve(
      'asvd',
      jnp.asarray(k, jnp.float32),
      stats,
      rank=3,
      svd='exact',
      scale='rms',
      alpha=1.0,
  )
  got = np.linalg.norm(
      x @ (k - np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64))
  )
  opt = np.sqrt(np.sum(np.linalg.svd(x @ k, compute_uv=False)[3:] ** 2))
  assert abs(got - opt) / opt < 1e-4
  with pytest.raises(ValueError, match='alpha: expected a finite number'):
    registry.solve(
        'asvd', jnp.asarray(k, jnp.float32), stats, rank=3, alpha=0.0
    )
  with pytest.raises(ValueError, match='scale: expected one of'):
    registry.solve(
        'asvd', jnp.asarray(k, jnp.float32), stats, rank=3, scale='max'
    )
