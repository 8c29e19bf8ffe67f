"""Calibration folds each layer's input into R; shared inputs fold once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import calibration
from ctxlr import reference
from ctxlr import stats as stats_lib
from ctxlr import surgery
from tests import toy_model


def _inputs_of_layer0(model, batches):
  """float64 inputs of layers.0's q_proj (= norm(embed(ids))) and down_proj."""
  block = model.layers[0]
  xs, downs = [], []
  for ids in batches:
    h = model.embed(ids)
    x = block.norm(h)
    xs.append(np.asarray(x, np.float64).reshape(-1, 16))
    q, k, v = block.attn.q_proj(x), block.attn.k_proj(x), block.attn.v_proj(x)
    w = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / 4.0)
    h = h + block.attn.o_proj(w @ v)
    x = block.norm(h)
    inner = jax.nn.silu(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)
    downs.append(np.asarray(inner, np.float64).reshape(-1, 40))
  return np.concatenate(xs), np.concatenate(downs)


@pytest.fixture(scope='module')
def calibrated():
  model = toy_model.Toy()
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 10))) for _ in range(4)]
  names = list(surgery.select_linears(model))
  stats, group_of = calibration.calibrate(
      model, batches, names, want=calibration.Want(gram=True, abs_sum=True)
  )
  return model, batches, names, stats, group_of


def test_shared_inputs_fold_once(calibrated):
  _, _, names, stats, group_of = calibrated
  assert set(group_of) == set(names)
  for i in range(2):
    p = f'layers.{i}.'
    q = group_of[p + 'attn.q_proj']
    assert group_of[p + 'attn.k_proj'] == q == group_of[p + 'attn.v_proj']
    assert group_of[p + 'mlp.gate_proj'] == group_of[p + 'mlp.up_proj']
    assert group_of[p + 'attn.o_proj'] == p + 'attn.o_proj'
  assert len(stats) == 2 * 4  # qkv, o, gate/up, down per block


def test_statistics_match_float64_reference(calibrated):
  model, batches, _, stats, group_of = calibrated
  x, inner = _inputs_of_layer0(model, batches)
  s = stats[group_of['layers.0.attn.k_proj']]
  assert s.count == 80
  ref_r = reference.r_factor(x)
  assert np.linalg.norm(np.asarray(s.r) - ref_r) / np.linalg.norm(ref_r) < 1e-5
  np.testing.assert_allclose(s.gram, x.T @ x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s.abs_sum, np.abs(x).sum(0), rtol=1e-5)
  down = stats['layers.0.mlp.down_proj']
  ref_r = reference.r_factor(inner)
  assert (
      np.linalg.norm(np.asarray(down.r) - ref_r) / np.linalg.norm(ref_r) < 1e-5
  )


def test_taps_are_removed(calibrated):
  model = calibrated[0]
  assert type(model.layers[0].attn.q_proj).__name__ == 'Linear'


def test_nan_names_layer_and_batch():
  model = toy_model.Toy()
  model.layers[1].attn.o_proj.kernel[...] = jnp.full((16, 16), jnp.nan)
  batches = [jnp.zeros((1, 4), jnp.int32)] * 3
  with pytest.raises(
      ValueError,
      match=r"\['layers.1.mlp.down_proj', "
      r"'layers.1.mlp.gate_proj', 'layers.1.mlp.up_proj'\] "
      r'at calibration batch 0',
  ):
    calibration.calibrate(
        model, batches, surgery.select_linears(model, include=('*mlp*',))
    )
  assert type(model.layers[1].mlp.up_proj).__name__ == 'Linear'


def test_empty_stream_raises():
  model = toy_model.Toy()
  with pytest.raises(ValueError, match='calibration stream is empty'):
    calibration.calibrate(model, iter([]), surgery.select_linears(model))


