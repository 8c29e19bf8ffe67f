"""TSQR over 1–8 forced CPU devices (ctxlr/linalg/tsqr.py).

tests/conftest.py forces 8 host devices before JAX starts
(= XLA_FLAGS=--xla_force_host_platform_device_count=8). References are
float64 NumPy QRs of the whole X, rows' signs normalised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr import results
from ctxlr.linalg import tsqr
from experiments import bench_tsqr
from experiments.configs import bench_tsqr as bench_config

D = 16
TOL32, TOL64 = 1e-5, 1e-12


reference_r = reference.r_factor
rel_err = reference.r_error


def rows(n, d=D, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d)) * np.logspace(0, -2, d)).astype(dtype)


@functools.lru_cache(maxsize=None)
def mesh_of(size, axis='rows'):
  return jax.make_mesh((size,), (axis,), devices=jax.devices()[:size])


def test_eight_devices_are_forced():
  assert jax.device_count() == 8


@pytest.mark.parametrize('combine', tsqr.COMBINES)
@pytest.mark.parametrize('size', [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize('n', [37, 203])
def test_tsqr_matches_float64_qr(n, size, combine):
  # 37 rows: padded to a multiple of size; on 8 devices 5 rows each, fewer
  # than d (a trapezoidal local R). 3 and 6 devices: the tree's extra step.
  x = rows(n)
  r = tsqr.tsqr(x, mesh=mesh_of(size), combine=combine)
  assert r.shape == (D, D) and r.dtype == jnp.float32
  assert rel_err(r, x) < TOL32


def test_zero_row_padding_is_harmless():
  x = rows(29)
  padded = np.concatenate([x, np.zeros((11, D), np.float32)])
  for combine in tsqr.COMBINES:
    r = tsqr.tsqr(x, mesh=mesh_of(8), combine=combine)  # pads 3 rows
    r_padded = tsqr.tsqr(padded, mesh=mesh_of(8), combine=combine)
    assert rel_err(r, x) < TOL32 and rel_err(r_padded, x) < TOL32
    np.testing.assert_allclose(r, r_padded, atol=1e-5 * np.abs(r).max())


@pytest.mark.parametrize('size', [6, 8])
def test_tree_gives_every_device_the_same_r(size):
  r = tsqr.tsqr(rows(64), mesh=mesh_of(size), combine='tree')
  shards = [np.asarray(s.data) for s in r.addressable_shards]
  assert len(shards) == size
  for s in shards[1:]:
    np.testing.assert_array_equal(s, shards[0])


def test_float64():
  x = rows(77, dtype=np.float64)
  with jax.enable_x64(True):
    for combine in tsqr.COMBINES:
      r = tsqr.tsqr(x, mesh=mesh_of(4), combine=combine)
      assert r.dtype == jnp.float64
      assert rel_err(r, x) < TOL64


def test_presharded_input_and_auto_axes():
  mesh = jax.make_mesh(
      (8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,)
  )
  x = rows(64)
  xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P('data', None)))
  assert rel_err(tsqr.tsqr(xs, mesh=mesh, axis='data'), x) < TOL32


def test_two_axis_mesh_replicates_the_other_axis():
  mesh = jax.make_mesh((4, 2), ('rows', 'model'))
  x = rows(50)
  assert rel_err(tsqr.tsqr(x, mesh=mesh), x) < TOL32


def test_default_mesh_uses_all_devices():
  x = rows(45)
  assert rel_err(tsqr.tsqr(x), x) < TOL32


def test_reduce_r_pytree_of_layers():
  # Per-device R's from each device's own rows, two layers of different d.
  mesh = mesh_of(8)
  layers = {'q': rows(8 * 6, d=12, seed=1), 'mlp': [rows(8 * 20, seed=2)]}
  stacked = jax.tree.map(
      lambda x: np.stack([reference_r(part) for part in np.split(x, 8)]).astype(
          np.float32
      ),
      layers,
  )
  for combine in tsqr.COMBINES:
    out = tsqr.reduce_r(stacked, mesh=mesh, combine=combine)
    assert rel_err(out['q'], layers['q']) < TOL32
    assert rel_err(out['mlp'][0], layers['mlp'][0]) < TOL32


def test_fold_sharded_in_jit_then_reduce():
  mesh = mesh_of(8)
  sharding = jax.NamedSharding(mesh, jax.P('rows'))
  rs = {
      'a': tsqr.zeros_sharded(D, mesh=mesh),
      'b': tsqr.zeros_sharded(8, mesh=mesh),
  }
  step = jax.jit(functools.partial(tsqr.fold_sharded, mesh=mesh))
  kept_a, kept_b = [], []
  for i in range(3):
    xa, xb = rows(32, seed=10 + i), rows(32, d=8, seed=20 + i)
    mask = np.random.default_rng(i).random(32) < 0.7  # padding tokens
    xa_bad = np.where(mask[:, None], xa, np.nan)  # NaN only in padding
    rs, oks = step(
        rs,
        {
            'a': jax.device_put(xa_bad, sharding),
            'b': jax.device_put(xb, sharding),
        },
        masks={
            'a': jax.device_put(mask, sharding),
            'b': jax.device_put(np.ones(32, bool), sharding),
        },
    )
    assert all(bool(jnp.all(ok)) for ok in jax.tree.leaves(oks))
    kept_a.append(xa[mask])
    kept_b.append(xb)
  out = tsqr.reduce_r(rs, mesh=mesh)
  assert rel_err(out['a'], np.concatenate(kept_a)) < TOL32
  assert rel_err(out['b'], np.concatenate(kept_b)) < TOL32


def test_fold_sharded_flags_nan_on_its_device():
  mesh = mesh_of(4)
  x = rows(16)
  x[9, 0] = np.nan  # device 2's rows 8..11
  xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P('rows')))
  rs, oks = tsqr.fold_sharded(tsqr.zeros_sharded(D, mesh=mesh), xs, mesh=mesh)
  np.testing.assert_array_equal(oks, [True, True, False, True])
  with pytest.raises(
      ValueError,
      match=r"rs\['w'\]: the R of device\(s\) " r'\[2\] contains NaN',
  ):
    tsqr.reduce_r({'w': rs}, mesh=mesh)


@pytest.mark.parametrize('size', [3, 8])
@pytest.mark.parametrize('combine', tsqr.COMBINES)
def test_accumulate_r_sharded(size, combine):
  rng = np.random.default_rng(5)
  blocks = [
      rows(int(b), seed=i) for i, b in enumerate(rng.integers(1, 40, size=7))
  ]
  r = tsqr.accumulate_r_sharded(
      iter(blocks), mesh=mesh_of(size), block_size=4, combine=combine
  )
  assert rel_err(r, np.concatenate(blocks)) < TOL32


def test_accumulate_r_sharded_float64_and_errors():
  blocks = [rows(10, dtype=np.float64), rows(21, seed=1, dtype=np.float64)]
  with jax.enable_x64(True):
    r = tsqr.accumulate_r_sharded(
        blocks, mesh=mesh_of(4), block_size=3, dtype=jnp.float64
    )
    assert rel_err(r, np.concatenate(blocks)) < TOL64
  with pytest.raises(ValueError, match='stream is empty'):
    tsqr.accumulate_r_sharded([], mesh=mesh_of(4), d=D)
  bad = rows(5)
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match='block 1 contains 1 NaN'):
    tsqr.accumulate_r_sharded([rows(5), bad], mesh=mesh_of(4))
  with pytest.raises(ValueError, match='axes other than'):
    tsqr.ShardedRAccumulator(D, mesh=jax.make_mesh((4, 2), ('rows', 'm')))


def test_tsqr_errors():
  mesh = mesh_of(4)
  with pytest.raises(ValueError, match="axis 'data' is not an axis"):
    tsqr.tsqr(rows(8), mesh=mesh, axis='data')
  with pytest.raises(ValueError, match="combine must be one of .* 'ring'"):
    tsqr.tsqr(rows(8), mesh=mesh, combine='ring')
  with pytest.raises(ValueError, match='x must be a matrix'):
    tsqr.tsqr(np.ones(8, np.float32), mesh=mesh)
  with pytest.raises(ValueError, match='no rows'):
    tsqr.tsqr(np.ones((0, D), np.float32), mesh=mesh)
  with pytest.raises(ValueError, match='mesh must be a jax.sharding.Mesh'):
    tsqr.tsqr(rows(8), mesh='rows')
  x = rows(8)
  x[5, 3] = np.inf
  with pytest.raises(ValueError, match='x contains NaN or Inf'):
    tsqr.tsqr(x, mesh=mesh)


def test_reduce_and_fold_errors():
  mesh = mesh_of(4)
  rs = tsqr.zeros_sharded(D, mesh=mesh)
  with pytest.raises(ValueError, match=r"rs\['k'\] has shape \(4, 16, 8\)"):
    tsqr.reduce_r({'k': jnp.zeros((4, D, 8))}, mesh=mesh)
  with pytest.raises(ValueError, match=r'rs has shape \(2, 16, 16\)'):
    tsqr.reduce_r(jnp.zeros((2, D, D)), mesh=mesh)
  with pytest.raises(ValueError, match='empty pytree'):
    tsqr.reduce_r({}, mesh=mesh)
  with pytest.raises(ValueError, match='xs has 10 rows, not a multiple'):
    tsqr.fold_sharded(rs, jnp.zeros((10, D)), mesh=mesh)
  with pytest.raises(ValueError, match='same structure'):
    tsqr.fold_sharded({'a': rs}, {'b': jnp.zeros((8, D))}, mesh=mesh)
  with pytest.raises(ValueError, match=r'masks has shape \(5,\)'):
    tsqr.fold_sharded(rs, jnp.zeros((8, D)), mesh=mesh, masks=jnp.ones(5, bool))
  with pytest.raises(ValueError, match='must be floating point'):
    tsqr.reduce_r(jnp.zeros((4, D, D), jnp.int32), mesh=mesh)


def test_bench_quick(tmp_path):
  # The benchmark's quick variant end to end (children, JSON, Markdown, PNG);
  # the memory claim is checked: peak RSS flat within 10% over 64x the rows.
  bench_tsqr.run(bench_config.get_config('quick'), str(tmp_path))
  out = results.read_json(str(tmp_path / 'results.json'))
  assert [f['b_over_d'] for f in out['fold']] == [1, 2, 4, 8, 16]
  assert {(s['combine'], s['devices']) for s in out['scaling']} == {
      (c, k) for c in tsqr.COMBINES for k in (1, 2, 4, 8)
  }
  rows = [m['rows'] for m in out['memory']]
  assert max(rows) == 64 * min(rows)
  assert max(out['memory_spread'].values()) < 0.10
  assert (tmp_path / 'bench_tsqr.png').stat().st_size > 0
  assert 'Strong scaling' in (tmp_path / 'summary.md').read_text()
