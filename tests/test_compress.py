"""End-to-end compression of a toy NNX model: optimality, resume, errors."""

import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import pipeline
from ctxlr import reference
from ctxlr import store as store_lib
from ctxlr import surgery
from tests import toy_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches(seed=0, count=3):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.integers(0, 64, (2, 12))) for _ in range(count)]


def test_one_shot_ctxlr_is_layerwise_optimal_in_float64():
  model, dense = toy_model.Toy(), toy_model.Toy()
  batches = _batches()
  report = pipeline.compress(model, batches, ratio=0.5, include=('layers.0.*',))
  # Reference: layer 0's q/k/v input captured from the dense model.
  x = np.concatenate(
      [
          np.asarray(dense.layers[0].norm(dense.embed(b)), np.float64).reshape(
              -1, 16
          )
          for b in batches
      ]
  )
  for name in ('layers.0.attn.q_proj', 'layers.0.attn.v_proj'):
    kernel = np.asarray(surgery.get_module(dense, name).kernel[...])
    layer = surgery.get_module(model, name)
    rank = report['layers'][name]['rank']
    assert isinstance(layer, surgery.FactoredLinear) and layer.rank == rank
    opt = reference.optimal_errors(x, kernel)
    err = reference.weighted_error(x, kernel, layer.a[...], layer.b[...])
    assert (err - opt[rank]) / opt[0] < 2e-6
    np.testing.assert_allclose(
        report['layers'][name]['rel_err'], opt[rank] / opt[0], rtol=1e-4
    )
  assert isinstance(
      model.layers[1].attn.q_proj, type(dense.layers[1].attn.q_proj)
  )  # untouched


def test_report_ratios_and_dense_fallback():
  model = toy_model.Toy()
  report = pipeline.compress(model, _batches(), ratio=0.5)
  layers = report['layers']
  assert layers['layers.0.attn.q_proj']['rank'] == 4  # 0.5·256/32
  assert layers['layers.0.mlp.up_proj']['rank'] == 5  # 0.5·640/56
  assert 0.4 < report['kept_ratio'] <= 0.5
  assert report['model_ratio'] < 1
  model = toy_model.Toy()
  report = pipeline.compress(model, _batches(), ratio=1.0)
  # docs/method.md §7: ratio 1 keeps every layer dense, also a 16x40 one whose
  # rank floor(640/56) = 11 would store 616 < 640 numbers.
  assert all(row['rank'] is None for row in report['layers'].values())
  assert isinstance(model.layers[0].attn.q_proj, type(toy_model.Toy().lm_head))
  assert isinstance(model.layers[0].mlp.up_proj, type(toy_model.Toy().lm_head))


def test_global_allocation_spends_the_same_budget_better():
  shapes_total = None
  results = {}
  for rule in ('uniform', 'global'):
    model = toy_model.Toy()
    report = pipeline.compress(model, _batches(), ratio=0.5, allocation=rule)
    errs = [r['rel_err'] ** 2 for r in report['layers'].values()]
    results[rule] = (report['kept_ratio'], sum(errs))
    shapes_total = len(errs)
  assert shapes_total == 14
  assert results['global'][0] <= 0.5 + 1e-9
  assert results['global'][1] < results['uniform'][1]


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(ratio=0.0), r'ratio must be in \(0, 1\]'),
        (dict(ratio=1.5), r'ratio must be in \(0, 1\]'),
        (dict(ratio=0.5, method='nope'), 'method must be one of'),
        (dict(ratio=0.5, mu=-1.0), 'mu must be >= 0'),
        (dict(ratio=0.5, mu=1.0, method='svd_llm'), 'mu > 0'),
        (dict(ratio=0.5, allocation='best'), 'allocation must be one of'),
        (dict(ratio=0.5, include=('*nothing*',)), "Pattern '\\*nothing\\*'"),
    ],
)
def test_bad_options_raise_before_work(kwargs, match):
  def exploding():
    raise AssertionError('data were read before the options were checked')
    yield  # pylint: disable=unreachable

  with pytest.raises(ValueError, match=match):
    pipeline.compress(toy_model.Toy(), exploding(), **kwargs)


def test_empty_calibration_raises():
  with pytest.raises(ValueError, match='calibration stream is empty'):
    pipeline.compress(toy_model.Toy(), [], ratio=0.5)


def _worker(checkpoint_dir, out, kill_after=None):
  cmd = [sys.executable, '-m', 'tests.compress_worker', checkpoint_dir, out]
  if kill_after is not None:
    cmd.append(str(kill_after))
  return subprocess.run(
      cmd, cwd=ROOT, capture_output=True, timeout=300, text=True
  )