@pytest.mark.parametrize('devices', [2, 8])
def test_data_parallel_calibration_matches_one_device(calibrated, devices):
  model, batches, names, stats, group_of = calibrated  # batches: (2, 10)
  batches = [jnp.concatenate([b, b[:1]]) for b in batches]  # 3 rows: padded
  one, _ = calibration.calibrate(
      model, batches, names, want=calibration.Want(gram=True, abs_sum=True)
  )
  mesh = jax.make_mesh((devices,), ('data',), devices=jax.devices()[:devices])
  many, groups = calibration.calibrate(
      model,
      batches,
      names,
      want=calibration.Want(gram=True, abs_sum=True),
      mesh=mesh,
  )
  assert groups == group_of and set(many) == set(one)
  for g in one:
    assert many[g].count == one[g].count == 4 * 3 * 10
    ref = np.asarray(one[g].r)
    got = np.asarray(many[g].r)
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    np.testing.assert_allclose(many[g].gram, one[g].gram, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(many[g].abs_sum, one[g].abs_sum, rtol=1e-5)


def test_float64_statistics_resolve_what_float32_cannot():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class One(nnx.Module):  # the layer's input is the batch

    def __init__(self):
      self.proj = nnx.Linear(24, 8, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.proj(x)

  model = One()
  rng = np.random.default_rng(0)
  batches = [
      reference.activations(rng, 64, 24, cond=1e4).astype(np.float32)
      for _ in range(3)
  ]
  x = np.concatenate(batches).astype(np.float64)
  stats32, _ = calibration.calibrate(model, batches, ['proj'])
  with jax.enable_x64(True):
    stats64, _ = calibration.calibrate(
        model,
        batches,
        ['proj'],
        want=calibration.Want(gram=True),
        dtype=jnp.float64,
    )
    s = stats64['proj']
    assert s.r.dtype == s.gram.dtype == jnp.float64
    err64 = reference.r_error(np.asarray(s.r), x)
    np.testing.assert_allclose(s.gram, x.T @ x, rtol=1e-12, atol=1e-12)
  err32 = reference.r_error(np.asarray(stats32['proj'].r, np.float64), x)
  assert err64 < 1e-13 < 1e-8 < err32


def test_float64_needs_x64():
  model = toy_model.Toy()
  batches = [jnp.zeros((1, 4), jnp.int32)]
  with pytest.raises(ValueError, match='64-bit JAX'):
    calibration.calibrate(
        model, batches, ['layers.0.attn.q_proj'], dtype=jnp.float64
    )


def _x64(x):
  return np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])


def test_layer_called_twice_folds_every_call():
  model = toy_model.Twice()
  rng = np.random.default_rng(0)
  batches = [
      jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32) for _ in range(3)
  ]
  stats, group_of = calibration.calibrate(model, batches, ['shared', 'side'])
  calls = [model.inputs(b) for b in batches]
  both = np.concatenate([_x64(x) for c in calls for x in c])
  first = np.concatenate([_x64(c[0]) for c in calls])
  # `side` shares the first call's input only: it is not grouped with
  # `shared`, whose statistics hold both calls.
  assert group_of == {'shared': 'shared', 'side': 'side'}
  assert stats['shared'].count == 2 * 3 * 10 == both.shape[0]
  assert stats['side'].count == 3 * 10
  assert reference.r_error(stats['shared'].r, both) < 1e-5
  assert reference.r_error(stats['side'].r, first) < 1e-5


def test_layer_missing_from_some_batches_counts_what_it_saw():
  model = toy_model.Branchy()
  rng = np.random.default_rng(0)
  shapes = [(2, 6), (2, 3), (1, 6), (3, 3)]  # 'long' runs for seq 6 only
  batches = [
      jnp.asarray(rng.standard_normal(s + (6,)), jnp.float32) for s in shapes
  ]
  stats, group_of = calibration.calibrate(model, batches, ['proj', 'long'])
  assert stats[group_of['proj']].count == 12 + 6 + 6 + 9
  assert stats[group_of['long']].count == 12 + 6
  reached = np.concatenate(
      [_x64(jnp.tanh(model.proj(b))) for b in batches if b.shape[1] > 4]
  )
  assert reference.r_error(stats['long'].r, reached) < 1e-5
  # A layer no batch reaches has no statistics to give.
  with pytest.raises(ValueError, match=r"\['long'\] were not called"):
    calibration.calibrate(model, batches[1::2][1:], ['proj', 'long'])


