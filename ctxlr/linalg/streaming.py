"""Streaming R: fold a calibration set larger than memory.

Specified in docs/method.md §3.

X never needs to exist at once. For blocks `X_1, X_2, …` (each `b × d`),
`R ← qr_r([R; X_j])`, starting from `R = 0`, gives the R of the stacked X.
Zero rows change nothing, so every fold here runs on one compiled shape:
blocks are re-cut into chunks of `block_size` rows on the host and the last
chunk is zero-padded. Memory is O(d² + block_size · d) whatever the number of
rows.

Two levels:

* `accumulate_r(blocks)` / `RAccumulator`: host-side streams (NumPy or JAX
  blocks from disk, a generator, a model's forward pass). Bad blocks raise
  at once, naming the block index.
* `fold_padded(r, block, mask)`: the pure fold, for use inside a larger
  `jit`/`shard_map` step (e.g. the inputs of many layers per batch): a
  NaN/Inf check is returned as a flag instead of raised.

Multi-device and multi-host streaming (each device folds its share, then one
reduction) is `ctxlr.linalg.tsqr.ShardedRAccumulator`.
"""

from collections.abc import Iterable
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ctxlr.linalg import checks
from ctxlr.linalg import qr


def default_block_size(d: int) -> int:
  """Rows per fold when the caller gives none: `4 d`, and at least 256.

  A fold of `b` rows costs `2(b+d)d² − 2d³/3` flops against `2bd²` for the
  rows themselves (docs/method.md §3); `b = 4d` keeps that overhead near
  17%. The floor of 256 rows keeps tiny layers from paying dispatch costs per
  row.
  """
  return max(4 * d, 256)


def fold_padded(
    r: jax.Array, block: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """One pure fold `R ← qr_r([R; X_block])`, for use under `jit`/`shard_map`.

  Rows whose `mask` is False are replaced by zeros before the fold (padding
  tokens, the tail of a short block) and so change nothing. NaN/Inf in the
  kept rows is not raised (values are traced) but reported by `ok`; the
  caller raises, naming its layer and batch.

  >>> r, ok = jax.jit(fold_padded)(jnp.zeros((4, 4)), jnp.ones((8, 4)))
  >>> r.shape, bool(ok)
  ((4, 4), True)

  Args:
    r: R so far, float[d, d] (zeros to start).
    block: X_block, float[b, d]; any b >= 1 and float dtype.
    mask: optional bool[b]; True marks the rows that are data.

  Returns:
    (R: float[d, d] in the compute dtype (float32 at least), non-negative
    diagonal; ok: bool[], False if a kept row of `block` holds NaN or Inf).
  """
  checks.check_matrix('r', r)
  d = r.shape[1]
  checks.check_matrix('r', r, rows=d)
  checks.check_matrix('block', block, cols=d)
  if mask is not None and np.shape(mask) != (block.shape[0],):
    raise ValueError(
        f'mask has shape {np.shape(mask)}; expected '
        f'({block.shape[0]},) to match block {block.shape}.'
    )
  dtype = checks.compute_dtype(r.dtype, block.dtype)
  block = jnp.asarray(block).astype(dtype)
  if mask is not None:
    block = jnp.where(jnp.asarray(mask, bool)[:, None], block, 0)
  ok = jnp.all(jnp.isfinite(block))
  return qr.fold_r_unchecked(jnp.asarray(r).astype(dtype), block), ok


def check_dtype(dtype: Any) -> jnp.dtype:
  """The accumulation dtype: float32, or float64 when 64-bit JAX is on."""
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f'dtype {dtype!r} is not a dtype.') from e
  if dtype not in (jnp.float32, jnp.float64):
    raise ValueError(
        f'dtype must be float32 or float64 (the accumulation '
        f'precision); got {dtype}.'
    )
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(
        'dtype=float64 needs 64-bit JAX: call '
        "jax.config.update('jax_enable_x64', True) or run under "
        '`with jax.enable_x64(True):`.'
    )
  return dtype


