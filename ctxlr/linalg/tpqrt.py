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

Not used by calibration: the recursion unrolls into a large program, and a
calibration step that inlines one per distinct layer input compiled for
about a minute per two blocks of the default model. On CPU calibration runs
LAPACK's own `?tpqrt` as an XLA FFI call (`lapack_fold.py`), on
accelerators the dense fold; docs/results/bench_pipeline/ measures all of
them.
"""

import functools

import jax
import jax.numpy as jnp

LEAF = 32  # columns of a leaf panel: geqrf of (32 + b) × 32
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