def test_groups_split_when_sharers_part():
  """Layers fed one array on a batch, different ones later, part exactly."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Part(nnx.Module):

    def __init__(self):
      rngs = nnx.Rngs(0)
      self.a = nnx.Linear(4, 4, rngs=rngs)
      self.b = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
      other = jnp.flip(x, -1) if x.shape[0] == 3 else x
      return self.a(x) + self.b(other)

  model = Part()
  rng = np.random.default_rng(1)
  batches = [
      jnp.asarray(rng.standard_normal((n, 4)), jnp.float32) for n in (2, 3, 2)
  ]
  stats, group_of = calibration.calibrate(model, batches, ['a', 'b'])
  assert group_of == {'a': 'a', 'b': 'b'}
  xa = np.concatenate([_x64(b) for b in batches])
  xb = np.concatenate(
      [_x64(jnp.flip(b, -1) if b.shape[0] == 3 else b) for b in batches]
  )
  assert reference.r_error(stats['a'].r, xa) < 1e-5
  assert reference.r_error(stats['b'].r, xb) < 1e-5
  assert stats['a'].count == stats['b'].count == 7


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_stack_has_the_unrolled_models_statistics(remat):
  model = toy_model.Scanned(layers=3, remat=remat)
  unrolled = model.unrolled()
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 7))) for _ in range(3)]
  names = list(surgery.select_linears(model))
  assert len(names) == 3 * 7 and 'layers.mlp.up_proj[2]' in names
  stats, group_of = calibration.calibrate(
      model, batches, names, want=calibration.Want(gram=True)
  )
  ref, ref_group = calibration.calibrate(
      unrolled,
      batches,
      surgery.select_linears(unrolled),
      want=calibration.Want(gram=True),
  )
  for name in names:
    module, (i,) = surgery.split_name(name)
    flat = module.replace('layers.', f'layers.{i}.')
    got, want = stats[group_of[name]], ref[ref_group[flat]]
    assert got.count == want.count == 42
    err = np.linalg.norm(got.r - want.r) / np.linalg.norm(want.r)
    assert err < 1e-5, name
    np.testing.assert_allclose(got.gram, want.gram, rtol=1e-4, atol=1e-4)
  # q/k/v of one stacked layer share their statistics; layers do not.
  assert group_of['layers.attn.q_proj[1]'] == group_of['layers.attn.v_proj[1]']
  assert group_of['layers.attn.q_proj[1]'] != group_of['layers.attn.q_proj[0]']
  assert type(model.layers.mlp.up_proj).__name__ == 'Linear'  # taps removed


def test_vmapped_members_each_fold_the_input():
  model = toy_model.Ensemble()
  rng = np.random.default_rng(0)
  batches = [
      jnp.asarray(rng.standard_normal((5, 6)), jnp.float32) for _ in range(2)
  ]
  names = list(surgery.select_linears(model))
  assert names == ['members[0]', 'members[1]', 'members[2]']
  stats = calibration.layer_stats(model, batches, names)
  x = np.concatenate([_x64(b) for b in batches])
  for name in names:
    assert stats[name].count == 10
    assert reference.r_error(stats[name].r, x) < 1e-5


def test_recurrent_layer_folds_every_step_or_says_why_not():
  model = toy_model.Recurrent(carry=True)
  xs = jnp.asarray(
      np.random.default_rng(0).standard_normal((4, 2, 6)), jnp.float32
  )
  stats, _ = calibration.calibrate(model, [xs], ['cell'])
  h, inputs = jnp.zeros((2, 6)), []
  for x in xs:  # the cell's inputs: h_t
    inputs.append(_x64(h))
    h = jnp.tanh(model.cell(h) + x)
  assert stats['cell'].count == 8
  assert reference.r_error(stats['cell'].r, np.concatenate(inputs)) < 1e-5
  with pytest.raises(
      ValueError,
      match=r"\['cell'\] were called at "
      'calibration batch 0, but their statistics did not',
  ):
    calibration.calibrate(toy_model.Recurrent(carry=False), [xs], ['cell'])


def test_data_parallel_scanned_stack_matches_one_device():
  model = toy_model.Scanned(layers=2)
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (3, 7))) for _ in range(2)]
  names = list(surgery.select_linears(model))
  one, group_of = calibration.calibrate(model, batches, names)
  mesh = jax.make_mesh((2,), ('data',), devices=jax.devices()[:2])
  many, groups = calibration.calibrate(model, batches, names, mesh=mesh)
  assert groups == group_of
  for g in one:
    assert many[g].count == one[g].count == 42  # padding row masked
    err = np.linalg.norm(many[g].r - one[g].r) / np.linalg.norm(one[g].r)
    assert err < 1e-5, g


def test_gram_only_calibration_keeps_no_r():
  model = toy_model.Toy()
  batches = [
      jnp.asarray(np.random.default_rng(i).integers(0, 64, (2, 12)))
      for i in range(2)
  ]
  names = ['layers.0.attn.q_proj', 'layers.1.mlp.down_proj']
  both = calibration.layer_stats(
      model, batches, names, want=stats_lib.Want(gram=True)
  )
  gram = calibration.layer_stats(
      model, batches, names, want=stats_lib.Want(r=False, gram=True)
  )
  for n in names:
    assert gram[n].r is None and gram[n].count == both[n].count
    np.testing.assert_allclose(gram[n].gram, both[n].gram, rtol=1e-6)
  with pytest.raises(ValueError, match='at least one of r, gram, abs_sum'):
    stats_lib.Want(r=False)
