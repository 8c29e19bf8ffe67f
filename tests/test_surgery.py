"""Layer selection, FactoredLinear and in-place swaps on a toy NNX model."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import surgery
from tests import toy_model


def test_select_default_excludes_embeddings_and_head():
  shapes = surgery.select_linears(toy_model.Toy())
  assert list(shapes)[:4] == ['layers.0.attn.k_proj', 'layers.0.attn.o_proj',
                              'layers.0.attn.q_proj', 'layers.0.attn.v_proj']
  assert len(shapes) == 14 and not any('head' in n for n in shapes)
  assert shapes['layers.1.mlp.down_proj'] == (40, 16)


def test_select_patterns_and_numeric_order():
  model = toy_model.Toy(layers=11)
  shapes = surgery.select_linears(model, include=('*.q_proj',))
  assert list(shapes)[-2:] == ['layers.9.attn.q_proj', 'layers.10.attn.q_proj']
  shapes = surgery.select_linears(model, include=('layers.1.*',),
                                  exclude=('*.attn.*',))
  assert list(shapes) == ['layers.1.mlp.down_proj', 'layers.1.mlp.gate_proj',
                          'layers.1.mlp.up_proj']


def test_select_raises_on_pattern_without_match():
  with pytest.raises(ValueError, match=r"Pattern '\*nope\*' matches no"):
    surgery.select_linears(toy_model.Toy(), include=('*nope*',))
  with pytest.raises(ValueError, match='No handled layer matches'):
    surgery.select_linears(toy_model.Toy(), exclude=('*',))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_full_rank_factors_keep_outputs(dtype):
  model = toy_model.Toy()
  ids = jnp.arange(12).reshape(2, 6)
  before = model(ids)
  for name in surgery.select_linears(model):
    linear = surgery.get_module(model, name)
    k = np.asarray(linear.kernel[...], np.float64)
    u, s, vt = np.linalg.svd(k, full_matrices=False)    # exact, full rank
    new = surgery.factored_from_linear(
        linear, jnp.asarray(u * s, dtype), jnp.asarray(vt, dtype))
    surgery.replace_module(model, name, new)
    assert new.a.dtype == jnp.float32       # the Linear's storage dtype kept
  assert isinstance(model.layers[1].mlp.up_proj, surgery.FactoredLinear)
  assert model.layers[0].attn.o_proj.bias is not None
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(model(ids), before, rtol=tol, atol=tol)


def test_factored_linear_bf16_storage_float32_compute():
  a = jnp.ones((4, 2), jnp.bfloat16)
  b = jnp.ones((2, 3), jnp.bfloat16)
  layer = surgery.FactoredLinear(a, b, jnp.zeros(3, jnp.bfloat16))
  y = layer(jnp.full((1, 4), 1 / 3, jnp.float32))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, np.full((1, 3), 8 / 3), rtol=1e-6)
  assert layer.rank == 2 and layer.in_features == 4 and layer.out_features == 3


def test_factored_linear_shape_errors():
  with pytest.raises(ValueError, match='do not chain'):
    surgery.FactoredLinear(jnp.ones((4, 2)), jnp.ones((3, 3)))
  with pytest.raises(ValueError, match=r'bias has shape \(2,\)'):
    surgery.FactoredLinear(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.ones(2))


def test_swapped_model_jits_and_splits():
  model = toy_model.Toy()
  name = 'layers.0.mlp.down_proj'
  linear = surgery.get_module(model, name)
  surgery.replace_module(model, name, surgery.factored_from_linear(
      linear, linear.kernel[...], jnp.eye(16)))
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(state, jnp.ones(
      (1, 3), jnp.int32))
  assert out.shape == (1, 3, 64)


def test_unhandled_layers_are_listed_and_warned_once(caplog):
  model = toy_model.Unhandled()
  with caplog.at_level('WARNING'):
    shapes = surgery.select_linears(model)
  assert shapes == {'proj': (6, 6)}
  warnings = [r for r in caplog.records if 'does not factor' in r.message]
  assert len(warnings) == 1
  assert 'conv (Conv' in warnings[0].message
  assert 'custom (Custom: params w)' in warnings[0].message
  assert set(surgery.unhandled_layers(model)) == {'conv', 'custom'}
  assert surgery.unhandled_layers(model, exclude=('conv',)) == {
      'custom': 'Custom: params w'}


def test_include_must_be_a_sequence():
  with pytest.raises(ValueError, match='sequences of patterns'):
    surgery.select_linears(toy_model.Toy(), include='*up*')


@pytest.mark.parametrize('allocation', ['uniform', 'global'])
def test_ratio_one_leaves_every_layer_unchanged(allocation):
  from ctxlr import pipeline  # pylint: disable=g-import-not-at-top
  model = toy_model.Toy(d=32, f=128)                 # 32 x 128 MLP layers
  ids = jnp.arange(24).reshape(2, 12) % 64
  before = model(ids)
  kernels = {n: surgery.kernel_matrix(model, n)
             for n in surgery.select_linears(model)}
  report = pipeline.compress(model, [ids], ratio=1.0, allocation=allocation)
  assert all(row['rank'] is None for row in report['layers'].values())
  assert report['kept_ratio'] == report['model_ratio'] == 1.0
  assert not any(isinstance(m, surgery.FactoredLinear)
                 for _, m in nnx.iter_modules(model))
  for n, k in kernels.items():
    np.testing.assert_array_equal(surgery.kernel_matrix(model, n), k)
  np.testing.assert_array_equal(model(ids), before)
