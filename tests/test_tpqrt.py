"""The structured fold (tpqrt) against float64 NumPy QR of the stacked rows.

Through `qr.fold_r` it is also checked by tests/test_streaming.py (the
mostly-zero R under wide blocks, float32 and float64) and every calibration
test.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr.linalg import qr
from ctxlr.linalg import tpqrt


def _r(x):
  return np.linalg.qr(x, mode='r') if len(x) else None


@pytest.mark.parametrize(
    'd, b, leaf',
    [
        (16, 5, 4),
        (17, 40, 4),
        (100, 37, 32),
        (130, 8, 64),
        (64, 64, 64),
        (3, 1, 32),
    ],
)
def test_fold_matches_float64_qr_of_the_stack(d, b, leaf):
  rng = np.random.default_rng([d, b, leaf])
  x0 = rng.standard_normal((3 * d, d))
  block = rng.standard_normal((b, d)) * rng.uniform(0.1, 10, d)
  r = tpqrt.fold(
      jnp.asarray(_r(x0), jnp.float32),
      jnp.asarray(block, jnp.float32),
      leaf=leaf,
  )
  r = np.asarray(qr.canonical_signs(r), np.float64)  # R up to row signs
  assert np.all(np.tril(r, -1) == 0)
  x = np.concatenate([x0, block])
  assert reference.r_error(r, x) < 5e-6  # RᵀR = XᵀX, relative


def test_zero_rows_and_rank_deficient_blocks():
  rng = np.random.default_rng(1)
  d = 40
  low = rng.standard_normal((30, 3)) @ rng.standard_normal((3, d))
  block = np.concatenate([low, np.zeros((10, d))])
  r = tpqrt.fold(jnp.zeros((d, d)), jnp.asarray(block, jnp.float32), leaf=8)
  assert np.isfinite(np.asarray(r)).all()
  assert (
      reference.r_error(np.asarray(qr.canonical_signs(r), np.float64), low)
      < 1e-5
  )
