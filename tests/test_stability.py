"""The stability experiment and the solver benchmark (quick sizes)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr import registry
from ctxlr import results
from ctxlr import stats as stats_lib
from experiments import scoring
from experiments import stability

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=600):
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1')  # shared CI cores
  return subprocess.run(
      [sys.executable, 'launch.py', *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


@pytest.mark.parametrize('n,d', [(48, 16), (10, 16)])
def test_synthetic_x_has_exactly_the_singular_values(n, d):
  rng = np.random.default_rng(0)
  x = stability.synthetic_x(rng, n, d, cond=1e6, rank=min(n, d) - 2)
  s = np.linalg.svd(x, compute_uv=False)
  expected = np.zeros(min(n, d))
  expected[: min(n, d) - 2] = np.logspace(0, -6, min(n, d) - 2)
  assert x.shape == (n, d)
  np.testing.assert_allclose(s, expected, rtol=1e-9, atol=1e-14)


def test_errors_from_r_match_errors_from_x():
  rng = np.random.default_rng(1)
  x = reference.activations(rng, 80, 12, cond=1e4)
  kernel = rng.standard_normal((12, 9))
  a, b = rng.standard_normal((12, 9)), rng.standard_normal((9, 9))
  got = scoring.errors_at_ranks(reference.r_factor(x), kernel, a, b, [2, 5, 9])
  want = [
      reference.weighted_error(x, kernel, a[:, :r], b[:r]) for r in (2, 5, 9)
  ]
  np.testing.assert_allclose(got, want, rtol=1e-11)


def test_one_solve_at_the_largest_rank_equals_a_solve_per_rank():
  rng = np.random.default_rng(2)
  x = reference.activations(rng, 96, 16, cond=1e3).astype(np.float32)
  kernel = rng.standard_normal((16, 12)).astype(np.float32)
  stats = stats_lib.stats_from_x(jnp.asarray(x))
  w, ranks = reference.r_factor(x), [3, 7, 12]
  scale = reference.optimal_errors(x, kernel)[0]
  for method in scoring.PREFIX_METHODS:
    prefix = scoring.solve_and_score(method, kernel, stats, w, ranks)
    for rank, (err, info) in zip(ranks, prefix):
      f, direct_info = registry.solve(
          method, jnp.asarray(kernel), stats, rank=rank
      )
      direct = reference.weighted_error(x, kernel, f.a, f.b)
      assert abs(err - direct) <= 1e-5 * scale, (method, rank, err, direct)
      assert info == direct_info, (method, rank)


def test_stability_quick_synthetic(tmp_path):
  proc = _launch(
      '--config=experiments/configs/stability.py:quick',
      f'--workdir={tmp_path}',
      "--config.parts=('synthetic',)",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = results.read_json(str(tmp_path / 'results.json'))['synthetic']
  methods = set(registry.names(float64=False)) | {stability.BF16}
  cases = {(r['n'], r['case']) for r in rows}
  assert cases == {
      (16, 'cond 1e+00'),
      (16, 'cond 1e+08'),
      (128, 'cond 1e+00'),
      (128, 'cond 1e+08'),
      (128, 'rank-def'),
  }
  for case in cases:
    assert {r['method'] for r in rows if (r['n'], r['case']) == case} == (
        methods
    )
  hard = {
      (r['method'], r['rank']): r
      for r in rows
      if (r['n'], r['case']) == (128, 'cond 1e+08')
  }
  assert hard['coala', 16]['err_over_opt'] < 1 + 1e-3  # half rank: optimal
  for rank in (16, 30):  # where the float32 Gram routes lose digits
    for method in ('svd_llm', 'svd_llm_eps', 'corda'):
      assert hard['coala', rank]['excess'] < hard[method, rank]['excess'], (
          method,
          rank,
      )
  for name in ('error_vs_rank.png', 'excess_vs_cond.png'):
    assert (tmp_path / name).stat().st_size > 0
  assert '| cond 1e+08 | 16 |' in (tmp_path / 'summary.md').read_text()


def test_stability_quick_real_activations(tmp_path):
  proc = _launch(
      '--config=experiments/configs/stability.py:quick',
      f'--workdir={tmp_path}',
      "--config.parts=('real_layer', 'real_all')",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  layer = out['real_layer']
  assert layer['layer'] == 'layers.0.attn.o_proj'
  assert 1 < layer['cond_r'] < 1e12 and layer['complete']
  assert {r['method'] for r in layer['rows']} == (
      set(registry.names(float64=False)) | {stability.BF16}
  )
  rows = out['real_all']['rows']
  assert {r['layer'] for r in rows} == {
      'layers.0.attn.k_proj',
      'layers.0.attn.o_proj',
  }
  ctx = [
      r
      for r in rows
      if r['method'] == 'coala' and r['rule'].startswith('ratio')
  ]
  assert len(ctx) == 2 and all(r['err_over_opt'] < 1 + 1e-3 for r in ctx)
  assert (tmp_path / 'real_layers.png').stat().st_size > 0
  assert 'lost more than 1%' in (tmp_path / 'summary.md').read_text()


def test_bench_solvers_quick(tmp_path):
  proc = _launch(
      '--config=experiments/configs/bench_solvers.py:quick',
      f'--workdir={tmp_path}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  assert {(r['d_in'], r['d_out'], r['method']) for r in out['solve']} == {
      (d_in, d_out, m)
      for d_in, d_out in ((64, 64), (64, 128))
      for m in ('coala', 'svd_llm', 'svd_llm_v2')
  }
  for r in out['solve']:
    assert np.isfinite(r['ratio']) and r['ratio'] > 0 and r['calls'] >= 5
    assert r['ratio'] == 1.0 or r['method'] != 'svd_llm'
  for r in out['stream']:
    for key in ('fold_over_gram', 'tpqrt_over_gram', 'qr_block_over_gram'):
      assert np.isfinite(r[key]) and r[key] > 0, key
  assert {p['piece'] for p in out['profile']} >= {'whole solve', 'SVD of R K'}
  assert (tmp_path / 'bench_solvers.png').stat().st_size > 0
  assert 'coala/svd_llm' in (tmp_path / 'summary.md').read_text()