def test_sigkill_then_resume_gives_identical_factors(tmp_path):
  full = _worker(str(tmp_path / 'a'), str(tmp_path / 'full.npz'))
  assert full.returncode == 0, full.stderr[-2000:]
  killed = _worker(str(tmp_path / 'b'), str(tmp_path / 'x.npz'), kill_after=5)
  assert killed.returncode == -9  # really SIGKILLed
  layers = sorted(os.listdir(tmp_path / 'b' / 'layers'))
  assert len([f for f in layers if f.endswith('.safetensors')]) == 5
  assert not any(f.endswith('.tmp') for f in layers)
  resumed = _worker(str(tmp_path / 'b'), str(tmp_path / 'resumed.npz'))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'calibrate' not in resumed.stderr  # statistics reloaded
  a, b = np.load(tmp_path / 'full.npz'), np.load(tmp_path / 'resumed.npz')
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_mismatched_or_corrupt_checkpoint_is_refused(tmp_path):
  ckpt = str(tmp_path / 'run')
  pipeline.compress(
      toy_model.Toy(),
      _batches(),
      ratio=0.5,
      checkpoint_dir=ckpt,
      data_id={'seed': 0},
  )
  with pytest.raises(ValueError, match=r"differs in \['ratio'\]"):
    pipeline.compress(
        toy_model.Toy(),
        _batches(),
        ratio=0.6,
        checkpoint_dir=ckpt,
        data_id={'seed': 0},
    )
  with pytest.raises(ValueError, match=r"differs in \['kernels'\]"):
    pipeline.compress(
        toy_model.Toy(seed=1),
        _batches(),
        ratio=0.5,
        checkpoint_dir=ckpt,
        data_id={'seed': 0},
    )
  with pytest.raises(ValueError, match=r"differs in \['data'\]"):
    pipeline.compress(
        toy_model.Toy(),
        _batches(),
        ratio=0.5,
        checkpoint_dir=ckpt,
        data_id={'seed': 1},
    )
  path = os.path.join(ckpt, 'layers', 'layers.0.attn.q_proj.safetensors')
  with open(path, 'r+b') as f:
    f.seek(-4, os.SEEK_END)
    f.write(b'\x00\x01\x02\x03')
  # A file that does not verify is not finished: recomputed, not refused.
  pipeline.compress(
      toy_model.Toy(),
      _batches(),
      ratio=0.5,
      checkpoint_dir=ckpt,
      data_id={'seed': 0},
  )
  store_lib.read_verified(path)


def test_sequential_calibrates_on_compressed_predecessors():
  batches = _batches()
  seq, one = toy_model.Toy(), toy_model.Toy()
  rep_seq = pipeline.compress(seq, batches, ratio=0.5, mode='sequential')
  pipeline.compress(one, batches, ratio=0.5)
  # Block 0 sees the same (dense) inputs in both modes: same factors.
  np.testing.assert_allclose(
      seq.layers[0].attn.q_proj.a[...] @ seq.layers[0].attn.q_proj.b[...],
      one.layers[0].attn.q_proj.a[...] @ one.layers[0].attn.q_proj.b[...],
      atol=1e-5,
  )
  # Block 1 is calibrated on the outputs of the compressed block 0: its
  # stats are the R of those outputs (float64 reference).
  x = np.concatenate(
      [
          np.asarray(
              seq.layers[1].norm(seq.layers[0](seq.embed(b))), np.float64
          ).reshape(-1, 16)
          for b in batches
      ]
  )
  dense_k = np.asarray(toy_model.Toy().layers[1].attn.q_proj.kernel[...])
  rank = rep_seq['layers']['layers.1.attn.q_proj']['rank']
  opt = reference.optimal_errors(x, dense_k)
  layer = seq.layers[1].attn.q_proj
  err = reference.weighted_error(x, dense_k, layer.a[...], layer.b[...])
  assert (err - opt[rank]) / opt[0] < 2e-6


def test_sequential_needs_blocks():
  class Wrapped(nnx.Module):

    def __init__(self):
      self.inner = toy_model.Toy()

    def __call__(self, ids):
      return self.inner(ids)

  with pytest.raises(ValueError, match="mode='sequential' needs model.embed"):
    pipeline.compress(Wrapped(), _batches(), ratio=0.5, mode='sequential')


