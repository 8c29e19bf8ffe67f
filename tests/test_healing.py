"""Healing the factors of a compressed model (ctxlr/healing.py)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import healing
from ctxlr import pipeline
from ctxlr import training
from tests import toy_model


def _compressed():
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 12))) for _ in range(3)]
  model = toy_model.Toy()
  pipeline.compress(model, batches, ratio=0.5, include=('layers.*',))
  return model


def _seqs(n=8):
  return np.asarray(np.random.default_rng(1).integers(0, 64, (n, 12)), np.int32)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(), 'needs a budget'),
        (dict(seconds=0.0), 'seconds: the time budget'),
        (dict(seconds=-5.0), 'seconds: the time budget'),
        (dict(steps=0), 'steps: the step budget'),
        (dict(steps=2.5), 'steps: the step budget'),
        (dict(steps=2, learning_rate=0.0), 'learning_rate'),
        (dict(steps=2, batch_size=0), 'batch_size'),
    ],
)
def test_bad_budgets_raise_before_training(kwargs, match):
  model = _compressed()
  with pytest.raises(ValueError, match=match):
    healing.heal(model, _seqs(), **kwargs)


def test_no_factors_raises():
  with pytest.raises(ValueError, match='no FactoredLinear'):
    healing.heal(toy_model.Toy(), _seqs(), steps=1)


def test_steps_train_only_the_factors_and_lower_the_loss():
  model = _compressed()
  rest = nnx.All(nnx.Param, nnx.Not(training.factor_filter(model)))
  frozen = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, rest))]
  factors = [
      np.asarray(v)
      for v in jax.tree.leaves(nnx.state(model, training.factor_filter(model)))
  ]
  seqs = _seqs()
  before = float(training.next_token_loss(model, jnp.asarray(seqs)))
  seen = []
  history = healing.heal(
      model,
      seqs,
      steps=12,
      learning_rate=3e-3,
      batch_size=4,
      warmup_fraction=0.0,
      eval_fn=lambda m: dict(n=len(seen.append(1) or seen)),
      progress=False,
  )
  after = float(training.next_token_loss(model, jnp.asarray(seqs)))
  assert history['steps'] == 12 and len(history['train']) == 12
  assert [e['step'] for e in history['eval']] == [0, 12]
  assert after < before
  now = jax.tree.leaves(nnx.state(model, rest))
  assert len(now) == len(frozen) > 0
  for got, want in zip(now, frozen):
    np.testing.assert_array_equal(np.asarray(got), want)
  moved = jax.tree.leaves(nnx.state(model, training.factor_filter(model)))
  assert all(np.any(np.asarray(m) != f) for m, f in zip(moved, factors))
  assert history['trainable'] == sum(f.size for f in factors)


def test_time_budget_stops_and_schedule():
  model = _compressed()
  history = healing.heal(
      model, _seqs(), seconds=3.0, learning_rate=1e-4, progress=False
  )
  assert history['seconds'] >= 3.0 and history['steps'] >= 1
  assert history['seconds'] - history['train'][-1]['seconds'] == 0
  assert healing.learning_rate_at(0.0, 1.0, warmup_fraction=0.1) == 0.0
  assert healing.learning_rate_at(0.1, 1.0, warmup_fraction=0.1) == 1.0
  assert healing.learning_rate_at(1.0, 1.0, warmup_fraction=0.1) == (
      pytest.approx(0.0)
  )
  assert healing.learning_rate_at(0.55, 2.0, warmup_fraction=0.1) == (
      pytest.approx(1.0)
  )
