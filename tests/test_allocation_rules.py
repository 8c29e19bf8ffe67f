"""Loss-driven and peer rank allocations (ctxlr/allocation.py, §7)."""

import itertools

import numpy as np
import pytest

from ctxlr import allocation
from ctxlr.linalg import solvers


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {
      'a.q_proj': (6, 8),
      'a.down_proj': (8, 6),
      'b.q_proj': (6, 8),
      'b.down_proj': (8, 6),
  }
  gains = {
      n: np.sort(rng.exponential(size=min(s)))[::-1] * rng.uniform(0.1, 10)
      for n, s in shapes.items()
  }
  return shapes, gains


def _cost(shapes, ranks):
  return sum(
      d_in * d_out if ranks[n] is None else ranks[n] * (d_in + d_out)
      for n, (d_in, d_out) in shapes.items()
  )


def _loss(gains, ranks):
  return sum(
      0.0 if r is None else g[r:].sum()
      for g, r in ((gains[n], ranks[n]) for n in gains)
  )


def test_weighted_ranks_fit_the_budget_and_beat_uniform():
  shapes, gains = _problem()
  for ratio in (0.3, 0.5, 0.7):
    ranks = allocation.weighted_ranks(shapes, gains, ratio)
    budget = ratio * sum(a * b for a, b in shapes.values())
    assert _cost(shapes, ranks) <= budget
    uniform = allocation.uniform_ranks(shapes, ratio)
    assert _loss(gains, ranks) <= _loss(gains, uniform) + 1e-12


def test_weighted_ranks_match_brute_force_on_concave_curves():
  # With non-increasing gains and equal costs within a layer, the greedy is
  # optimal up to the last step that does not fit; compare to every
  # allocation that fits.
  shapes, gains = _problem(1)
  ratio = 0.5
  budget = ratio * sum(a * b for a, b in shapes.values())
  ranks = allocation.weighted_ranks(shapes, gains, ratio, allow_dense=False)
  choices = [
      range(1, allocation.max_saving_rank(*s) + 1) for s in shapes.values()
  ]
  best = min(
      _loss(gains, dict(zip(shapes, c)))
      for c in itertools.product(*choices)
      if _cost(shapes, dict(zip(shapes, c))) <= budget
  )
  step = max(g.max() for g in gains.values())
  assert best <= _loss(gains, ranks) <= best + step


def test_dense_step_keeps_the_most_sensitive_layer_dense():
  shapes = {'x': (8, 8), 'y': (8, 8)}
  gains = {'x': np.full(8, 1e6), 'y': np.full(8, 1e-6)}
  # Budget 96 = rank 1 twice (32) + 64: x's two rank steps and its dense
  # step (16 each) and one step of y.
  ranks = allocation.weighted_ranks(shapes, gains, 0.75)
  assert ranks['x'] is None and ranks['y'] == 2
  ranks = allocation.weighted_ranks(shapes, gains, 0.75, allow_dense=False)
  assert ranks['x'] == allocation.max_saving_rank(8, 8) and ranks['y'] == 3


def test_pool_adjacent_values_are_non_increasing_and_keep_totals():
  gains = np.array([1.0, 3.0, 0.5, 2.0, 0.1])
  costs = np.array([1.0, 1.0, 1.0, 2.0, 1.0])
  values = allocation._pool_adjacent(gains, costs)
  assert np.all(np.diff(values) <= 1e-12)
  np.testing.assert_allclose((values * costs).sum(), gains.sum())


def test_fisher_ranks_weight_the_curves():
  shapes = {'x': (8, 8), 'y': (8, 8)}
  g = np.linspace(2, 1, 8)
  even = allocation.fisher_ranks(
      shapes, {'x': g, 'y': g}, {'x': 1.0, 'y': 1.0}, 0.75, allow_dense=False
  )
  assert even['x'] == even['y'] == 3
  tilted = allocation.fisher_ranks(
      shapes,
      {'x': g, 'y': 2 * g},
      {'x': 100.0, 'y': 1.0},
      0.75,
      allow_dense=False,
  )
  assert tilted['x'] == 3 and tilted['y'] == 3  # both fit, capped
  tilted = allocation.fisher_ranks(
      shapes,
      {'x': g, 'y': 2 * g},
      {'x': 100.0, 'y': 1.0},
      0.6,
      allow_dense=False,
  )
  assert tilted['x'] == 3 and tilted['y'] == 1
  with pytest.raises(ValueError, match='finite and >= 0'):
    allocation.fisher_ranks(
        shapes, {'x': g, 'y': g}, {'x': -1.0, 'y': 1.0}, 0.5
    )
  with pytest.raises(ValueError, match='no entry'):
    allocation.fisher_ranks(shapes, {'x': g, 'y': g}, {'x': 1.0}, 0.5)


