"""Layer selection, FactoredLinear and in-place swaps on a toy NNX model."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctxlr
from ctxlr import surgery
from tests import toy_model


def test_select_default_excludes_embeddings_and_head():
  shapes = surgery.select_linears(toy_model.Toy())
  assert list(shapes)[:4] == [
      'layers.0.attn.k_proj',
      'layers.0.attn.o_proj',
      'layers.0.attn.q_proj',
      'layers.0.attn.v_proj',
  ]
  assert len(shapes) == 14 and not any('head' in n for n in shapes)
  assert shapes['layers.1.mlp.down_proj'] == (40, 16)


def test_select_patterns_and_numeric_order():
  model = toy_model.Toy(layers=11)
  shapes = surgery.select_linears(model, include=('*.q_proj',))
  assert list(shapes)[-2:] == ['layers.9.attn.q_proj', 'layers.10.attn.q_proj']
  shapes = surgery.select_linears(
      model, include=('layers.1.*',), exclude=('*.attn.*',)
  )
  assert list(shapes) == [
      'layers.1.mlp.down_proj',
      'layers.1.mlp.gate_proj',
      'layers.1.mlp.up_proj',
  ]


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
    u, s, vt = np.linalg.svd(k, full_matrices=False)  # exact, full rank
    new = surgery.factored_from_linear(
        linear, jnp.asarray(u * s, dtype), jnp.asarray(vt, dtype)
    )
    surgery.replace_module(model, name, new)
    assert new.a.dtype == jnp.float32  # the Linear's storage dtype kept
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
  surgery.replace_module(
      model,
      name,
      surgery.factored_from_linear(linear, linear.kernel[...], jnp.eye(16)),
  )
  graphdef, state = nnx.split(model)
  out = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(
      state, jnp.ones((1, 3), jnp.int32)
  )
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
      'custom': 'Custom: params w'
  }


def test_include_must_be_a_sequence():
  with pytest.raises(ValueError, match='sequences of patterns'):
    surgery.select_linears(toy_model.Toy(), include='*up*')


@pytest.mark.parametrize('allocation', ['uniform', 'global'])
def test_ratio_one_leaves_every_layer_unchanged(allocation):
  from ctxlr import pipeline  # pylint: disable=g-import-not-at-top

  model = toy_model.Toy(d=32, f=128)  # 32 x 128 MLP layers
  ids = jnp.arange(24).reshape(2, 12) % 64
  before = model(ids)
  kernels = {
      n: surgery.kernel_matrix(model, n) for n in surgery.select_linears(model)
  }
  report = pipeline.compress(model, [ids], ratio=1.0, allocation=allocation)
  assert all(row['rank'] is None for row in report['layers'].values())
  assert report['kept_ratio'] == report['model_ratio'] == 1.0
  assert not any(
      isinstance(m, surgery.FactoredLinear) for _, m in nnx.iter_modules(model)
  )
  for n, k in kernels.items():
    np.testing.assert_array_equal(surgery.kernel_matrix(model, n), k)
  np.testing.assert_array_equal(model(ids), before)


_GENERAL = {
    'linear': lambda r: nnx.Linear(6, 5, rngs=r),
    'general_out': lambda r: nnx.LinearGeneral(6, (2, 3), rngs=r),
    'general_in': lambda r: nnx.LinearGeneral((3, 2), 5, axis=(-2, -1), rngs=r),
    'general_mid': lambda r: nnx.LinearGeneral(
        (4, 2), (5,), axis=(1, -1), rngs=r
    ),
    'einsum_split': lambda r: nnx.Einsum(
        'bsd,dnh->bsnh', (6, 2, 3), (2, 3), rngs=r
    ),
    'einsum_merge': lambda r: nnx.Einsum(
        'bnsh,nhd->bsd', (2, 2, 5), (5,), rngs=r
    ),
    'einsum_ellipsis': lambda r: nnx.Einsum(
        '...a,ab->...b', (6, 5), (5,), rngs=r
    ),
    'einsum_order': lambda r: nnx.Einsum('bd,dk->kb', (6, 5), (5, 1), rngs=r),
}
_INPUTS = {
    'linear': (2, 3, 6),
    'general_out': (2, 3, 6),
    'general_in': (2, 3, 3, 2),
    'general_mid': (2, 4, 3, 2),
    'einsum_split': (2, 3, 6),
    'einsum_merge': (2, 2, 3, 2),
    'einsum_ellipsis': (2, 3, 6),
    'einsum_order': (3, 6),
}


@pytest.mark.parametrize('kind', sorted(_GENERAL))
def test_matrix_view_is_the_layer_and_factored_computes_it(kind):
  """||layer(x) − factored(x)||_F = ||X (K − a b)||_F, same output shape."""
  rng = np.random.default_rng(0)
  layer = _GENERAL[kind](nnx.Rngs(0))
  if layer.bias is not None:
    layer.bias[...] = jnp.asarray(
        rng.standard_normal(layer.bias.shape), jnp.float32
    )
  x = jnp.asarray(rng.standard_normal(_INPUTS[kind]), jnp.float32)
  view = surgery.matrix_view(layer)
  k = np.asarray(surgery.kernel_as_matrix(layer), np.float64)
  xm = np.asarray(surgery.input_as_matrix(view, x), np.float64)
  assert k.shape == (view.d_in, view.d_out) and xm.shape[1] == view.d_in
  a = rng.standard_normal((view.d_in, 2)).astype(np.float32)
  b = rng.standard_normal((2, view.d_out)).astype(np.float32)
  new = surgery.factored_from(layer, a, b)
  y, y_new = layer(x), new(x)
  assert y_new.shape == y.shape and y_new.dtype == y.dtype
  got = np.linalg.norm(np.asarray(y, np.float64) - np.asarray(y_new))
  want = np.linalg.norm(xm @ (k - a.astype(np.float64) @ b))
  assert got == pytest.approx(want, rel=1e-5)
  u, s, vt = np.linalg.svd(k, full_matrices=False)  # full rank: exact
  exact = surgery.factored_from(
      layer, jnp.asarray(u * s, jnp.float32), jnp.asarray(vt, jnp.float32)
  )
  np.testing.assert_allclose(exact(x), y, rtol=1e-5, atol=1e-5)


def test_general_layers_reach_the_float64_optimum():
  from ctxlr import calibration  # pylint: disable=g-import-not-at-top
  from ctxlr import reference  # pylint: disable=g-import-not-at-top

  model = toy_model.General()
  rng = np.random.default_rng(0)
  batches = [
      jnp.asarray(rng.standard_normal((2, 12, 8)), jnp.float32)
      for _ in range(3)
  ]
  shapes = surgery.select_linears(model)
  assert shapes == {'merge': (6, 8), 'o': (8, 8), 'q': (8, 8), 'split': (8, 6)}
  stats = calibration.layer_stats(model, batches, shapes)
  x = {
      n: np.concatenate(
          [
              np.asarray(
                  surgery.input_as_matrix(
                      surgery.matrix_view(surgery.get_module(model, n)),
                      model.inputs(b)[n],
                  ),
                  np.float64,
              )
              for b in batches
          ]
      )
      for n in shapes
  }
  factors = {}
  for name in shapes:
    kernel = surgery.kernel_matrix(model, name)
    assert stats[name].count == 72
    f = ctxlr.ctx_factors(kernel, stats[name].r, rank=3)
    factors[name] = (f.a, f.b)
    got = reference.weighted_error(x[name], kernel, f.a, f.b)
    best = reference.optimal_errors(x[name], kernel)[3]
    assert got == pytest.approx(best, rel=1e-4), name
  before = model(batches[0])
  surgery.apply_factors(model, factors)
  assert all(
      isinstance(surgery.get_module(model, n), surgery.FactoredLinear)
      for n in shapes
  )
  assert model(batches[0]).shape == before.shape


def test_factored_keeps_dtype_precision_and_dot_general():
  calls = []

  def dot_general(*args, **kwargs):
    calls.append(kwargs.get('precision'))
    return jax.lax.dot_general(*args, **kwargs)

  def einsum_op(*args, **kwargs):
    calls.append(kwargs.get('precision'))
    return jnp.einsum(*args, **kwargs)

  hi = jax.lax.Precision.HIGHEST
  rngs = nnx.Rngs(0)
  layers = [
      nnx.Linear(
          6,
          4,
          dtype=jnp.bfloat16,
          param_dtype=jnp.bfloat16,
          precision=hi,
          dot_general=dot_general,
          rngs=rngs,
      ),
      nnx.LinearGeneral(
          6,
          (2, 2),
          dtype=jnp.bfloat16,
          precision=hi,
          dot_general=dot_general,
          rngs=rngs,
      ),
      nnx.Einsum(
          'bd,dk->bk',
          (6, 4),
          (4,),
          dtype=jnp.bfloat16,
          precision=hi,
          einsum_op=einsum_op,
          rngs=rngs,
      ),
  ]
  x = jnp.ones((3, 6), jnp.float32)
  for layer in layers:
    k = surgery.kernel_as_matrix(layer)
    assert k.dtype == layer.param_dtype  # storage dtype
    new = surgery.factored_from(layer, k.astype(jnp.float32), jnp.eye(4))
    for attr in (
        'dtype',
        'param_dtype',
        'precision',
        'promote_dtype',
        'preferred_element_type',
    ):
      assert getattr(new, attr) == getattr(layer, attr), attr
    assert new.a.dtype == new.b.dtype == layer.param_dtype
    dense = layer(x)
    calls.clear()
    y = new(x)
    assert y.dtype == dense.dtype == jnp.bfloat16
    assert calls == [hi, hi]  # both products, its own op
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(dense, np.float32),
        rtol=2e-2,
        atol=2e-2,
    )


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_stack_factored_back_in_its_stack(remat):
  model = toy_model.Scanned(layers=3, remat=remat)
  ids = jnp.arange(14).reshape(2, 7)
  before = model(ids)
  shapes = surgery.select_linears(model)
  exact = {}
  for name in shapes:
    k = np.asarray(surgery.kernel_matrix(model, name), np.float64)
    u, s, vt = np.linalg.svd(k, full_matrices=False)
    exact[name] = (u * s, vt)
  ranks = surgery.apply_factors(model, exact)
  assert ranks['layers.mlp.up_proj'] == 16
  up = model.layers.mlp.up_proj
  assert isinstance(up, surgery.FactoredLinear)
  assert up.a.shape == (3, 16, 16) and up.b.shape == (3, 16, 40)
  np.testing.assert_allclose(model(ids), before, rtol=1e-4, atol=1e-4)
  # Layers of a stack may differ in rank: padded to the largest, exactly.
  model = toy_model.Scanned(layers=3, remat=remat)
  k0 = surgery.kernel_matrix(model, 'layers.mlp.down_proj[0]')
  u, s, vt = np.linalg.svd(np.asarray(k0, np.float64), full_matrices=False)
  surgery.apply_factors(
      model, {'layers.mlp.down_proj[0]': (u[:, :2] * s[:2], vt[:2])}
  )
  down = model.layers.mlp.down_proj
  assert down.a.shape == (3, 40, 16)  # [1], [2] kept exactly (rank 16)
  np.testing.assert_allclose(
      np.asarray(down.a[0] @ down.b[0]), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5
  )
  assert model(ids).shape == before.shape


def test_compress_a_scanned_model_by_layer_name():
  model = toy_model.Scanned(layers=2)
  ids = [jnp.arange(14).reshape(2, 7) % 64 for _ in range(2)]
  report = ctxlr.compress(model, ids, ratio=0.5)
  assert set(report['layers']) == set(
      surgery.select_linears(toy_model.Scanned(layers=2))
  )
  assert report['layers']['layers.attn.q_proj[1]']['rank'] == 4
  assert report['model_ratio'] < 1 and report['unhandled'] == {}
  assert model.layers.attn.q_proj.a.shape == (2, 16, 4)
  assert model(ids[0]).shape == (2, 7, 64)


class _Containers(nnx.Module):
  """Modules under every container kind the module graph has."""

  def __init__(self):
    lin = lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    self.l = nnx.List([lin(), nnx.Dict({'y': lin()})])
    self.d = nnx.Dict({'x': lin(), '7': lin()})
    self.t = nnx.data((lin(),))
    self.pl = nnx.data([lin()])
    self.pd = nnx.data({3: lin()})


def test_module_lookup_by_name_matches_the_graph_search():
  model = _Containers()
  found = [(tuple(p), m) for p, m in nnx.iter_modules(model) if p]
  assert len(found) == 10
  for path, module in found:
    name = surgery.path_name(path)
    assert surgery._path_of(model, name) == path  # keys of the right type
    assert surgery.get_module(model, name) is module
  new = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
  surgery.replace_module(model, 'pd.3', new)
  assert model.pd[3] is new
  for bad in ('l.2', 'l.01', 'd.z', 'pd.4', 'x', 'l.0.kernel'):
    with pytest.raises(ValueError, match=f"No module at path '{bad}'"):
      surgery.get_module(model, bad)