def check_size(name: str, value: Any) -> int:
  """Raises unless `value` is a Python int >= 1; returns it."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(
        f'{name} must be an int >= 1; got ' f'{type(value).__name__} {value!r}.'
    )
  if value < 1:
    raise ValueError(f'{name} must be an int >= 1; got {value}.')
  return int(value)


def host_block(block: Any, index: int, d: int, dtype: Any) -> np.ndarray:
  """Block `index` of a stream as a host array in `dtype`, after checks."""
  shape = np.shape(block)
  if len(shape) != 2:
    raise ValueError(
        f'block {index} must be a matrix (rows, d); got shape ' f'{shape}.'
    )
  if shape[0] == 0:
    raise ValueError(f'block {index} has shape {shape}: no rows.')
  if shape[1] != d:
    raise ValueError(
        f'block {index} has shape {shape}; expected d={d} ' 'columns.'
    )
  x = np.asarray(block)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f'block {index} must be floating point; got dtype ' f'{x.dtype}.'
    )
  finite = np.isfinite(x)
  if not finite.all():
    raise ValueError(
        f'block {index} contains '
        f'{finite.size - np.count_nonzero(finite)} NaN or Inf '
        'value(s); refusing to fold it.'
    )
  if x.dtype != dtype:
    with np.errstate(over='ignore'):  # overflow is checked just below
      x = x.astype(dtype)
    if not np.isfinite(x).all():
      raise ValueError(
          f'block {index} has values beyond the range of '
          f'{np.dtype(dtype).name}, the accumulation dtype.'
      )
  return x


class RAccumulator:
  """Folds blocks pushed one at a time into R, on one device.

  Rows are copied into fresh host chunks of `block_size` rows; each full
  chunk is folded by one jitted QR of shape `(d + block_size, d)`, the last
  one zero-padded. At most two folds are in flight, so memory stays
  O(d² + block_size · d) however many rows are pushed.

  >>> acc = RAccumulator(16)
  >>> for _ in range(3):
  ...   acc.add(np.ones((100, 16), np.float32))
  >>> acc.num_rows, acc.result().shape
  (300, (16, 16))

  Subclasses change where chunks are folded (`_fold`, `_finish`); the
  buffering and the checks are shared.
  """

  def __init__(
      self, d: int, *, block_size: int | None = None, dtype: Any = jnp.float32
  ):
    """Starts an empty stream.

    Args:
      d: columns of every block (the layer's d_in).
      block_size: rows per fold; default `default_block_size(d)`.
      dtype: accumulation dtype, float32 or float64 (needs 64-bit JAX).
    """
    self.d = check_size('d', d)
    self.block_size = check_size(
        'block_size',
        default_block_size(self.d) if block_size is None else block_size,
    )
    self.dtype = check_dtype(dtype)
    self.num_rows = 0  # rows pushed so far (not counting padding)
    self.num_blocks = 0  # blocks pushed so far
    self._chunk = None  # host f[chunk_rows, d], filled up to self._fill
    self._fill = 0
    self._r = jnp.zeros((self.d, self.d), self.dtype)

  @property
  def chunk_rows(self) -> int:
    """Rows of one compiled fold."""
    return self.block_size

  def add(self, block: Any) -> None:
    """Folds one block, float[b, d] (NumPy or JAX, any b >= 1).

    Raises:
      ValueError: naming the block index, if the block is not a float matrix
        with d columns and at least one row, or holds NaN/Inf. The stream
        stays usable (the bad block is not folded).
    """
    x = host_block(block, self.num_blocks, self.d, self.dtype)
    self.num_blocks += 1
    start, n = 0, x.shape[0]
    while start < n:
      if self._chunk is None:
        self._chunk = np.zeros((self.chunk_rows, self.d), self.dtype)
        self._fill = 0
      take = min(n - start, self.chunk_rows - self._fill)
      self._chunk[self._fill : self._fill + take] = x[start : start + take]
      self._fill += take
      start += take
      if self._fill == self.chunk_rows:
        self._flush()
    self.num_rows += n

  def _flush(self) -> None:
    """Folds the current chunk (zero rows past the fill) and drops it."""
    previous = self._r
    self._fold(self._chunk)
    self._chunk, self._fill = None, 0
    jax.block_until_ready(previous)  # at most two folds in flight

  def _fold(self, chunk: np.ndarray) -> None:
    self._r = qr.fold_r_unchecked(self._r, jax.device_put(chunk))

  def _finish(self) -> jax.Array:
    return self._r

  def _check_not_empty(self) -> None:
    if self.num_rows == 0:
      raise ValueError(
          'The stream is empty: no blocks were given, so there '
          'is no calibration data to compute R from.'
      )

  def result(self) -> jax.Array:
    """R of all rows pushed so far; the stream may go on afterwards.

    Returns:
      R, float[d, d] in `dtype`, upper triangular, non-negative diagonal.

    Raises:
      ValueError: if no rows were pushed.
    """
    self._check_not_empty()
    if self._fill:
      self._flush()
    return self._finish()


def stream(
    blocks: Iterable[Any], d: int | None, make: Callable[[int], RAccumulator]
) -> jax.Array:
  """Feeds an iterable of blocks to `make(d)`; d from the first if None."""
  acc = None if d is None else make(d)
  for block in blocks:
    if acc is None:
      shape = np.shape(block)
      if len(shape) != 2:
        raise ValueError(
            f'block 0 must be a matrix (rows, d); got shape ' f'{shape}.'
        )
      acc = make(shape[1])
    acc.add(block)
  if acc is None:
    raise ValueError(
        'The stream is empty: no blocks were given, so there is '
        'no calibration data to compute R from.'
    )
  return acc.result()


def accumulate_r(
    blocks: Iterable[Any],
    *,
    d: int | None = None,
    block_size: int | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
  """R of the stacked blocks, streamed: X is never held (docs/method.md §3).

  >>> blocks = (np.ones((100, 8), np.float32) for _ in range(5))
  >>> accumulate_r(blocks, block_size=64).shape
  (8, 8)

  Args:
    blocks: any iterable (list, generator, reader over files) of float[b, d]
      NumPy or JAX arrays; b >= 1 may vary from block to block. It is read
      once, lazily.
    d: columns; default the first block's.
    block_size: rows per compiled fold; default `default_block_size(d)`.
      Long blocks are split, short ones gathered, the last chunk is
      zero-padded (zero rows do not change R).
    dtype: accumulation dtype, float32 or float64 (needs 64-bit JAX).

  Returns:
    R, float[d, d] in `dtype`, upper triangular with a non-negative
    diagonal, `RᵀR = XᵀX` for X the blocks stacked.

  Raises:
    ValueError: on an empty stream, and naming the block index on a block
      with NaN/Inf, no rows, the wrong number of columns or a non-float dtype.
  """
  return stream(
      blocks, d, lambda d_: RAccumulator(d_, block_size=block_size, dtype=dtype)
  )
