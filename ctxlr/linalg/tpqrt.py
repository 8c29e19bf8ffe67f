"""The structured fold `R ← qr_r([R; X_b])` that never touches R's zeros.

LAPACK's `?tpqrt` problem (QR of a triangle stacked on a block), solved by
recursive Householder QR in the manner of Elmroth–Gustavson (LAPACK
`?geqrt3`). Ordered `[R; X_b]`, the reflector of column j touches only row j
of R and the block's rows, so its vector is `[e_j; v_j]` and the whole
transform is `I − [I; V] T [I; V]ᵀ` with V the `b × d` block part: R's zeros
are never stored, read or written. Split the columns in two halves: fold the
left half (recursively), apply its transform to the right half (three
matrix products), fold the right half (recursively), and combine the T
factors `T₁₂ = −T₁ (V₁ᵀ V₂) T₂`. Leaves of `LEAF` columns use LAPACK
`geqrf` on the `(w + b) × w` panel and the `?larft` recurrence for T.

Cost about `2.5 b d²` flops, almost all of them matrix products, against
`2(b + d)d² − 2d³/3` for the dense QR of the stacked matrix (LAPACK, whose
panels run at matrix-vector speed) and `2 b d²` for the Gram update
`XᵀX += X_bᵀ X_b`. Same R as the dense fold up to rounding
(docs/method.md §3).

Two implementations of the same fold. `fold` is this recursion in JAX, for
any platform. `fold_lapack` calls LAPACK's own `?tpqrt` (SciPy's, the
library jaxlib's CPU kernels use) from inside a jitted program through
`jax.pure_callback`: one custom call, so it compiles in no time however many
layers a calibration step folds (the JAX recursion unrolls into a large
program per distinct layer input, and a step of the default model inlining
one per input compiled for minutes). `qr.fold_r_unchecked` — what
calibration, streaming and TSQR run — uses `fold_lapack` on CPU and the
dense QR of the stacked rows elsewhere (cuSOLVER's geqrf on GPU, no host
round trip). Measured against the Gram update in
docs/results/bench_pipeline/.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import lapack

LEAF = 32  # columns of a leaf panel: geqrf of (32 + b) × 32
BLOCK = 64  # LAPACK ?tpqrt's block size nb (fastest of 16-128 measured)
_HI = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HI)


def _larft(v: jax.Array, tau: jax.Array) -> jax.Array:
  """Upper-triangular T with `H_1 ⋯ H_w = I − Y T Yᵀ`, `Y = [I; v]`."""
  w = v.shape[1]
  g = jnp.eye(w, dtype=v.dtype) + _mm(v.T, v)  # Yᵀ Y, f[w, w]
  idx = jnp.arange(w)

  def column(j, t):
    earlier = jnp.where(idx < j, g[:, j], 0.0)
    col = jnp.where(idx < j, -tau[j] * (t @ earlier), 0.0)
    return t.at[:, j].set(col.at[j].set(tau[j]))

  return jax.lax.fori_loop(0, w, column, jnp.zeros((w, w), v.dtype))


def _fold(
    r: jax.Array, block: jax.Array, leaf: int, want_t: bool
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(R, V, T) of `[r; block]`: r float[n, n] upper triangular, block [b, n]."""
  n = r.shape[0]
  if n <= leaf:
    h, tau = jnp.linalg.qr(jnp.concatenate([r, block]), mode='raw')
    packed = h.mT  # f[n+b, n]
    v = packed[n:]  # f[b, n]
    return jnp.triu(packed[:n]), v, _larft(v, tau) if want_t else None
  n1 = n // 2
  r1, v1, t1 = _fold(r[:n1, :n1], block[:, :n1], leaf, want_t=True)
  top, bottom = r[:n1, n1:], block[:, n1:]  # right half
  w = _mm(t1.T, top + _mm(v1.T, bottom))  # f[n1, n-n1]
  top, bottom = top - w, bottom - _mm(v1, w)
  r2, v2, t2 = _fold(r[n1:, n1:], bottom, leaf, want_t)
  out = jnp.block([[r1, top], [jnp.zeros((n - n1, n1), r.dtype), r2]])
  v = jnp.concatenate([v1, v2], axis=1)
  t = None
  if want_t:
    t12 = -_mm(_mm(t1, _mm(v1.T, v2)), t2)
    t = jnp.block([[t1, t12], [jnp.zeros((n - n1, n1), r.dtype), t2]])
  return out, v, t


@functools.partial(jax.jit, static_argnames='leaf')
def fold(r: jax.Array, block: jax.Array, *, leaf: int = LEAF) -> jax.Array:
  """R of `[r; block]` for an upper-triangular `r`.

  Args:
    r: float[d, d], upper triangular (the R so far; zeros to start).
    block: float[b, d], the rows to fold in, b >= 1, same dtype as r.
    leaf: columns per leaf panel (static).

  Returns:
    R, float[d, d] upper triangular with `RᵀR = rᵀr + blockᵀblock` to
    rounding; the signs of its rows are not normalised.
  """
  return _fold(r, block, leaf, want_t=False)[0]


def _stpqrt_host(r: np.ndarray, block: np.ndarray) -> np.ndarray:
  """LAPACK `stpqrt` of `[r; block]` on the host; R with diag >= 0."""
  n = r.shape[0]
  # Copies in Fortran order (the inputs are read-only views of XLA's
  # buffers); LAPACK overwrites them.
  a, b = np.array(r, order='F'), np.array(block, order='F')
  out, _, _, info = lapack.stpqrt(
      0, min(BLOCK, max(n, 1)), a, b, overwrite_a=1, overwrite_b=1
  )
  if info != 0:  # only on an argument error
    raise RuntimeError(f'LAPACK stpqrt returned info={info}.')
  out = np.triu(out)
  signs = np.where(np.diagonal(out) < 0, -1, 1).astype(out.dtype)
  return out * signs[:, None]


def fold_lapack(r: jax.Array, block: jax.Array) -> jax.Array:
  """`fold`, by LAPACK's `stpqrt` through a host callback (CPU, float32).

  float32 only: the callback runs on XLA's threads, where a thread-local
  `jax.enable_x64` context does not reach, and JAX hands it float64
  operands cast to float32 there (under shard_map, measured); float64
  folds take the dense QR (`qr.fold_r_unchecked`).

  Args:
    r: float32[d, d] upper triangular (zeros to start).
    block: float32[b, d]; any b >= 1.

  Returns:
    R, float32[d, d] upper triangular with `RᵀR = rᵀr + blockᵀblock` to
    rounding and a non-negative diagonal. Works under jit, vmap (one call
    per element) and shard_map (one per device's shard).
  """
  if r.dtype != jnp.float32 or block.dtype != jnp.float32:
    raise ValueError(
        'fold_lapack: r and block must be float32; got '
        f'{r.dtype} and {block.dtype}.'
    )
  return jax.pure_callback(
      _stpqrt_host,
      jax.ShapeDtypeStruct(r.shape, r.dtype),
      r,
      block,
      vmap_method='sequential',
  )
