"""K_μ → K_*: the proven bound, slope 1, Theorem 3, and the experiment.

K_μ is the library's regularized solve `ctx_factors(K, regularize_r(R, μ))`
in float64; K_* comes from `k_star` (checked against NumPy
references in test_desired.py). docs/theory.md has the statements.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr import results
from ctxlr.linalg import kstar
from ctxlr.linalg import qr
from ctxlr.linalg import solvers
from experiments import convergence
from experiments.configs import convergence as convergence_config

MUS = tuple(10.0**-e for e in range(1, 9))  # 1e-1 … 1e-8
SPECS = {  # d_in, d_out, n, rank, make_problem extras
    'few_tokens': (30, 40, 6, 10, {}),
    'deficient_x': (24, 16, 64, 8, dict(x_rank=4)),
    'gap': (24, 16, 64, 6, {}),
    'tie': (16, 24, 64, 6, dict(tie=(4, 4))),
}


def _curve(name, seed):
  """(structure, ||K_*||, K_*, K, X, [(μ, ||K_μ − K_*||, K_μ)])."""
  d_in, d_out, n, rank, extra = SPECS[name]
  x, kernel = reference.make_problem(
      np.random.default_rng(seed),
      d_in=d_in,
      d_out=d_out,
      n=n,
      rank=rank,
      **extra,
  )
  with jax.enable_x64(True):
    r = qr.qr_r(jnp.asarray(x))
    st = kstar.solution_structure(kernel, r, rank=rank)
    f = kstar.k_star(kernel, r, rank=rank)
    k_star = np.asarray(f.a) @ np.asarray(f.b)
    out = []
    for mu in MUS:
      fm = solvers.ctx_factors(
          jnp.asarray(kernel), qr.regularize_r(r, mu), rank=rank
      )
      k_mu = np.asarray(fm.a) @ np.asarray(fm.b)
      out.append((mu, np.linalg.norm(k_mu - k_star), k_mu))
  return st, k_star, kernel, x, out


@pytest.mark.parametrize('name', list(SPECS))
def test_bound_holds_and_slope_is_one(name):
  slopes = []
  for seed in range(12):
    st, k_star, _, _, curve = _curve(name, seed)
    assert (
        st.case
        == {
            'few_tokens': 'deficient',
            'deficient_x': 'deficient',
            'gap': 'gap',
            'tie': 'tie',
        }[name]
    )
    valid = []
    for mu, dist, _ in curve:
      bound = kstar.error_bound(st, mu)
      assert dist <= bound, (name, seed, mu, dist, bound)
      if np.isfinite(bound):
        valid.append((mu, dist))
    # The theorem applies from some μ on, and then the rate is linear.
    assert len(valid) >= 3 and valid[-1][0] == MUS[-1], (name, seed, valid)
    slopes.append(convergence.fit_slope(*zip(*valid[-5:])))
  assert np.all(np.abs(np.array(slopes) - 1) <= 0.05), (name, slopes)


@pytest.mark.parametrize('name', ['few_tokens', 'deficient_x', 'tie'])
def test_regularized_never_changes_k_more_than_k_star(name):
  """Theorem 3: ‖K − K_μ‖ <= ‖K − K_*‖, f(K_μ) − f* <= μ‖K − K_*‖²."""
  for seed in range(4):
    _, k_star, kernel, x, curve = _curve(name, seed)
    plain_star = np.linalg.norm(kernel - k_star)
    f_star = np.linalg.norm(x @ (kernel - k_star)) ** 2
    for mu, _, k_mu in curve:
      assert np.linalg.norm(kernel - k_mu) <= plain_star * (1 + 1e-12)
      excess = np.linalg.norm(x @ (kernel - k_mu)) ** 2 - f_star
      assert (
          -1e-12 * f_star - 1e-24 <= excess <= mu * plain_star**2 * (1 + 1e-9)
      ), (mu, excess)


def test_error_ratio_rule_collapses_when_data_are_insufficient():
  """docs/method.md §4: rank(XK) <= r makes the error-ratio μ vanish.

  The energy rule does not vanish.
  """
  d_in, d_out, n, rank, extra = SPECS['few_tokens']
  x, kernel = reference.make_problem(
      np.random.default_rng(0), d_in=d_in, d_out=d_out, n=n, rank=rank, **extra
  )
  with jax.enable_x64(True):
    r = qr.qr_r(jnp.asarray(x))
    energy = float(solvers.layer_mu(kernel, r, 1e-3, rank=rank))
    ratio = float(
        solvers.layer_mu(kernel, r, 1e-3, rank=rank, rule='error_ratio')
    )
  assert energy == pytest.approx(1e-3 * np.sum(x**2) / d_in, rel=1e-12)
  assert ratio <= 1e-20 * energy, (ratio, energy)


def test_quick_experiment(tmp_path):
  config = convergence_config.get_config('quick')
  convergence.run(config, str(tmp_path))
  for name in ('results.json', 'summary.md', 'convergence.png', 'errors.png'):
    assert os.path.getsize(tmp_path / name) > 0, name
  res = results.read_json(tmp_path / 'results.json')
  summary = res['summary']
  assert {r['setting'] for r in summary} == set(config.settings_order)
  assert len(summary) == len(config.settings_order) * config.num_seeds
  for row in summary:
    assert row['bound_holds'] and row['tikhonov_holds'], row
    assert abs(row['slope'] - 1) <= 0.05, row
    if row['case'] == 'gap':
      assert row['mu0_rel_dist'] < 1e-12  # K_0 = K_*
    else:
      assert row['mu0_rel_dist'] > 0.1  # K_0 ≠ K_*
      assert row['mu0_rel_plain'] > row['star_rel_plain']
  f64 = [r for r in res['curves'] if r['dtype'] == 'float64' and r['mu']]
  assert len(f64) == len(summary) * len(config.mus)
  os.remove(tmp_path / 'convergence.png')
  convergence.plot(str(tmp_path))  # redraw from JSON
  assert os.path.getsize(tmp_path / 'convergence.png') > 0