def test_save_load_orbax_and_safetensors_give_identical_logits(tmp_path):
  from ctxlr import checkpoint  # pylint: disable=g-import-not-at-top

  model = toy_model.Toy()
  pipeline.compress(model, _batches(), ratio=0.5)
  ids = jnp.arange(10).reshape(1, 10)
  logits = model(ids)
  checkpoint.save(model, str(tmp_path / 'ckpt'), base={'toy': True})
  restored = checkpoint.load(str(tmp_path / 'ckpt'), toy_model.Toy)
  assert isinstance(restored.layers[1].mlp.up_proj, surgery.FactoredLinear)
  np.testing.assert_array_equal(restored(ids), logits)
  checkpoint.export_factors(model, str(tmp_path / 'f.safetensors'))
  dense = toy_model.Toy()  # same dense weights (seed 0): biases, norms
  checkpoint.import_factors(dense, str(tmp_path / 'f.safetensors'))
  np.testing.assert_array_equal(dense(ids), logits)
  with pytest.raises(ValueError, match='another model'):
    checkpoint.import_factors(
        toy_model.Toy(d=8), str(tmp_path / 'f.safetensors')
    )


def test_insufficient_data_is_flagged_and_auto_regularized_toward_k_star():
  import ctxlr  # pylint: disable=g-import-not-at-top

  batches = [jnp.arange(5, dtype=jnp.int32)[None]]  # 5 tokens < d_in = 16
  plain, auto = toy_model.Toy(), toy_model.Toy()
  rep0 = pipeline.compress(plain, batches, ratio=0.9, include=('layers.0.*',))
  rep1 = pipeline.compress(
      auto, batches, ratio=0.9, include=('layers.0.*',), auto_mu=1e-7
  )
  name = 'layers.0.attn.q_proj'  # 16x16 at rank 7 > 5
  assert rep0['layers'][name]['insufficient_data']
  assert rep0['layers'][name]['mu'] == 0 and not rep0['layers'][name]['auto_mu']
  assert rep1['layers'][name]['auto_mu'] and rep1['layers'][name]['mu'] > 0
  # K_mu -> K_* (the minimiser closest to K) as mu -> 0; mu = 0 is elsewhere.
  dense = toy_model.Toy()
  x = np.asarray(
      dense.layers[0].norm(dense.embed(batches[0])), np.float64
  ).reshape(-1, 16)
  kernel = np.asarray(dense.layers[0].attn.q_proj.kernel[...], np.float64)
  star = ctxlr.k_star(kernel, x, rank=7)
  k_star = np.asarray(star.a, np.float64) @ np.asarray(star.b, np.float64)

  def dist(model):
    layer = model.layers[0].attn.q_proj
    k = np.asarray(layer.a[...], np.float64) @ np.asarray(layer.b[...])
    return np.linalg.norm(k - k_star) / np.linalg.norm(k_star)

  assert dist(auto) < 1e-2 < 0.1 < dist(plain)


@pytest.mark.parametrize('mode', ['one_shot', 'sequential'])
def test_compress_on_8_devices_matches_one_device(mode):
  import jax  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), ('data',))
  one, many = toy_model.Toy(), toy_model.Toy()
  rep1 = pipeline.compress(one, _batches(), ratio=0.5, mode=mode)
  rep8 = pipeline.compress(many, _batches(), ratio=0.5, mode=mode, mesh=mesh)
  for name, row in rep1['layers'].items():
    assert rep8['layers'][name]['rank'] == row['rank']
    np.testing.assert_allclose(
        rep8['layers'][name]['rel_err'], row['rel_err'], rtol=1e-4
    )
    a, b = surgery.get_module(one, name), surgery.get_module(many, name)
    np.testing.assert_allclose(
        a.a[...] @ a.b[...], b.a[...] @ b.b[...], atol=2e-4
    )


def test_k_star_method_is_the_desired_solution():
  import ctxlr  # pylint: disable=g-import-not-at-top

  batches = [jnp.arange(5, dtype=jnp.int32)[None]]  # 5 tokens < rank 7
  model, dense = toy_model.Toy(), toy_model.Toy()
  report = pipeline.compress(
      model, batches, ratio=0.9, method='k_star', include=('layers.0.attn.*',)
  )
  assert report['layers']['layers.0.attn.q_proj']['rank'] == 7
  x = np.asarray(
      dense.layers[0].norm(dense.embed(batches[0])), np.float64
  ).reshape(-1, 16)
  kernel = np.asarray(dense.layers[0].attn.q_proj.kernel[...], np.float64)
  star = ctxlr.k_star(kernel, x, rank=7)
  layer = model.layers[0].attn.q_proj
  np.testing.assert_allclose(
      np.asarray(layer.a[...] @ layer.b[...]),
      np.asarray(star.a @ star.b),
      atol=1e-5,
  )


