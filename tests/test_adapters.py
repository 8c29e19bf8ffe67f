"""Adapter initialisations against float64 NumPy references; the layer."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import adapters
from ctxlr import calibration
from ctxlr import reference
from ctxlr import stats as stats_lib
from ctxlr import surgery
from tests import toy_model

SHAPES = ((16, 24), (24, 16))
RANK = 4


def _f64(x):
  return np.asarray(x, np.float64)


def _data(d_in, d_out, seed=0):
  """(X task, X general, K) in float32, and their LayerStats."""
  rng = np.random.default_rng(seed)
  x = reference.activations(rng, 256, d_in, cond=30.0).astype(np.float32)
  xg = (rng.standard_normal((300, d_in)) * np.linspace(0.2, 3, d_in)).astype(
      np.float32
  )
  kernel = rng.standard_normal((d_in, d_out)).astype(np.float32)
  return (
      x,
      xg,
      kernel,
      stats_lib.stats_from_x(jnp.asarray(x)),
      stats_lib.stats_from_x(jnp.asarray(xg)),
  )


def _projector(v):
  return v @ v.T


def _rel(a, b):
  return np.linalg.norm(_f64(a) - _f64(b)) / np.linalg.norm(_f64(b))


def _check_sum(init, kernel):
  """K_res + a b = K (float32 rounding), every factor in K's dtype."""
  assert init.k_res.dtype == init.a.dtype == init.b.dtype == kernel.dtype
  assert _rel(_f64(init.k_res) + _f64(init.a) @ _f64(init.b), kernel) < 1e-6


@pytest.mark.parametrize('shape', SHAPES)
def test_ctxlr_is_the_context_aware_optimum(shape):
  x, _, kernel, stats, _ = _data(*shape)
  init = adapters.init_adapter('coala', kernel, stats, rank=RANK)
  _check_sum(init, kernel)
  # float64 reference: V_r of X K; a b = K V_r V_rᵀ, a = K V_r, b = V_rᵀ.
  vt = np.linalg.svd(_f64(x) @ _f64(kernel), full_matrices=False)[2]
  p = _projector(vt[:RANK].T)
  np.testing.assert_allclose(_f64(init.b).T @ _f64(init.b), p, atol=2e-5)
  np.testing.assert_allclose(
      _f64(init.a), _f64(kernel) @ _f64(init.b).T, rtol=1e-5, atol=1e-5
  )
  assert _rel(_f64(init.a) @ _f64(init.b), _f64(kernel) @ p) < 1e-5
  err = reference.weighted_error(x, kernel, init.a, init.b)
  opt = reference.optimal_errors(x, kernel)[RANK]
  assert (err - opt) / opt < 1e-5


