"""Linen models: calibration through nn.intercept_methods, params surgery."""

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctxlr
from ctxlr import linen as ctxlr_linen
from ctxlr import reference
from ctxlr import surgery


class Block(nn.Module):
  """DenseGeneral projections in and out of heads, a Dense MLP."""

  @nn.compact
  def __call__(self, x, _=None):
    q = nn.DenseGeneral((2, 4), name='q')(x)
    h = x + nn.DenseGeneral(8, axis=(-2, -1), name='o')(jnp.tanh(q))
    return (
        h + nn.Dense(8, name='down')(jax.nn.silu(nn.Dense(16, name='up')(h))),
        None,
    )


class Scanned(nn.Module):
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name='inp')(x)
    stack = nn.scan(
        Block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        length=self.layers,
    )
    x, _ = stack(name='blocks')(x, None)
    return nn.Dense(5, name='head')(x)


class Unrolled(nn.Module):
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name='inp')(x)
    for i in range(self.layers):
      x, _ = Block(name=f'blocks_{i}')(x)
    return nn.Dense(5, name='head')(x)


def _unrolled_params(params, layers=3):
  out = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(layers):
    out[f'blocks_{i}'] = jax.tree.map(lambda a: a[i], params['blocks'])
  return out


@pytest.fixture(scope='module')
def scanned():
  model = Scanned()
  rng = np.random.default_rng(0)
  batches = [
      jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32) for _ in range(2)
  ]
  variables = model.init(jax.random.key(0), batches[0])
  return model, variables, batches


def test_select_names_scanned_layers_by_linen_path(scanned):
  model, variables, batches = scanned
  shapes = ctxlr_linen.select(model.apply, variables, batches[0])
  assert shapes['inp'] == (8, 8) and 'head' not in shapes
  assert shapes['blocks.q[2]'] == (8, 8) and shapes['blocks.o[0]'] == (8, 8)
  assert len(shapes) == 1 + 4 * 3


def test_scanned_statistics_equal_the_unrolled_models(scanned):
  model, variables, batches = scanned
  shapes = ctxlr_linen.select(model.apply, variables, batches[0])
  stats = ctxlr_linen.layer_stats(
      model.apply, variables, batches, shapes, want=ctxlr.stats.Want(gram=True)
  )
  flat = {'params': _unrolled_params(variables['params'])}
  unrolled = Unrolled()
  np.testing.assert_allclose(
      unrolled.apply(flat, batches[0]),
      model.apply(variables, batches[0]),
      atol=1e-5,
  )
  ref_shapes = ctxlr_linen.select(unrolled.apply, flat, batches[0])
  ref = ctxlr_linen.layer_stats(unrolled.apply, flat, batches, ref_shapes)
  for name in shapes:
    module, index = surgery.split_name(name)
    other = module.replace('blocks.', f'blocks_{index[0]}.') if index else name
    assert stats[name].count == ref[other].count == 24
    err = np.linalg.norm(stats[name].r - ref[other].r) / np.linalg.norm(
        ref[other].r
    )
    assert err < 1e-6, name
  x = np.concatenate(
      [np.asarray(b, np.float64).reshape(-1, 8) for b in batches]
  )
  assert reference.r_error(stats['inp'].r, x) < 1e-6  # float64 folding
  np.testing.assert_allclose(stats['inp'].gram, x.T @ x, rtol=1e-5)


def test_full_rank_params_keep_outputs_and_half_rank_shrinks(scanned):
  model, variables, batches = scanned
  views, _ = ctxlr_linen.find_layers(model.apply, variables, batches[0])
  shapes = ctxlr_linen.select(model.apply, variables, batches[0])
  exact = {}
  for name in shapes:
    k = np.asarray(
        ctxlr_linen.kernel_matrix(variables, name, views), np.float64
    )
    u, s, vt = np.linalg.svd(k, full_matrices=False)
    exact[name] = (u * s, vt)
  params = ctxlr_linen.factor_params(variables['params'], exact, views)
  assert (
      'kernel' not in params['blocks']['q'] and 'bias' in params['blocks']['q']
  )
  assert params['blocks']['up']['a'].shape == (3, 8, 8)
  with ctxlr_linen.factored():
    got = model.apply({'params': params}, batches[0])
  np.testing.assert_allclose(
      got, model.apply(variables, batches[0]), rtol=1e-5, atol=1e-5
  )
  new, report = ctxlr_linen.compress(
      model.apply, variables['params'], batches, ratio=0.5
  )
  assert set(report['layers']) == set(shapes)
  assert report['layers']['blocks.up[1]']['rank'] == 2  # 0.5·128/24
  assert report['model_ratio'] < 0.75 and report['unhandled'] == {}
  with ctxlr_linen.factored():
    assert model.apply({'params': new}, batches[0]).shape == (2, 6, 5)


