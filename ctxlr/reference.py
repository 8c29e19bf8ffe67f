"""Float64 NumPy references and controlled test matrices.

Plain NumPy in float64, independent of the JAX solvers: tests and experiments
measure the solvers against these. Nothing in the solvers imports this file.
"""
import numpy as np


def matrix_with_singular_values(rng: np.random.Generator, n: int,
                                sigma: np.ndarray) -> np.ndarray:
  """float64[n, d] with exactly the singular values `sigma` (length d)."""
  d = len(sigma)
  u, _ = np.linalg.qr(rng.standard_normal((n, d)))
  v, _ = np.linalg.qr(rng.standard_normal((d, d)))
  return (u * sigma) @ v.T


def activations(rng: np.random.Generator, n: int, d: int, *, cond: float = 1.,
                rank: int | None = None) -> np.ndarray:
  """float64[n, d] with log-spaced singular values 1 … 1/cond (for n >= d).

  With `rank`, only the first `rank` singular values are non-zero (exactly
  rank-deficient X). For n < d, X is the first n rows of the d × d matrix
  with singular values 1 … 1/cond over its first n (zeros after): its own
  singular values interlace those and are not exactly them (cond(X) can be
  larger), but rank X <= n still holds; `matrix_with_singular_values` gives
  exact values for any shape with n >= len(sigma).
  """
  k = min(n, d)
  sigma = np.zeros(d)
  sigma[:k] = np.logspace(0, -np.log10(cond), k)
  if rank is not None:
    sigma[rank:] = 0.
  x = matrix_with_singular_values(rng, max(n, d), sigma)
  return x[:n]


def r_factor(x: np.ndarray) -> np.ndarray:
  """float64 R of x, square (zero-padded if n < d), non-negative diagonal."""
  n, d = x.shape
  r = np.linalg.qr(np.asarray(x, np.float64), mode='r')
  r = np.pad(r, ((0, d - r.shape[0]), (0, 0)))
  signs = np.where(np.diag(r) < 0, -1., 1.)
  return r * signs[:, None]


def r_error(r, x: np.ndarray) -> float:
  """||R − R_ref||_F / ||R_ref||_F against the float64 R of x (signs fixed)."""
  expected = r_factor(x)
  return float(np.linalg.norm(np.asarray(r, np.float64) - expected) /
               np.linalg.norm(expected))


def optimal_errors(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """opt[k] = min_{rank ≤ k} ||X(K − K')||_F = sqrt(Σ_{i>k} σ_i(XK)²)."""
  s = np.linalg.svd(np.asarray(x, np.float64) @ np.asarray(kernel, np.float64),
                    compute_uv=False)
  tail = np.cumsum((s**2)[::-1])[::-1]
  return np.sqrt(np.concatenate([tail, [0.]]))


def weighted_error(x, kernel, a, b) -> float:
  """||X(K − a b)||_F evaluated in float64."""
  f64 = lambda m: np.asarray(m, np.float64)
  return float(np.linalg.norm(f64(x) @ (f64(kernel) - f64(a) @ f64(b))))