@pytest.mark.parametrize('ratio', [0.0, 1.5, True])
def test_bad_ratio(ratio):
  shapes, gains = _problem()
  with pytest.raises(ValueError, match='ratio must be in'):
    allocation.weighted_ranks(shapes, gains, ratio)


def test_infeasible_budget_raises():
  shapes = {'x': (100, 100)}
  with pytest.raises(ValueError, match='rank 1 in every layer'):
    allocation.weighted_ranks(shapes, {'x': np.ones(100)}, 0.01)


def _v2_reference(shapes, sigmas, ratio):
  """SVD-LLM V2 §3.1 in plain float64: R_i ∝ 1/log L_i per module type."""
  groups = {}
  for n, (d_in, d_out) in shapes.items():
    r = solvers.rank_for_ratio(d_in, d_out, ratio)
    groups.setdefault(n.split('.')[-1], []).append(
        (n, np.sqrt(np.sum(np.asarray(sigmas[n], np.float64)[r:] ** 2)))
    )
  kept = {}
  for items in groups.values():
    inv = np.array([1 / np.log(l) for _, l in items])
    for (n, _), x in zip(items, inv):
      kept[n] = 1 - len(items) * (1 - ratio) * x / inv.sum()
  return kept


def test_svd_llm_v2_ranks_follow_the_formula():
  rng = np.random.default_rng(2)
  shapes = {f'{b}.{t}': (40, 60) for b in range(3) for t in ('q', 'k')}
  sigmas = {
      n: np.sort(rng.uniform(1, 50, 40))[::-1] * (1 + i)
      for i, n in enumerate(shapes)
  }
  ranks = allocation.svd_llm_v2_ranks(shapes, sigmas, 0.6)
  kept = _v2_reference(shapes, sigmas, 0.6)
  for n, (d_in, d_out) in shapes.items():
    assert ranks[n] == solvers.rank_for_ratio(d_in, d_out, kept[n])
  # A larger truncation loss keeps more: block 2 (largest σ) > block 0.
  assert ranks['2.q'] > ranks['0.q']
  with pytest.raises(ValueError, match="layer '0.q' has truncation loss"):
    allocation.svd_llm_v2_ranks(
        shapes, {n: s * 1e-3 for n, s in sigmas.items()}, 0.6
    )


def test_coala_hetero_ranks_follow_their_code():
  rng = np.random.default_rng(3)
  shapes = {f'{b}.{t}': (30, 50) for b in range(4) for t in ('q', 'up')}
  sigmas = {
      n: np.sort(rng.exponential(1 + i, 30))[::-1] for i, n in enumerate(shapes)
  }
  ratio = 0.5
  ranks = allocation.coala_hetero_ranks(shapes, sigmas, ratio)
  for t in ('q', 'up'):
    names = [n for n in shapes if n.endswith('.' + t)]
    losses = []
    for n in names:
      s = np.square(sigmas[n]) / np.square(sigmas[n]).sum()
      r = int(np.floor(ratio * 30 * 50 / 80))
      losses.append(np.sum(np.square(s[r:])))
    inv = 1 / np.log(np.array(losses))
    for n, x in zip(names, inv):
      kept = 1 - len(names) * (1 - ratio) * x / inv.sum()
      assert ranks[n] == solvers.rank_for_ratio(30, 50, kept)
  # The budget is spent on average as uniform's (rounding aside).
  assert abs(allocation.kept_ratio(shapes, ranks) - ratio) < 0.05


def test_infeasible_budget_is_refused_before_calibration():
  """compress refuses a ratio no rank can meet before it reads any batch."""
  from ctxlr import pipeline  # pylint: disable=g-import-not-at-top
  from tests import toy_model  # pylint: disable=g-import-not-at-top

  def batches():
    raise AssertionError('calibration started')
    yield  # pylint: disable=unreachable

  for rule in ('uniform', 'global', 'fisher'):
    with pytest.raises(
        ValueError, match='infeasible budget.*smallest feasible'
    ):
      pipeline.compress(toy_model.Toy(), batches(), ratio=0.01, allocation=rule)
  with pytest.raises(ValueError, match='infeasible budget'):
    allocation.global_ranks({'x': (100, 100)}, {'x': np.ones(100)}, 0.01)
