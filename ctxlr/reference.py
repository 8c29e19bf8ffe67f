"""Float64 NumPy references and controlled test matrices.

Plain NumPy in float64, independent of the JAX solvers: tests and experiments
measure the solvers against these. Nothing in the solvers imports this file.
"""

import math

import numpy as np


def matrix_with_singular_values(
    rng: np.random.Generator, n: int, sigma: np.ndarray
) -> np.ndarray:
  """float64[n, d] with exactly the singular values `sigma` (length d)."""
  d = len(sigma)
  u, _ = np.linalg.qr(rng.standard_normal((n, d)))
  v, _ = np.linalg.qr(rng.standard_normal((d, d)))
  return (u * sigma) @ v.T


def activations(
    rng: np.random.Generator,
    n: int,
    d: int,
    *,
    cond: float = 1.0,
    rank: int | None = None,
) -> np.ndarray:
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
    sigma[rank:] = 0.0
  x = matrix_with_singular_values(rng, max(n, d), sigma)
  return x[:n]


def r_factor(x: np.ndarray) -> np.ndarray:
  """float64 R of x, square (zero-padded if n < d), non-negative diagonal."""
  n, d = x.shape
  r = np.linalg.qr(np.asarray(x, np.float64), mode='r')
  r = np.pad(r, ((0, d - r.shape[0]), (0, 0)))
  signs = np.where(np.diag(r) < 0, -1.0, 1.0)
  return r * signs[:, None]


def r_error(r, x: np.ndarray) -> float:
  """||R − R_ref||_F / ||R_ref||_F against the float64 R of x (signs fixed)."""
  expected = r_factor(x)
  return float(
      np.linalg.norm(np.asarray(r, np.float64) - expected)
      / np.linalg.norm(expected)
  )


def optimal_errors(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """opt[k] = min_{rank ≤ k} ||X(K − K')||_F = sqrt(Σ_{i>k} σ_i(XK)²)."""
  s = np.linalg.svd(
      np.asarray(x, np.float64) @ np.asarray(kernel, np.float64),
      compute_uv=False,
  )
  tail = np.cumsum((s**2)[::-1])[::-1]
  return np.sqrt(np.concatenate([tail, [0.0]]))


def weighted_error(x, kernel, a, b) -> float:
  """||X(K − a b)||_F evaluated in float64."""
  f64 = lambda m: np.asarray(m, np.float64)
  return float(np.linalg.norm(f64(x) @ (f64(kernel) - f64(a) @ f64(b))))


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
  return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def make_problem(
    rng: np.random.Generator,
    *,
    d_in: int,
    d_out: int,
    n: int,
    rank: int,
    cond: float = 10.0,
    x_rank: int | None = None,
    tie: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(X float64[n, d_in], K float64[d_in, d_out]) for one K_μ → K_* setting.

  X has log-spaced singular values (ratio `cond`; `x_rank`: exactly that many
  non-zero), scaled to ||X||_F² = d_in: the mean eigenvalue of XᵀX is 1, so
  the energy rule of docs/method.md §4 gives μ = μ₀ and the μ axis is
  scale-free. K is Gaussian with variance 1/d_in. With `tie=(a, t)` (needs
  n >= d_in) K is built so that σ(XK) has an exact t-fold tie at positions
  a+1 … a+t around r (a < r < a + t): X = U diag(s) Vᵀ and K = V diag(1/s) B
  with B of prescribed singular values, so XK = U B. `rank` is accepted so a
  setting's dict can be passed whole; the problem does not depend on it.
  """
  del rank
  unit = lambda x: x * math.sqrt(d_in) / np.linalg.norm(x)
  if tie is None:
    x = activations(rng, n, d_in, cond=cond, rank=x_rank)
    return unit(x), rng.standard_normal((d_in, d_out)) / math.sqrt(d_in)
  if n < d_in or x_rank is not None:
    raise ValueError('tie needs a full-column-rank X (n >= d_in, no x_rank).')
  a, t = tie
  p = min(d_in, d_out)
  if a + t > p:
    raise ValueError(f'tie={tie} does not fit {p} singular values.')
  s_x = np.logspace(0, -math.log10(cond), d_in)
  v_x = _orthonormal(rng, d_in, d_in)
  x = (_orthonormal(rng, n, d_in) * s_x) @ v_x.T  # U diag(s) Vᵀ
  s_b = np.sort(rng.uniform(0.2, 1.0, p))[::-1]
  s_b[a : a + t] = s_b[a]  # the exact tie
  b = (_orthonormal(rng, d_in, p) * s_b) @ _orthonormal(rng, d_out, p).T
  return unit(x), v_x @ (b / s_x[:, None])  # XK = U B · const
