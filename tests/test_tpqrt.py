"""The structured fold (tpqrt) against float64 NumPy QR of the stacked rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr.linalg import qr
from ctxlr.linalg import tpqrt


def _r(x):
  return np.linalg.qr(x, mode='r') if len(x) else None


@pytest.mark.parametrize('d, b, leaf', [
    (16, 5, 4), (17, 40, 4), (100, 37, 32), (130, 8, 64), (64, 64, 64),
    (3, 1, 32)])
def test_fold_matches_float64_qr_of_the_stack(d, b, leaf):
  rng = np.random.default_rng([d, b, leaf])
  x0 = rng.standard_normal((3 * d, d))
  block = rng.standard_normal((b, d)) * rng.uniform(0.1, 10, d)
  r = tpqrt.fold(jnp.asarray(_r(x0), jnp.float32),
                 jnp.asarray(block, jnp.float32), leaf=leaf)
  r = np.asarray(qr.canonical_signs(r), np.float64)    # R up to row signs
  assert np.all(np.tril(r, -1) == 0)
  x = np.concatenate([x0, block])
  assert reference.r_error(r, x) < 5e-6               # RᵀR = XᵀX, relative


@pytest.mark.parametrize('dtype, tol', [('float32', 1e-5), ('float64', 1e-12)])
def test_first_folds_into_zero_r_with_wide_blocks(dtype, tol):
  # A mostly-zero R under a few wide rows: the case where the dense float64
  # geqrf of jaxlib 0.10 returned NaN for [R; X_block].
  rng = np.random.default_rng(0)
  d = 1024
  blocks = [rng.standard_normal((b, d)) for b in (8, 31, 33)]
  with jax.enable_x64(dtype == 'float64'):
    r = jnp.zeros((d, d), dtype)
    for i, block in enumerate(blocks):
      r = tpqrt.fold(r, jnp.asarray(block, dtype))
      x = np.concatenate(blocks[:i + 1])
      assert reference.r_error(np.asarray(qr.canonical_signs(r), np.float64),
                              x) < tol, i


def test_zero_rows_and_rank_deficient_blocks():
  rng = np.random.default_rng(1)
  d = 40
  low = rng.standard_normal((30, 3)) @ rng.standard_normal((3, d))
  block = np.concatenate([low, np.zeros((10, d))])
  r = tpqrt.fold(jnp.zeros((d, d)), jnp.asarray(block, jnp.float32), leaf=8)
  assert np.isfinite(np.asarray(r)).all()
  assert reference.r_error(np.asarray(qr.canonical_signs(r), np.float64),
                            low) < 1e-5