def test_factored_dense_is_the_intercepted_layer():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6)), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  dense = nn.Dense(4, dtype=jnp.bfloat16, precision=hi)
  variables = dense.init(jax.random.key(0), x)
  views, _ = ctxlr_linen.find_layers(dense.apply, variables, x)
  k = ctxlr_linen.kernel_matrix(variables, '', views)
  params = ctxlr_linen.factor_params(
      variables['params'], {'': (k[:, :2], jnp.eye(4)[:2])}, views
  )
  with ctxlr_linen.factored():
    y = dense.apply({'params': params}, x)
  module = ctxlr_linen.FactoredDense(
      4, rank=2, dtype=jnp.bfloat16, precision=hi
  )
  assert jax.tree.map(jnp.shape, module.init(jax.random.key(1), x)) == {
      'params': jax.tree.map(jnp.shape, params)
  }
  z = module.apply({'params': params}, x)
  assert y.dtype == z.dtype == jnp.bfloat16  # its dtype kept
  np.testing.assert_array_equal(y, z)
  np.testing.assert_allclose(
      np.asarray(y, np.float32),
      np.asarray(x @ k[:, :2] @ jnp.eye(4)[:2]),
      rtol=2e-2,
      atol=2e-2,
  )


def test_bridged_linen_model_compressed_in_place(scanned):
  _, _, batches = scanned
  model = nnx.bridge.ToNNX(Scanned(), rngs=nnx.Rngs(0)).lazy_init(batches[0])
  before = model(batches[0])
  size = lambda: sum(
      int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
  )
  params_before = size()
  with pytest.raises(ValueError, match='ctxlr.linen.compress_bridged'):
    surgery.select_linears(model)
  report = ctxlr_linen.compress_bridged(model, batches, ratio=0.5)
  assert 'blocks.up[2]' in report['layers']
  assert size() < 0.75 * params_before
  after = model(batches[0])
  assert after.shape == before.shape and not np.allclose(after, before)
  graphdef, state = nnx.split(model)  # an ordinary NNX model
  again = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, batches[0])
  np.testing.assert_allclose(again, after, rtol=1e-5, atol=1e-5)


class Proj(nn.Module):
  """A kernel contracted by `jnp.einsum`, the way gemma's Einsum does it."""

  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param('w', nn.initializers.normal(0.5), self.shape)
    return jnp.einsum(eqn, x, w)


class EinsumBlock(nn.Module):
  """Heads in and out by einsum layers; an MLP whose kernels are its own
  params (the first one given to the einsum before its input)."""

  @nn.compact
  def __call__(self, x, _=None):
    q = Proj((8, 2, 4), name='q')('btd,dnh->btnh', x)
    h = x + Proj((2, 4, 8), name='o')('btnh,nhd->btd', jnp.tanh(q))
    up = self.param('up', nn.initializers.normal(0.3), (16, 8))
    down = self.param('down', nn.initializers.normal(0.3), (16, 8))
    g = jax.nn.silu(jnp.einsum('fd,...d->...f', up, h))
    return h + jnp.einsum('...f,fd->...d', g, down), None


class EinsumScanned(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name='inp')(x)
    stack = nn.scan(
        EinsumBlock,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        length=3,
    )
    x, _ = stack(name='blocks')(x, None)
    b, t, _ = x.shape
    heads = x.reshape(b, t, 2, 4)  # one matrix per head: not one matrix
    x = x + Proj((2, 4, 4), name='mixed')('btnd,nde->btne', heads).reshape(
        b, t, 8
    )
    return nn.Dense(5, name='head')(x)


@pytest.fixture(scope='module')
def einsum_scanned(scanned):
  _, _, batches = scanned
  model = EinsumScanned()
  return model, model.init(jax.random.key(1), batches[0]), batches


