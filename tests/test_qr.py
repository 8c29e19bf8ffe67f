"""qr_r, fold_r, regularize_r against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctxlr
from ctxlr import reference


def _rel(a, b):
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


@pytest.mark.parametrize('n,d', [(64, 16), (16, 16), (5, 16), (1, 8)])
def test_qr_r_matches_float64_reference(n, d):
  x = reference.activations(np.random.default_rng(0), n, d, cond=10.0)
  r = ctxlr.qr_r(jnp.asarray(x, jnp.float32))
  assert r.shape == (d, d) and r.dtype == jnp.float32
  np.testing.assert_array_equal(np.tril(np.asarray(r), -1), 0.0)
  assert (np.diag(np.asarray(r)) >= 0).all()
  assert _rel(r, reference.r_factor(x)) < 1e-5
  gram = x.T @ x
  assert (
      _rel(np.asarray(r, np.float64).T @ np.asarray(r, np.float64), gram) < 1e-5
  )


def test_qr_r_float64_with_x64():
  x = reference.activations(np.random.default_rng(1), 40, 12, cond=1e6)
  with jax.enable_x64(True):
    r = ctxlr.qr_r(jnp.asarray(x))
    assert r.dtype == jnp.float64
    assert _rel(r, reference.r_factor(x)) < 1e-12


def test_qr_r_bf16_input_computes_in_float32():
  x = reference.activations(np.random.default_rng(2), 64, 16)
  xb = jnp.asarray(x, jnp.bfloat16)
  r = ctxlr.qr_r(xb)
  assert r.dtype == jnp.float32
  assert _rel(r, reference.r_factor(np.asarray(xb, np.float64))) < 1e-5


def test_streaming_with_random_blocks_and_padding_equals_one_shot():
  rng = np.random.default_rng(3)
  d, n = 12, 203
  x = reference.activations(rng, n, d, cond=1e3)
  block = 16  # one compiled shape
  r = jnp.zeros((d, d), jnp.float32)
  start = 0
  while start < n:
    size = int(rng.integers(1, block + 1))  # random row counts ≤ block
    blk = x[start : start + size]
    blk = np.pad(blk, ((0, block - len(blk)), (0, 0)))  # zero rows
    r = ctxlr.fold_r(r, jnp.asarray(blk, jnp.float32))
    start += size
  assert _rel(r, reference.r_factor(x)) < 1e-5


def test_fold_r_zero_rows_change_nothing():
  x = reference.activations(np.random.default_rng(4), 32, 8)
  r = ctxlr.qr_r(jnp.asarray(x, jnp.float32))
  r2 = ctxlr.fold_r(r, jnp.zeros((5, 8), jnp.float32))
  np.testing.assert_allclose(r2, r, rtol=1e-6, atol=1e-6)


def test_canonical_signs_makes_diagonal_nonnegative():
  r = jnp.array([[-2.0, 1.0], [0.0, -3.0]])
  np.testing.assert_array_equal(
      ctxlr.linalg.canonical_signs(r), [[2.0, -1.0], [0.0, 3.0]]
  )


@pytest.mark.parametrize('mu', [0.0, 1e-3, 2.5])
def test_regularize_r_is_r_of_stacked_ridge(mu):
  x = reference.activations(np.random.default_rng(5), 10, 16)  # n < d
  r = ctxlr.qr_r(jnp.asarray(x, jnp.float32))
  r_mu = ctxlr.regularize_r(r, mu)
  expected = reference.r_factor(np.vstack([x, np.sqrt(mu) * np.eye(16)]))
  assert _rel(r_mu, expected) < 1e-5


def test_regularize_r_mu_is_traced():
  r = jnp.eye(4)
  f = jax.jit(ctxlr.regularize_r)
  np.testing.assert_allclose(f(r, 3.0), 2.0 * np.eye(4), rtol=1e-6)


@pytest.mark.parametrize(
    'call,match',
    [
        (lambda: ctxlr.qr_r(jnp.ones(5)), 'x must be a matrix'),
        (lambda: ctxlr.qr_r(jnp.ones((0, 4))), 'no rows'),
        (lambda: ctxlr.qr_r(jnp.ones((4, 4), jnp.int32)), 'floating point'),
        (lambda: ctxlr.qr_r(jnp.array([[1.0, jnp.nan]])), 'x contains 1 NaN'),
        (
            lambda: ctxlr.fold_r(jnp.zeros((4, 4)), jnp.ones((2, 3))),
            'block has shape',
        ),
        (
            lambda: ctxlr.fold_r(jnp.zeros((4, 3)), jnp.ones((2, 3))),
            'r has shape',
        ),
        (
            lambda: ctxlr.fold_r(jnp.zeros((3, 3)), jnp.full((2, 3), jnp.inf)),
            'block contains 6 NaN or Inf',
        ),
        (
            lambda: ctxlr.fold_r(jnp.ones((3, 3)), jnp.ones((2, 3))),
            'r must be upper triangular',
        ),
        (lambda: ctxlr.regularize_r(jnp.eye(3), -1e-3), 'mu must be'),
        (lambda: ctxlr.regularize_r(jnp.eye(3), jnp.ones(2)), 'mu must be a'),
    ],
)
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
