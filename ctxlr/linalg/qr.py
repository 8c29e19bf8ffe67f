"""The R factor of tall matrices, one-shot and streamed (docs/method.md §2–3).

`R` is the `d × d` upper-triangular factor of a QR decomposition of the
calibration matrix `X` (`n × d`, rows are tokens), with a non-negative
diagonal: then `RᵀR = XᵀX` and `||X M||_F = ||R M||_F` for every `M`, so the
solvers never need `X`, nor its Gram matrix, again.
"""

import jax
import jax.numpy as jnp

from ctxlr.linalg import checks
from ctxlr.linalg import lapack_fold


def canonical_signs(r: jax.Array) -> jax.Array:
  """Flips rows of `r` so that its diagonal is non-negative.

  R is unique up to the signs of its rows; this picks the representative with
  `diag(R) >= 0` (a zero diagonal entry keeps its row's sign).

  Args:
    r: float[d, d] (or float[m, d], m <= d) upper-triangular matrix.

  Returns:
    The same matrix with rows multiplied by ±1.
  """
  diag = jnp.diagonal(r)
  signs = jnp.where(diag < 0, -1, 1).astype(r.dtype)
  return r * signs[:, None]


@jax.jit
def qr_r_unchecked(x: jax.Array) -> jax.Array:
  """`qr_r` without argument checks, for the package's hot loops."""
  n, d = x.shape
  x = x.astype(checks.compute_dtype(x.dtype))
  # mode='raw' is LAPACK geqrf alone; mode='r' would also build (and then
  # drop) Q with orgqr, about doubling the cost on CPU.
  packed, _ = jnp.linalg.qr(x, mode='raw')  # f[d, n]: R above diagonal
  r = jnp.triu(packed.mT[: min(n, d)])  # f[min(n, d), d]
  if n < d:  # wide X: pad to d × d
    r = jnp.pad(r, ((0, d - n), (0, 0)))
  return canonical_signs(r)  # f[d, d]


def qr_r(x: jax.Array) -> jax.Array:
  """R factor of `X`, square and with a non-negative diagonal.

  >>> qr_r(jnp.ones((100, 8))).shape
  (8, 8)

  Args:
    x: X, float[n, d]; any n >= 1. For n < d the `n × d` trapezoidal factor
      is padded with zero rows (still `RᵀR = XᵀX`).

  Returns:
    R, float[d, d] upper triangular, in float32 at least (float64 for float64
    input with x64 enabled).
  """
  checks.check_matrix('x', x)
  if x.shape[0] == 0:
    raise ValueError(f'x has shape {x.shape}: no rows (empty calibration).')
  checks.check_finite('x', x)
  return qr_r_unchecked(jnp.asarray(x))


# Below this width the structured fold's fixed costs show: at blocks of 4d
# rows it took 1.2-1.3x the dense fold's time at d = 16 and 32, 0.85x at 64
# (one core; at 2,048-row blocks it wins from d = 16).
STRUCTURED_MIN_D = 64


@jax.jit
def fold_r_unchecked(r: jax.Array, block: jax.Array) -> jax.Array:
  """`fold_r` without argument checks, for the package's hot loops.

  On CPU, where the LAPACK extension is built (`lapack_fold.available()`)
  and `d >= STRUCTURED_MIN_D`, the structured fold (`lapack_fold.fold`,
  LAPACK `?tpqrt`: R's zeros never touched); elsewhere (GPU, TPU, no
  extension) the dense QR of the stacked rows (`fold_r_dense`). Both give
  the same R to rounding (docs/method.md §3).
  """
  dtype = checks.compute_dtype(r.dtype, block.dtype)
  r, block = r.astype(dtype), block.astype(dtype)
  if r.shape[-1] < STRUCTURED_MIN_D or not lapack_fold.available():
    return fold_r_dense(r, block)
  return jax.lax.platform_dependent(
      r, block, cpu=lapack_fold.fold, default=fold_r_dense
  )


@jax.jit
def fold_r_dense(r: jax.Array, block: jax.Array) -> jax.Array:
  """The dense fold: `qr_r([X_block; R])`, R's zeros included.

  About `2(b + d)d² − 2d³/3` flops against `2.5bd²` for the structured fold
  (docs/results/bench_pipeline/); what accelerators run.
  """
  dtype = checks.compute_dtype(r.dtype, block.dtype)
  r, block = r.astype(dtype), block.astype(dtype)
  # [X_block; R], not [R; X_block]: the same R (row order does not change
  # RᵀR), but jaxlib 0.10's float64 CPU geqrf returns NaN for some wide
  # blocks under a mostly-zero R (e.g. the first fold into R = 0 with
  # d >= 1000, b = 8); data first never did (tests/test_streaming.py).
  return qr_r_unchecked(jnp.concatenate([block, r]))  # qr of [b+d, d]


def fold_r(r: jax.Array, block: jax.Array) -> jax.Array:
  """One streaming step: `R ← qr_r([R; X_block])` (docs/method.md §3).

  Starting from `R = 0` and folding blocks `X_1, X_2, …` gives the R of the
  stacked X. Zero rows change nothing, so a short last block may be
  zero-padded to keep one compiled shape.

  Args:
    r: R so far, float[d, d] upper triangular (zeros to start).
    block: X_block, float[b, d]; any b >= 1.

  Returns:
    The new R, float[d, d], non-negative diagonal.
  """
  checks.check_matrix('r', r)
  d = r.shape[1]
  checks.check_matrix('r', r, rows=d)
  checks.check_matrix('block', block, cols=d)
  checks.check_finite('r', r)
  checks.check_finite('block', block)
  if bool(jnp.any(jnp.tril(jnp.asarray(r), -1) != 0)):
    raise ValueError(
        'r must be upper triangular (an R from qr_r, fold_r or '
        'zeros); it has nonzeros below the diagonal.'
    )
  return fold_r_unchecked(jnp.asarray(r), jnp.asarray(block))


@jax.jit
def _regularize_r(r: jax.Array, mu: jax.Array) -> jax.Array:
  d = r.shape[1]
  dtype = checks.compute_dtype(r.dtype)
  ridge = jnp.sqrt(jnp.asarray(mu, dtype)) * jnp.eye(d, dtype=dtype)
  return qr_r_unchecked(
      jnp.concatenate([r.astype(dtype), ridge])
  )  # qr of [2d, d]


def regularize_r(r: jax.Array, mu: float | jax.Array) -> jax.Array:
  """R of `[X; √μ I]` from the R of X: the ridge-regularized problem (§4).

  `min ||X(K−K')||² + μ||K−K'||²` is the plain problem on `[X; √μ I]`, whose
  R is `qr_r([R; √μ I])`: X is not needed again. μ is traced (no recompile
  per value).

  Args:
    r: R of X, float[d, d] (or any float[m, d] with the same Gram, e.g. X).
    mu: μ >= 0, a scalar.

  Returns:
    R_μ, float[d, d], non-negative diagonal.
  """
  checks.check_matrix('r', r)
  if jnp.ndim(mu) != 0:
    raise ValueError(f'mu must be a scalar; got shape {jnp.shape(mu)}.')
  checks.check_nonnegative('mu', mu)
  checks.check_finite('r', r)
  return _regularize_r(jnp.asarray(r), mu)