def _short(d_in, d_out, n, seed=1):
  """Fewer tokens than d_in: (X, K, LayerStats)."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((n, d_in)) * np.linspace(0.3, 3, d_in)).astype(
      np.float32
  )
  kernel = rng.standard_normal((d_in, d_out)).astype(np.float32)
  return x, kernel, stats_lib.stats_from_x(jnp.asarray(x))


def _top_projector(m, rank):
  return _projector(np.linalg.svd(m, full_matrices=False)[2][:rank].T)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('rule', ['energy', 'error_ratio'])
def test_regularized_coala_is_the_ridge_optimum(shape, rule):
  # n = 12 < d_in: the data alone leave directions free; μ pulls toward K.
  x, kernel, stats = _short(*shape, n=12)
  x64, k64 = _f64(x), _f64(kernel)
  k0 = k64 @ _top_projector(x64 @ k64, RANK)  # the μ = 0 solution
  if rule == 'energy':  # μ₀ times the mean eigenvalue of XᵀX
    mu = 0.5 * np.sum(x64**2) / shape[0]
  else:  # COALA's adaptive rule: both terms equal at K₀
    mu = 0.5 * np.sum((x64 @ (k64 - k0)) ** 2) / np.sum((k64 - k0) ** 2)
  got = adapters.coala_mu(kernel, stats, rank=RANK, mu=0.5, mu_rule=rule)
  assert got == pytest.approx(mu, rel=1e-4)
  init = adapters.init_adapter(
      'coala', kernel, stats, rank=RANK, mu=0.5, mu_rule=rule
  )
  _check_sum(init, kernel)
  # float64 reference: the plain problem on [X; √μ I], top r of its X K.
  stacked = np.concatenate([x64, np.sqrt(mu) * np.eye(shape[0])])
  p = _top_projector(stacked @ k64, RANK)
  np.testing.assert_allclose(_f64(init.b).T @ _f64(init.b), p, atol=5e-5)
  assert _rel(_f64(init.a) @ _f64(init.b), k64 @ p) < 5e-5
  assert _rel(k64 @ p, k0) > 1e-3  # it is not the μ = 0 init


@pytest.mark.parametrize('shape', SHAPES)
def test_k_star_init_fits_the_data_then_keeps_k(shape):
  # n = 2 < r = 4: rank X K = 2, the μ = 0 problem has many minimisers.
  x, kernel, stats = _short(*shape, n=2)
  x64, k64 = _f64(x), _f64(kernel)
  init = adapters.init_adapter('k_star', kernel, stats, rank=RANK)
  _check_sum(init, kernel)
  # float64 reference: K P + [K (I − P)]_{r−k}, P onto the row space of XK.
  vt = np.linalg.svd(x64 @ k64, full_matrices=False)[2][:2]
  p = _projector(vt.T)
  rest = k64 @ (np.eye(shape[1]) - p)
  u, s, wt = np.linalg.svd(rest, full_matrices=False)
  want = k64 @ p + (u[:, :2] * s[:2]) @ wt[:2]
  assert _rel(_f64(init.a) @ _f64(init.b), want) < 1e-5
  # With enough data (a gap) K_* is the coala init.
  _, _, kernel, stats, _ = _data(*shape)
  star = adapters.init_adapter('k_star', kernel, stats, rank=RANK)
  plain = adapters.init_adapter('coala', kernel, stats, rank=RANK)
  assert _rel(_f64(star.a) @ _f64(star.b), _f64(plain.a) @ _f64(plain.b)) < 1e-5


def test_add_adapters_reports_each_layers_mu():
  model, _, stats = _toy_with_stats()
  report = adapters.add_adapters(
      model, stats, method='coala', rank=2, mu=0.1, split='balanced'
  )
  for name, row in report.items():
    r = _f64(stats[name].r)
    assert row['mu'] == pytest.approx(
        0.1 * np.sum(r**2) / row['d_in'], rel=1e-5
    )


@pytest.mark.parametrize('shape', SHAPES)
def test_ctxlr_kpa_freezes_the_general_directions(shape):
  _, xg, kernel, _, gstats = _data(*shape)
  init = adapters.init_adapter(
      'coala_kpa', kernel, rank=RANK, general_stats=gstats
  )
  _check_sum(init, kernel)
  # float64 reference: bottom RANK of the p = min(d_in, d_out) right
  # singular vectors of X_g K.
  p_count = min(shape)
  s, vt = np.linalg.svd(_f64(xg) @ _f64(kernel), full_matrices=False)[1:]
  v_b = vt[p_count - RANK : p_count].T
  np.testing.assert_allclose(
      _f64(init.b).T @ _f64(init.b), _projector(v_b), atol=2e-5
  )
  assert (
      _rel(_f64(init.a) @ _f64(init.b), _f64(kernel) @ _projector(v_b)) < 1e-4
  )
  # K_res loses exactly the bottom RANK directions' energy on general data:
  # ||X_g (K − K_res)||² = Σ_{i = p−r+1..p} σ_i².
  change = np.linalg.norm(_f64(xg) @ (_f64(kernel) - _f64(init.k_res)))
  expected = np.sqrt(np.sum(s[p_count - RANK : p_count] ** 2))
  np.testing.assert_allclose(change, expected, rtol=1e-4)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('method', ('pissa', 'milora'))
def test_svd_inits_take_top_or_bottom_triplets(shape, method):
  _, _, kernel, _, _ = _data(*shape)
  init = adapters.init_adapter(method, kernel, rank=RANK)
  _check_sum(init, kernel)
  u, s, vt = np.linalg.svd(_f64(kernel), full_matrices=False)
  sl = slice(0, RANK) if method == 'pissa' else slice(len(s) - RANK, None)
  expected = (u[:, sl] * s[sl]) @ vt[sl]
  assert _rel(_f64(init.a) @ _f64(init.b), expected) < 2e-5
  # Balanced split: aᵀa = b bᵀ = diag(S_r) (column signs do not matter).
  np.testing.assert_allclose(
      _f64(init.a).T @ _f64(init.a), np.diag(s[sl]), rtol=1e-4, atol=1e-4 * s[0]
  )
  np.testing.assert_allclose(
      _f64(init.b) @ _f64(init.b).T, np.diag(s[sl]), rtol=1e-4, atol=1e-4 * s[0]
  )


@pytest.mark.parametrize('shape', SHAPES)
def test_corda_ipa_matches_its_recipe_in_float64(shape):
  x, _, kernel, stats, _ = _data(*shape)
  init = adapters.init_adapter('corda', kernel, stats, rank=RANK)
  _check_sum(init, kernel)
  # CorDA (PEFT corda.py): C = XᵀX / n damped by 0.01 mean(diag C),
  # svd(W C) with W = Kᵀ, V = (Vh C⁻¹)ᵀ, A = √S Vᵀ, B = U √S; a = Aᵀ, b = Bᵀ.
  c = _f64(x).T @ _f64(x) / len(x)
  c = c + np.eye(len(c)) * np.mean(np.diag(c)) * 0.01
  c_inv = np.linalg.inv(c)
  u, s, vh = np.linalg.svd(_f64(kernel).T @ c, full_matrices=False)
  a_ref = (np.sqrt(s[:RANK])[:, None] * (vh[:RANK] @ c_inv)).T
  b_ref = (u[:, :RANK] * np.sqrt(s[:RANK])).T
  assert _rel(_f64(init.a) @ _f64(init.b), a_ref @ b_ref) < 1e-4
  signs = np.sign(np.sum(_f64(init.b) * b_ref, axis=1))  # per component
  np.testing.assert_allclose(
      _f64(init.a) * signs, a_ref, rtol=1e-3, atol=1e-4 * np.abs(a_ref).max()
  )
  np.testing.assert_allclose(
      _f64(init.b) * signs[:, None],
      b_ref,
      rtol=1e-3,
      atol=1e-4 * np.abs(b_ref).max(),
  )


def test_lora_is_zero_at_start():
  _, _, kernel, _, _ = _data(16, 24)
  init = adapters.init_adapter('lora', kernel, rank=RANK, key=jax.random.key(3))
  np.testing.assert_array_equal(init.k_res, kernel)
  np.testing.assert_array_equal(init.b, 0.0)
  bound = 1 / np.sqrt(16)
  assert np.abs(init.a).max() <= bound and np.std(init.a) > bound / 2


@pytest.mark.parametrize('shape', SHAPES)
def test_balance_keeps_the_product_and_equalises_the_factors(shape):
  _, _, kernel, stats, _ = _data(*shape)
  own = adapters.init_adapter('coala', kernel, stats, rank=RANK)
  init = adapters.init_adapter(
      'coala', kernel, stats, rank=RANK, split='balanced'
  )
  np.testing.assert_array_equal(init.k_res, own.k_res)
  assert _rel(_f64(init.a) @ _f64(init.b), _f64(own.a) @ _f64(own.b)) < 1e-6
  # float64 reference: aᵀa = b bᵀ = diag of the singular values of a b.
  s = np.linalg.svd(_f64(own.a) @ _f64(own.b), compute_uv=False)[:RANK]
  np.testing.assert_allclose(
      _f64(init.a).T @ _f64(init.a), np.diag(s), rtol=1e-5, atol=1e-5 * s[0]
  )
  np.testing.assert_allclose(
      _f64(init.b) @ _f64(init.b).T, np.diag(s), rtol=1e-5, atol=1e-5 * s[0]
  )


def test_balanced_ctxlr_without_context_is_pissa():
  _, _, kernel, _, _ = _data(24, 16)
  plain = stats_lib.LayerStats(jnp.eye(24), None, None, 24)  # X = I
  init = adapters.init_adapter(
      'coala', kernel, plain, rank=RANK, split='balanced'
  )
  ref = adapters.init_adapter('pissa', kernel, rank=RANK)
  signs = np.sign(np.sum(_f64(init.b) * _f64(ref.b), axis=1))
  np.testing.assert_allclose(_f64(init.a) * signs, ref.a, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      _f64(init.b) * signs[:, None], ref.b, rtol=1e-4, atol=1e-5
  )


def _toy_with_stats():
  model = toy_model.Toy()
  ids = jax.random.randint(jax.random.key(1), (8, 12), 0, 64)
  layers = surgery.select_linears(model)
  group_stats, group_of = calibration.calibrate(
      model, [ids[:4], ids[4:]], layers, want=calibration.Want(gram=True)
  )
  stats = {n: group_stats[group_of[n]] for n in layers}
  return model, ids, stats


@pytest.mark.parametrize('method', sorted(adapters.METHODS))
def test_add_adapters_keeps_outputs_and_trains_only_factors(method):
  model, ids, stats = _toy_with_stats()
  expected = model(ids)
  report = adapters.add_adapters(
      model, stats, method=method, rank=3, general_stats=stats
  )
  assert len(report) == 14
  layer = model.layers[0].attn.o_proj
  assert isinstance(layer, adapters.AdapterLinear) and layer.bias is not None
  atol = 0.0 if method == 'lora' else 1e-5
  np.testing.assert_allclose(model(ids), expected, rtol=1e-5, atol=atol)
  trainable = nnx.state(model, adapters.TRAINABLE)
  assert sorted({p[-1] for p, _ in nnx.to_flat_state(trainable)}) == ['a', 'b']
  assert adapters.count_trainable(model) == sum(
      3 * (r['d_in'] + r['d_out']) for r in report.values()
  )
  adapters.merge_adapters(model)  # back to nnx.Linear
  assert isinstance(model.layers[0].attn.o_proj, nnx.Linear)
  np.testing.assert_allclose(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_scaling_divides_b():
  model, ids, stats = _toy_with_stats()
  expected = model(ids)
  kernel = model.layers[1].mlp.down_proj.kernel[...]
  adapters.add_adapters(model, stats, method='coala', rank=3, scaling=4.0)
  layer = model.layers[1].mlp.down_proj
  assert layer.scaling == 4.0
  np.testing.assert_allclose(
      layer.merged_kernel(), kernel, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_errors():
  model, _, stats = _toy_with_stats()
  kernel = jnp.ones((8, 8))
  with pytest.raises(ValueError, match='Unknown method'):
    adapters.init_adapter('dora', kernel, rank=2)
  with pytest.raises(ValueError, match='rank=9'):
    adapters.init_adapter('pissa', kernel, rank=9)
  with pytest.raises(ValueError, match='coala needs task statistics'):
    adapters.init_adapter('coala', kernel, rank=2)
  with pytest.raises(ValueError, match='corda needs'):
    adapters.init_adapter(
        'corda', kernel, stats_lib.LayerStats(jnp.eye(8), None, None, 8), rank=2
    )
  with pytest.raises(ValueError, match='coala_kpa needs general_stats'):
    adapters.init_adapter('coala_kpa', kernel, rank=2)
  with pytest.raises(ValueError, match='needs general_stats for layers'):
    adapters.add_adapters(model, stats, method='coala_kpa', rank=2)
  with pytest.raises(ValueError, match='needs stats for layers'):
    adapters.add_adapters(model, {}, method='coala', rank=2)
  with pytest.raises(ValueError, match='split must be one of'):
    adapters.init_adapter('lora', kernel, rank=2, split='balanced')
  with pytest.raises(ValueError, match='split must be one of'):
    adapters.init_adapter('pissa', kernel, rank=2, split='sqrt')
  with pytest.raises(ValueError, match='do not fit'):
    adapters.AdapterLinear(jnp.ones((4, 5)), jnp.ones((4, 2)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='mu: only'):
    adapters.init_adapter('pissa', kernel, rank=2, mu=0.1)
  with pytest.raises(ValueError, match='mu must be a finite number >= 0'):
    adapters.add_adapters(model, stats, method='coala', rank=2, mu=-1.0)
  with pytest.raises(ValueError, match='mu_rule must be one of'):
    adapters.init_adapter(
        'coala',
        kernel,
        stats_lib.LayerStats(jnp.eye(8), None, None, 8),
        rank=2,
        mu=0.1,
        mu_rule='cholesky',
    )
  with pytest.raises(ValueError, match='k_star needs task statistics'):
    adapters.init_adapter('k_star', kernel, rank=2)
