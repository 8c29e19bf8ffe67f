"""Argument checks shared by the solvers: clear `ValueError`s, never repairs.

Shape checks are free under `jit` (shapes are Python values). Value checks
(NaN/Inf, μ < 0) need concrete values: they run when the argument is concrete
and are skipped when a caller traces the function inside its own `jit`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True unless `x` is a tracer (inside `jit`, `vmap`, `grad`, ...)."""
  return not isinstance(x, jax.core.Tracer)


def compute_dtype(*dtypes: Any) -> jnp.dtype:
  """The dtype the numerics run in: at least float32, float64 if given one.

  bf16/fp16 storage computes in float32; float64 inputs (with x64 enabled)
  compute in float64.
  """
  return jnp.result_type(jnp.float32, *dtypes)


def check_matrix(
    name: str, x: Any, *, rows: int | None = None, cols: int | None = None
) -> None:
  """Raises unless `x` is a 2-D array with the given row/column counts."""
  shape = np.shape(x)
  if len(shape) != 2:
    raise ValueError(f'{name} must be a matrix (2-D); got shape {shape}.')
  if rows is not None and shape[0] != rows:
    raise ValueError(f'{name} has shape {shape}; expected {rows} rows.')
  if cols is not None and shape[1] != cols:
    raise ValueError(f'{name} has shape {shape}; expected {cols} columns.')
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(
        f'{name} must be floating point; got dtype ' f'{jnp.result_type(x)}.'
    )


def check_finite(name: str, x: Any) -> None:
  """Raises if concrete `x` holds NaN or Inf (never replaces them)."""
  if not is_concrete(x):
    return
  finite = (
      np.isfinite(np.asarray(x, dtype=np.float64))
      if isinstance(x, np.ndarray)
      else jnp.isfinite(x)
  )
  if not bool(finite.all()):
    count = int(np.size(x) - np.count_nonzero(np.asarray(finite)))
    raise ValueError(
        f'{name} contains {count} NaN or Inf value(s); '
        'refusing to compute with them.'
    )


def check_rank(rank: Any, d_in: int, d_out: int, name: str = 'rank') -> None:
  """Raises unless `rank` is an int in [1, min(d_in, d_out)]."""
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise ValueError(
        f'{name} must be a Python int (static); got '
        f'{type(rank).__name__} {rank!r}.'
    )
  if not 1 <= rank <= min(d_in, d_out):
    raise ValueError(
        f'{name}={rank} is outside [1, {min(d_in, d_out)}] for '
        f'a ({d_in}, {d_out}) kernel.'
    )


def check_nonnegative(name: str, value: Any) -> None:
  """Raises if concrete `value` is negative or not finite."""
  if not is_concrete(value):
    return
  v = float(np.asarray(value))
  if not np.isfinite(v) or v < 0:
    raise ValueError(f'{name} must be a finite number >= 0; got {v}.')


def check_ratio(name: str, value: Any) -> None:
  """Raises unless `value` is a real number in (0, 1] (a bool is not)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.integer, np.floating)
  ):
    raise ValueError(
        f'{name} must be a number in (0, 1]; got '
        f'{type(value).__name__} {value!r}.'
    )
  if not 0 < value <= 1:
    raise ValueError(f'{name} must be in (0, 1]; got {value}.')


def relative_norm(num: Any, den: Any) -> float:
  """`||num||_F / ||den||_F` (0 if `den` is 0), safe near float32's limits.

  Both are divided by their largest |entry| first, so entries up to
  float32's maximum give a finite ratio where `norm(num) / norm(den)` would
  square them past it (inf / inf = NaN). Non-finite entries give NaN.
  """
  return float(relative_norm_traced(jnp.asarray(num), jnp.asarray(den)))


def relative_norm_traced(num: jax.Array, den: jax.Array) -> jax.Array:
  """`relative_norm` as a 0-d array, usable inside `jax.jit`."""
  scale = jnp.maximum(jnp.max(jnp.abs(num)), jnp.max(jnp.abs(den)))
  scale = jnp.where(scale > 0, scale, 1.0)
  top = jnp.linalg.norm(num / scale)
  bottom = jnp.linalg.norm(den / scale)
  return top / jnp.where(bottom > 0, bottom, 1.0)
