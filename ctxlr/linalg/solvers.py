"""The inversion-free context-aware solver (docs/method.md §2, §7).

Given the R of the calibration inputs X (see `qr.py`) and a kernel K
(`y = x @ K`), the rank-r minimiser of `||X(K − K')||_F` is `K V_r V_rᵀ`, with
`V_r` the top right singular vectors of `R K`. QR and SVD only: no Gram matrix,
no inverse.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ctxlr.linalg import checks

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators


class Factors(NamedTuple):
  """A rank-r factorisation `K' = a @ b` and the spectrum it came from."""

  a: jax.Array  # shape=(d_in, rank), dtype of the kernel
  b: jax.Array  # shape=(rank, d_out), dtype of the kernel
  sigma: jax.Array  # shape=(min(m, d_out),), compute dtype, descending


def truncate(full: Factors, rank: int) -> Factors:
  """The first `rank` directions of factors holding at least that many.

  The jitted solvers compute all directions (COALA's `a` to a padded width,
  see `padded_width`), so they compile once per layer shape (COALA: at most
  8 small programs more for `a`); the rank is applied here, by slicing on
  the host, so that the different ranks of an allocation compile next to
  nothing. Under a transformation (jit, vmap) it is an ordinary slice of the
  traced arrays.
  """
  if not (checks.is_concrete(full.a) and checks.is_concrete(full.b)):
    return Factors(full.a[..., :rank], full.b[..., :rank, :], full.sigma)
  a = np.ascontiguousarray(np.asarray(full.a)[:, :rank])
  b = np.ascontiguousarray(np.asarray(full.b)[:rank])
  return Factors(jax.device_put(a), jax.device_put(b), full.sigma)


def padded_width(rank: int, p: int) -> int:
  """`rank` rounded up to a multiple of ceil(p/8), at most p.

  Programs whose cost grows with the rank are compiled for this width and
  their result sliced: at most 8 compiles per shape serve every rank.
  """
  step = -(-p // 8)
  return min(p, -(-rank // step) * step)


@jax.jit
def _ctx_spectrum(kernel: jax.Array, r: jax.Array):
  """σ and Vᵀ of R K (compute dtype), compiled once per layer shape."""
  dtype = checks.compute_dtype(kernel.dtype, r.dtype)
  rk = jnp.matmul(r.astype(dtype), kernel.astype(dtype), precision=_HIGHEST)
  if rk.shape[0] > rk.shape[1]:
    # R K = Q T: the same σ and V from the SVD of the square T, and neither
    # Q nor R K's U is formed (the whole solve of a 1536 x 576 layer: 67 ms
    # instead of 94, LAPACK's SVD of R K alone 76; random data, one core).
    rk = jnp.linalg.qr(rk, mode='r')
  _, sigma, vt = jnp.linalg.svd(rk, full_matrices=False)  # vt: f[p, d_out]
  return sigma, vt


@functools.partial(jax.jit, static_argnames='width')
def _ctx_a(kernel: jax.Array, vt: jax.Array, width: int) -> jax.Array:
  """a = K V_w for the first `width` right singular vectors."""
  k = kernel.astype(vt.dtype)
  return jnp.matmul(k, vt[:width].T, precision=_HIGHEST).astype(kernel.dtype)


def _ctx_full(kernel: jax.Array, r: jax.Array, rank: int) -> Factors:
  """σ and V of every direction, `a` of the first `padded_width(rank, p)`:
  `a = K V` costs d_in·d_out per direction, and the directions past the
  rank would be sliced off unused."""
  sigma, vt = _ctx_spectrum(kernel, r)
  width = padded_width(rank, vt.shape[0])
  return Factors(_ctx_a(kernel, vt, width), vt.astype(kernel.dtype), sigma)


def ctx_factors(kernel: jax.Array, r: jax.Array, *, rank: int) -> Factors:
  """Context-aware rank-`rank` factors of K from the R of X (docs/method.md §2).

  Minimises `||X(K − a b)||_F` over rank-`rank` products. With `R K = U Σ Vᵀ`,
  `a = K V_r` and `b = V_rᵀ`, so `a b` is the projection `K V_r V_rᵀ`.

  >>> x = jax.random.normal(jax.random.key(0), (256, 16))
  >>> kernel = jax.random.normal(jax.random.key(1), (16, 24))
  >>> f = ctx_factors(kernel, ctxlr.qr_r(x), rank=4)
  >>> f.a.shape, f.b.shape, f.sigma.shape
  ((16, 4), (4, 24), (16,))

  Args:
    kernel: K, float[d_in, d_out]; y = x @ K. Any float dtype (bf16 storage
      is computed in float32 and the factors cast back).
    r: R of the calibration X, float[d_in, d_in] (`qr_r`, `fold_r`,
      `regularize_r`). Any float[m, d_in] with the same Gram works, X included.
    rank: 1 <= rank <= min(d_in, d_out). Static.

  Returns:
    Factors(a: [d_in, rank], b: [rank, d_out] in the kernel's dtype, sigma:
    all singular values of `R K` in the compute dtype). The weighted error of
    every rank is `error_of_each_rank(sigma)`.
  """
  checks.check_matrix('kernel', kernel)
  d_in, d_out = kernel.shape
  checks.check_matrix('r', r, cols=d_in)
  checks.check_rank(rank, d_in, d_out)
  checks.check_finite('kernel', kernel)
  checks.check_finite('r', r)
  return truncate(_ctx_full(jnp.asarray(kernel), jnp.asarray(r), rank), rank)


@jax.jit
def _weighted_spectrum(kernel: jax.Array, r: jax.Array) -> jax.Array:
  dtype = checks.compute_dtype(kernel.dtype, r.dtype)
  rk = jnp.matmul(r.astype(dtype), kernel.astype(dtype), precision=_HIGHEST)
  return jnp.linalg.svd(rk, compute_uv=False)


def weighted_spectrum(kernel: jax.Array, r: jax.Array) -> jax.Array:
  """σ(R K) alone (no singular vectors): `ctx_factors(...).sigma`, cheaper.

  Enough for `error_of_each_rank` and rank allocation.

  Args:
    kernel: K, float[d_in, d_out].
    r: R of X, float[m, d_in].

  Returns:
    float[min(m, d_out)], descending.
  """
  checks.check_matrix('kernel', kernel)
  checks.check_matrix('r', r, cols=kernel.shape[0])
  checks.check_finite('kernel', kernel)
  checks.check_finite('r', r)
  return _weighted_spectrum(jnp.asarray(kernel), jnp.asarray(r))


def error_of_each_rank(sigma: jax.Array) -> jax.Array:
  """`||X(K − K_k)||_F` for every rank k = 0 … p, from the spectrum of R K.

  The optimal rank-k error is `sqrt(Σ_{i>k} σ_i²)` (Eckart–Young), so one SVD
  gives the whole curve. Tail sums are accumulated from the smallest σ up.

  Args:
    sigma: singular values of R K, float[p], descending.

  Returns:
    float[p + 1]: entry k is the error at rank k (entry 0 is `||XK||_F`,
    entry p is 0). Divide by entry 0 for relative errors.
  """
  sigma = jnp.asarray(sigma)
  if sigma.ndim != 1:
    raise ValueError(
        f'sigma must be a vector (1-D) of singular values; got '
        f'shape {sigma.shape}.'
    )
  tail = jnp.cumsum(jnp.square(sigma)[::-1])[::-1]  # Σ_{i>=k} σ_i²
  return jnp.sqrt(jnp.concatenate([tail, jnp.zeros((1,), tail.dtype)]))


def rank_for_ratio(d_in: int, d_out: int, ratio: float) -> int:
  """The rank that keeps a fraction `ratio` of a layer's parameters (§7).

  A rank-r factored `d_in × d_out` layer stores `r (d_in + d_out)` numbers,
  so `r = floor(ratio · d_in d_out / (d_in + d_out))`, clipped to
  `[1, min(d_in, d_out)]`. Whether factoring pays at all is
  `saves_parameters`.

  >>> rank_for_ratio(576, 1536, 0.5)
  209

  Args:
    d_in: input features of the layer.
    d_out: output features of the layer.
    ratio: kept fraction of parameters, in (0, 1].

  Returns:
    The rank, an int.
  """
  if not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1]; got {ratio}.')
  if d_in < 1 or d_out < 1:
    raise ValueError(f'Layer sizes must be positive; got ({d_in}, {d_out}).')
  rank = math.floor(ratio * d_in * d_out / (d_in + d_out))
  return max(1, min(rank, d_in, d_out))


def saves_parameters(d_in: int, d_out: int, rank: int) -> bool:
  """True if rank-`rank` factors store fewer numbers than the dense kernel.

  Layers where it is False stay dense (docs/method.md §7).
  """
  return rank * (d_in + d_out) < d_in * d_out


MU_RULES = ('energy', 'error_ratio')


def layer_mu(
    kernel: jax.Array,
    r: jax.Array,
    mu0: float,
    *,
    rank: int,
    rule: str = 'energy',
) -> jax.Array:
  """Per-layer μ from one global μ₀ (docs/method.md §4).

  `energy`: `μ = μ₀ ||X||_F² / d_in = μ₀ ||R||_F² / d_in`, the mean eigenvalue
  of XᵀX: scales with the layer's activations and never vanishes.
  `error_ratio`: `μ = μ₀ (||X(K − K₀)||_F / ||K − K₀||_F)²` with K₀ the μ = 0
  rank-`rank` solution, so both terms of (P_μ) are of comparable size. When
  the data are insufficient (rank(XK) <= rank) K₀ fits them exactly, the
  numerator is 0 (in floating point a rounding-level number, measured
  <= 1e-20 of the energy rule's μ) and this rule gives μ ≈ 0 — exactly where
  regularization is needed; prefer `energy` then.

  Args:
    kernel: K, float[d_in, d_out].
    r: R of X, float[m, d_in].
    mu0: μ₀ >= 0.
    rank: the rank to be solved for (used by `error_ratio`).
    rule: 'energy' or 'error_ratio'.

  Returns:
    μ, a float32 (or float64) scalar.
  """
  if rule not in MU_RULES:
    raise ValueError(f'rule must be one of {MU_RULES}; got {rule!r}.')
  checks.check_nonnegative('mu0', mu0)
  d_in = kernel.shape[0]
  dtype = checks.compute_dtype(kernel.dtype, r.dtype)
  r = jnp.asarray(r, dtype)
  if rule == 'energy':
    return mu0 * jnp.sum(jnp.square(r)) / d_in
  f = ctx_factors(kernel, r, rank=rank)
  data_err2 = jnp.square(error_of_each_rank(f.sigma)[rank])
  k = jnp.asarray(kernel, dtype)
  change2 = jnp.sum(
      jnp.square(
          k
          - jnp.matmul(f.a.astype(dtype), f.b.astype(dtype), precision=_HIGHEST)
      )
  )
  return jnp.where(
      change2 > 0, mu0 * data_err2 / jnp.where(change2 > 0, change2, 1), 0.0
  )