def test_einsum_kernels_of_any_module_are_layers(einsum_scanned):
  model, variables, batches = einsum_scanned
  views, unhandled = ctxlr_linen.find_layers(model.apply, variables, batches[0])
  assert set(views) == {
      'inp',
      'head',
      'blocks.q.w',
      'blocks.o.w',
      'blocks.up',
      'blocks.down',
  }
  assert views['blocks.q.w'].in_shape == (8,)
  assert views['blocks.q.w'].out_shape == (2, 4)
  assert views['blocks.o.w'].in_shape == (2, 4)
  assert views['blocks.up'].stack == (3,)
  assert views['blocks.up'].einsum_str == '...d,fd->...f'  # operands swapped
  assert list(unhandled) == ['mixed.w']
  assert "kernel letters ['n']" in unhandled['mixed.w']
  # The rows folded are the layer's inputs, contracted axes in kernel order.
  params = variables['params']
  stats = ctxlr_linen.layer_stats(
      model.apply, variables, batches, ['blocks.q.w[0]', 'blocks.o.w[0]']
  )
  x0 = jnp.concatenate(
      [nn.Dense(8).apply({'params': params['inp']}, b) for b in batches]
  )
  q0 = jnp.einsum('btd,dnh->btnh', x0, params['blocks']['q']['w'][0])
  rows_of = {'blocks.q.w[0]': x0, 'blocks.o.w[0]': jnp.tanh(q0)}
  for name, rows in rows_of.items():
    x = np.asarray(rows, np.float64).reshape(-1, 8)
    assert stats[name].count == 24
    assert reference.r_error(stats[name].r, x) < 1e-5, name


def test_factored_einsum_layers_keep_outputs_and_compress(einsum_scanned):
  model, variables, batches = einsum_scanned
  views, _ = ctxlr_linen.find_layers(model.apply, variables, batches[0])
  shapes = ctxlr_linen.select(model.apply, variables, batches[0])
  assert len(shapes) == 1 + 4 * 3 and shapes['blocks.up[1]'] == (8, 16)
  exact = {}
  for name in shapes:
    k = np.asarray(
        ctxlr_linen.kernel_matrix(variables, name, views), np.float64
    )
    u, s, vt = np.linalg.svd(k, full_matrices=False)
    exact[name] = (u * s, vt)
  params = ctxlr_linen.factor_params(variables['params'], exact, views)
  assert jax.tree.map(jnp.shape, params['blocks']['q']['w']) == {
      'a': (3, 8, 8),
      'b': (3, 8, 8),
  }
  assert params['blocks']['up']['b'].shape == (3, 8, 16)
  with ctxlr_linen.factored():
    got = model.apply({'params': params}, batches[0])
  np.testing.assert_allclose(
      got, model.apply(variables, batches[0]), rtol=1e-5, atol=1e-5
  )
  new, report = ctxlr_linen.compress(
      model.apply, variables['params'], batches, ratio=0.5
  )
  assert set(report['layers']) == set(shapes)
  assert list(report['unhandled']) == ['mixed.w']
  assert report['model_ratio'] < 0.8
  with ctxlr_linen.factored():
    assert model.apply({'params': new}, batches[0]).shape == (2, 6, 5)


class Jitted(nn.Module):
  """A Dense called inside `nn.jit`."""

  def setup(self):
    self.proj = nn.Dense(4)

  @nn.jit
  def __call__(self, x):
    return self.proj(x)


def test_modules_hidden_by_a_cached_jit_are_listed_not_skipped():
  model, x = Jitted(), jnp.ones((3, 8))
  variables = model.init(jax.random.key(0), x)
  model.apply(variables, x)  # nn.jit's trace now cached: no Python reruns
  views, unhandled = ctxlr_linen.find_layers(model.apply, variables, x)
  assert views == {} and 'not seen called' in unhandled['proj']
  with pytest.raises(ValueError, match='not seen called'):
    ctxlr_linen.select(model.apply, variables, x)

  def apply(v, x):
    with jax.disable_jit():
      return model.apply(v, x)

  views, unhandled = ctxlr_linen.find_layers(apply, variables, x)
  assert list(views) == ['proj'] and unhandled == {}
