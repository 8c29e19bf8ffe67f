"""Loss-gradient energy at layer outputs (ctxlr/sensitivity.py)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import pipeline
from ctxlr import sensitivity
from ctxlr import surgery
from ctxlr import training
from tests import toy_model


def _ids(seed=0, rows=2):
  return jax.random.randint(jax.random.key(seed), (rows, 12), 0, 64)


class _Shifted(nnx.Module):
  """A layer whose output is shifted by a trainable delta (the reference)."""

  def __init__(self, inner, shape):
    self.inner = inner
    self.delta = nnx.Param(jnp.zeros(shape))

  def __call__(self, x):
    return self.inner(x) + self.delta[...]


@pytest.mark.parametrize(
    'name', ['layers.0.attn.v_proj', 'layers.1.mlp.down_proj']
)
def test_energy_is_the_sum_of_squared_output_gradients(name):
  model = toy_model.Toy()
  ids = _ids()
  names = list(surgery.select_linears(model, ('*_proj',), ()))
  energy = sensitivity.output_gradient_energy(model, [ids], names)
  assert set(energy) == set(names)
  assert energy[name].tokens == ids.size
  # Reference: the gradient of each row's loss w.r.t. an additive shift of
  # the layer's output, squared and summed over tokens.
  layer = surgery.get_module(model, name)
  d_out = layer.kernel.shape[1]
  surgery.replace_module(model, name, _Shifted(layer, (1, 12, d_out)))
  want = np.zeros(d_out)
  for row in range(2):
    grads = nnx.grad(
        lambda m: training.next_token_loss(m, ids[row : row + 1]),
        argnums=nnx.DiffState(0, nnx.PathContains('delta')),
    )(model)
    (g,) = [v.get_value() for _, v in nnx.to_flat_state(grads)]
    want += np.square(np.asarray(g, np.float64)).sum((0, 1))
  np.testing.assert_allclose(energy[name].channel, want, rtol=1e-4, atol=1e-12)
  assert energy[name].mean == pytest.approx(
      want.sum() / (ids.size * d_out), rel=1e-4
  )


def test_model_is_unchanged_and_json_round_trips():
  model = toy_model.Toy()
  before = model(_ids())
  names = ['layers.0.attn.q_proj', 'layers.1.attn.o_proj']
  energy = sensitivity.output_gradient_energy(
      model, [_ids(1)], names, micro_batch=2
  )
  np.testing.assert_array_equal(model(_ids()), before)
  assert isinstance(model.layers[0].attn.q_proj, nnx.Linear)
  back = sensitivity.from_json(sensitivity.to_json(energy))
  for n in names:
    np.testing.assert_array_equal(back[n].channel, energy[n].channel)
    assert back[n].tokens == energy[n].tokens


def test_bad_arguments():
  model = toy_model.Toy()
  with pytest.raises(ValueError, match='calibration stream is empty'):
    sensitivity.output_gradient_energy(model, [], ['layers.0.attn.q_proj'])
  with pytest.raises(ValueError, match='micro_batch'):
    sensitivity.output_gradient_energy(
        model, [_ids()], ['layers.0.attn.q_proj'], micro_batch=0
    )
  with pytest.raises(ValueError, match='layers is empty'):
    sensitivity.output_gradient_energy(model, [_ids()], [])


def test_fisher_allocation_through_the_pipeline():
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 12))) for _ in range(3)]
  report = pipeline.compress(
      toy_model.Toy(), batches, ratio=0.6, allocation='fisher'
  )
  assert report['kept_ratio'] <= 0.6 + 1e-9
  assert 'sensitivity' in report['seconds']
  ranks = {n: l['rank'] for n, l in report['layers'].items()}
  uniform = pipeline.compress(toy_model.Toy(), batches, ratio=0.6)
  assert ranks != {n: l['rank'] for n, l in uniform['layers'].items()}
  # Given weights are used as they are: one layer weighted up keeps more.
  names = list(report['layers'])
  weights = {n: 1.0 for n in names}
  weights['layers.0.mlp.down_proj'] = 1e6
  heavy = pipeline.compress(
      toy_model.Toy(),
      batches,
      ratio=0.6,
      allocation='fisher',
      sensitivity=weights,
  )
  layer = heavy['layers']['layers.0.mlp.down_proj']
  assert (
      layer['rank'] is None or layer['rank'] > ranks['layers.0.mlp.down_proj']
  )
  with pytest.raises(ValueError, match='needs the layers'):
    stats = {n: None for n in names}
    pipeline.assign_ranks(
        {n: (16, 16) for n in names}, {}, stats, ratio=0.5, allocation='fisher'
    )


def test_the_two_controls_of_fisher():
  rng = np.random.default_rng(1)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 12))) for _ in range(3)]
  names = list(surgery.select_linears(toy_model.Toy(), ('*_proj',), ()))
  weights = {n: 1.0 for n in names}
  weights['layers.0.attn.v_proj'] = 1e9
  for allocation in ('fisher', 'fisher_factored', 'global_dense'):
    report = pipeline.compress(
        toy_model.Toy(),
        batches,
        ratio=0.7,
        allocation=allocation,
        sensitivity=weights,
    )
    ranks = {n: l['rank'] for n, l in report['layers'].items()}
    assert report['kept_ratio'] <= 0.7 + 1e-9
    if allocation == 'fisher':
      assert ranks['layers.0.attn.v_proj'] is None
    if allocation == 'fisher_factored':
      assert all(r is not None for r in ranks.values())
