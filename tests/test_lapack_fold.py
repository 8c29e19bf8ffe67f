"""The LAPACK ?tpqrt fold (XLA FFI) against float64 NumPy QR of the stack.

Through `qr.fold_r_unchecked` it is also what every CPU calibration, TSQR
and streaming test runs for inputs at least `qr.STRUCTURED_MIN_D` wide.
"""

import concurrent.futures
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr.linalg import lapack_fold
from ctxlr.linalg import qr

built = pytest.mark.skipif(
    not lapack_fold.available(), reason='the LAPACK extension is not built'
)


def _r(x):
  return np.linalg.qr(x, mode='r')


@pytest.mark.skipif(not os.environ.get('CI'), reason='CI builds it')
def test_the_install_builds_the_extension():
  # `make setup` compiles it (setup.py); a CI without it would test only
  # the dense fold.
  assert lapack_fold.available()


@built
@pytest.mark.parametrize(
    'd, b, block_size',
    [(16, 5, 4), (17, 40, 64), (100, 37, 32), (130, 8, 1), (64, 64, 64)],
)
def test_float32_fold_matches_float64_qr(d, b, block_size):
  rng = np.random.default_rng([d, b, block_size])
  x0 = rng.standard_normal((3 * d, d))
  block = rng.standard_normal((b, d)) * rng.uniform(0.1, 10, d)
  r = lapack_fold.fold(
      jnp.asarray(_r(x0), jnp.float32),
      jnp.asarray(block, jnp.float32),
      block_size=block_size,
  )
  r = np.asarray(r, np.float64)
  assert np.all(np.tril(r, -1) == 0) and np.all(np.diagonal(r) >= 0)
  assert reference.r_error(r, np.concatenate([x0, block])) < 5e-6


@built
def test_float64_first_fold_of_a_wide_block_into_zeros():
  # The case where jaxlib's float64 geqrf of [R; X_b] returned NaN.
  rng = np.random.default_rng(3)
  block = rng.standard_normal((8, 1000))
  with jax.enable_x64():
    r = lapack_fold.fold(jnp.zeros((1000, 1000)), jnp.asarray(block))
    assert r.dtype == jnp.float64
  r = np.asarray(r)
  assert np.isfinite(r).all()
  expect = _r(block)
  np.testing.assert_allclose(
      r[:8], expect * np.sign(np.diagonal(expect))[:, None], atol=1e-12
  )
  assert np.abs(r[8:]).max() < 1e-12


@built
def test_under_jit_and_vmap_and_rank_deficient():
  rng = np.random.default_rng(1)
  d = 70
  low = rng.standard_normal((3, 30, 3)) @ rng.standard_normal((3, 3, d))
  blocks = np.concatenate([low, np.zeros((3, 10, d))], axis=1)
  r = jax.jit(jax.vmap(lapack_fold.fold))(
      jnp.zeros((3, d, d)), jnp.asarray(blocks, jnp.float32)
  )
  assert r.shape == (3, d, d) and np.isfinite(np.asarray(r)).all()
  for i in range(3):
    assert reference.r_error(np.asarray(r[i], np.float64), low[i]) < 1e-5


@built
def test_nan_in_the_block_reaches_r():
  # Never repaired: calibration's finiteness flag reports it.
  block = np.ones((4, 64), np.float32)
  block[2, 5] = np.nan
  r = lapack_fold.fold(jnp.eye(64), jnp.asarray(block))
  assert not np.isfinite(np.asarray(r)).all()


@built
def test_library_fold_is_structured_on_cpu_from_the_threshold():
  def lowered(d):
    r, x = jnp.zeros((d, d)), jnp.zeros((8, d))
    return qr.fold_r_unchecked.lower(r, x).as_text()

  wide, narrow = qr.STRUCTURED_MIN_D, qr.STRUCTURED_MIN_D - 1
  assert 'ctxlr_tpqrt_float32' in lowered(wide)
  assert 'ctxlr_tpqrt' not in lowered(narrow)


@built
def test_streamed_r_matches_the_dense_fold():
  rng = np.random.default_rng(2)
  d, blocks = 96, [rng.standard_normal((b, 96)) for b in (5, 200, 96, 1)]
  structured = dense = jnp.zeros((d, d))
  for x in blocks:
    structured = qr.fold_r_unchecked(structured, jnp.asarray(x, jnp.float32))
    dense = qr.fold_r_dense(dense, jnp.asarray(x, jnp.float32))
  x = np.concatenate(blocks)
  assert reference.r_error(np.asarray(structured, np.float64), x) < 5e-6
  np.testing.assert_allclose(structured, dense, atol=2e-4 * np.abs(dense).max())


@built
def test_concurrent_calls_from_threads_finish():
  # XLA may run several folds of one step at once; each call has its own
  # work space. A hang fails through the timeout instead of blocking.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
  fold = jax.jit(lapack_fold.fold)
  expect = np.asarray(fold(jnp.zeros((128, 128)), x))

  def run(_):
    r = jnp.zeros((128, 128))
    for _ in range(20):
      r = fold(r, x)
    return np.asarray(r)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    outs = list(pool.map(run, range(8), timeout=120))
  for out in outs:  # 20 copies of x: R scales by √20
    np.testing.assert_allclose(out, np.sqrt(20) * expect, rtol=1e-4, atol=1e-3)