def test_solve_errors_name_the_layer():
  model = toy_model.Toy()
  model.layers[1].mlp.up_proj.kernel[...] = jnp.full((16, 40), jnp.inf)
  with pytest.raises(ValueError, match='layers.1.mlp.up_proj: kernel contains'):
    pipeline.compress(model, _batches(), ratio=0.5, include=('*.up_proj',))


def test_float64_statistics_for_k_star_and_float32_for_the_rest():
  few = [jnp.arange(5, dtype=jnp.int32)[None]]  # 5 tokens < rank 7
  with jax.enable_x64(True):
    star64, ctx64 = toy_model.Toy(), toy_model.Toy()
    rep = pipeline.compress(
        star64,
        few,
        ratio=0.9,
        method='k_star',
        include=('layers.0.attn.*',),
        stats_dtype=jnp.float64,
    )
    pipeline.compress(ctx64, _batches(), ratio=0.5, stats_dtype=jnp.float64)
  star32, ctx32 = toy_model.Toy(), toy_model.Toy()
  pipeline.compress(
      star32, few, ratio=0.9, method='k_star', include=('layers.0.attn.*',)
  )
  pipeline.compress(ctx32, _batches(), ratio=0.5)
  assert rep['layers']['layers.0.attn.q_proj']['insufficient_data']
  product = lambda m: np.asarray(
      m.layers[0].attn.q_proj.a[...] @ m.layers[0].attn.q_proj.b[...],
      np.float64,
  )
  # The float32 methods get the float64 statistics rounded to float32: the
  # same factors as from float32 statistics; K_* is the same minimiser.
  np.testing.assert_allclose(product(ctx64), product(ctx32), atol=1e-4)
  np.testing.assert_allclose(product(star64), product(star32), atol=1e-4)
  assert star64.layers[0].attn.q_proj.a.dtype == jnp.float32
  with pytest.raises(ValueError, match='64-bit JAX'):
    pipeline.compress(toy_model.Toy(), few, ratio=0.9, stats_dtype=jnp.float64)


def test_numerical_rank_is_remembered_per_array_only():
  r = jnp.triu(jnp.ones((6, 6))).at[5, 5].set(0.0)
  assert pipeline.numerical_rank(r) == 5
  assert id(r) in pipeline._RANKS  # pylint: disable=protected-access
  assert pipeline.numerical_rank(r) == 5  # from the memo
  r_np = np.eye(6, dtype=np.float32)
  assert pipeline.numerical_rank(r_np) == 6
  r_np[5, 5] = 0.0  # NumPy can change in place: never remembered
  assert pipeline.numerical_rank(r_np) == 5
  key = id(r)
  del r
  assert key not in pipeline._RANKS  # pylint: disable=protected-access


@pytest.mark.parametrize('method', ['coala', 'svd_llm', 'asvd'])
def test_full_rank_cache_gives_the_direct_factors(method):
  """A sweep's `full` cache: one full-rank solve per layer, each rank its
  truncation, the same factors as solving that rank directly; methods that
  are not nested (ASVD's randomized SVD) are solved directly every time."""
  from ctxlr import stats as stats_lib  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((64, 10)), jnp.float32)
  kernels = {
      n: jnp.asarray(rng.standard_normal((10, 8)), jnp.float32)
      for n in ('a', 'b')
  }
  s = stats_lib.stats_from_x(x, gram=True, abs_sum=True)
  stats = dict(a=s, b=s)
  full = {}
  for ranks in (dict(a=2, b=5), dict(a=6, b=None), dict(a=2, b=5)):
    cached = pipeline.factorize_layers(
        kernels, stats, ranks, method=method, full=full
    )
    direct = pipeline.factorize_layers(kernels, stats, ranks, method=method)
    assert set(cached) == set(direct) == {n for n in ranks if ranks[n]}
    for n in cached:
      np.testing.assert_allclose(cached[n]['a'], direct[n]['a'], atol=1e-6)
      np.testing.assert_allclose(cached[n]['b'], direct[n]['b'], atol=1e-6)
      assert cached[n]['rel_err'] == pytest.approx(direct[n]['rel_err'])
  assert len(full) == (0 if method == 'asvd' else 2)
