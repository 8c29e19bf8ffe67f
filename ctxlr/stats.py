"""Calibration statistics of one layer's inputs, for every solver at once.

A layer's calibration inputs `X` (`n × d_in`, rows are tokens) are reduced
to small summaries that the solvers need:

* `r`: the R factor of X (`qr_r`), for `ctxlr` (docs/method.md §2);
* `gram`: `XᵀX` accumulated in float32, for the Gram baselines (`svd_llm`,
  `svd_llm_eps`, `svd_llm_v2`, `corda`), as their authors accumulate it;
* `abs_sum`: `Σ_tokens |x|` in float32, for `asvd`'s per-channel scale;
* `count`: the number of tokens.

Each has a one-block update rule (`gram += blockᵀ block`, `abs_sum +=
Σ|block|`, `r = fold_r(r, block)`), so streaming accumulation is a loop
over blocks; here `stats_from_x` takes X in one piece.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ctxlr.linalg import checks
from ctxlr.linalg import qr

_HIGHEST = jax.lax.Precision.HIGHEST  # true float32 products (no TF32)


@dataclasses.dataclass(frozen=True)
class Want:
  """Which statistics calibration accumulates (the count always)."""

  gram: bool = False  # XᵀX in float32, for the Gram methods
  abs_sum: bool = False  # Σ_tokens |x|, for asvd
  r: bool = True  # R (qr_r); reports, allocation and coala use it

  def __post_init__(self):
    if not (self.r or self.gram or self.abs_sum):
      raise ValueError('Want: at least one of r, gram, abs_sum must be True.')


class LayerStats(NamedTuple):
  """Calibration statistics of one layer's inputs X (float[n, d_in])."""

  r: jax.Array | None  # shape=(d, d), R factor (qr_r), for ctxlr
  gram: jax.Array | None  # shape=(d, d), float32 XᵀX, for the Gram methods
  abs_sum: jax.Array | None  # shape=(d,), float32 Σ_tokens |x|, for asvd
  count: int  # number of tokens (rows) seen


@jax.jit
def _gram(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)  # f32[n, d]
  return jnp.matmul(x.T, x, precision=_HIGHEST)  # f32[d, d]


@jax.jit
def _abs_sum(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.abs(x.astype(jnp.float32)), axis=0)  # f32[d]


def stats_from_x(
    x: jax.Array, *, r: bool = True, gram: bool = True, abs_sum: bool = True
) -> LayerStats:
  """The statistics of one layer's calibration inputs X, in one pass.

  >>> x = jax.random.normal(jax.random.key(0), (256, 16))
  >>> s = stats_from_x(x)
  >>> s.r.shape, s.gram.shape, s.abs_sum.shape, s.count
  ((16, 16), (16, 16), (16,), 256)

  Args:
    x: X, float[n, d_in], n >= 1; rows are tokens. Must be finite.
    r: compute R (`qr_r(x)`, float32 at least), for `ctxlr`.
    gram: compute `XᵀX` in float32 (as SVD-LLM, ASVD and CorDA accumulate
      it: inputs cast to float32, float32 products), for the Gram methods.
    abs_sum: compute `Σ_tokens |x|` per input channel in float32, for `asvd`.

  Returns:
    LayerStats(r: float[d_in, d_in] | None, gram: float32[d_in, d_in] | None,
    abs_sum: float32[d_in] | None, count: n). A statistic not asked for is
    None.
  """
  checks.check_matrix('x', x)
  if x.shape[0] == 0:
    raise ValueError(f'x has shape {x.shape}: no rows (empty calibration).')
  checks.check_finite('x', x)
  x = jnp.asarray(x)
  return LayerStats(
      r=qr.qr_r(x) if r else None,
      gram=_gram(x) if gram else None,
      abs_sum=_abs_sum(x) if abs_sum else None,
      count=int(x.shape[0]),
  )


def as_float32(stats: LayerStats) -> LayerStats:
  """`stats` with every array rounded to float32 (the methods' storage).

  Statistics accumulated in float64 (for the float64 reference K_*) are
  handed to the float32 methods this way: one rounding of exact sums, so they
  see the same data as everyone else.
  """
  cast = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
  return stats._replace(
      r=cast(stats.r), gram=cast(stats.gram), abs_sum=cast(stats.abs_sum)
  )
