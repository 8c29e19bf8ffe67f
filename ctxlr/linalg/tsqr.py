"""TSQR: the R of X with its rows sharded over a mesh axis (docs/method.md §3).

Each device computes the R of its own rows; the per-device R's are combined
by a QR of them stacked (Demmel–Grigori–Hoemmen–Langou):

* `'gather'`: all-gather the D R's and one `(D d) × d` QR on every device;
* `'tree'`: a butterfly of pairwise `2d × d` QRs, log2(D) levels (a
  non-power-of-two D first folds its extra devices into the first ones).

Both give the single-device R up to rounding (signs normalised). The same
`jax.shard_map` code runs on one host with several devices and on many hosts
under `jax.distributed` (see `ctxlr.distributed`).

Entry points:

* `tsqr(x, mesh=...)`: one (n, d) array, rows sharded (padded with zero rows
  when n does not divide).
* `ShardedRAccumulator` / `accumulate_r_sharded`: each device (of each
  process) folds its share of a stream, then one reduction.
* `zeros_sharded`, `fold_sharded`, `reduce_r`: the pieces, on pytrees of
  per-device R's stacked as float[D, d, d] (one per layer), for a pipeline
  that folds many layers per jitted step and reduces once at the end.
* `combine_r`: the combine itself, for use inside your own `shard_map`.
"""

from collections.abc import Iterable
import functools
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from ctxlr.linalg import checks
from ctxlr.linalg import qr
from ctxlr.linalg import streaming

COMBINES = ('tree', 'gather')
P = jax.sharding.PartitionSpec


def _qr_stack(top: jax.Array, bottom: jax.Array) -> jax.Array:
  """R of two stacked triangles (the structured fold)."""
  return qr.fold_r_unchecked(top, bottom)  # f[d, d]


def combine_r(
    r: jax.Array, axis_name: str, *, axis_size: int, combine: str = 'tree'
) -> jax.Array:
  """Combines per-device R's into the R of all rows; inside `shard_map`.

  Every device gets the same R (bitwise: partners QR identical matrices), so
  `out_specs=P()` is valid; QR hides that replication from `shard_map`, so
  use `check_vma=False`.

  Args:
    r: this device's R, float[d, d] (or any float[d, d] with its Gram).
    axis_name: the mesh axis the rows are sharded over.
    axis_size: its size D (a Python int: `mesh.shape[axis_name]`).
    combine: `'tree'` (butterfly of 2d × d QRs) or `'gather'` (all-gather,
      one Dd × d QR).

  Returns:
    R of the rows of all devices, float[d, d], non-negative diagonal.
  """
  if combine == 'gather':
    r_all = jax.lax.all_gather(r, axis_name, tiled=True)  # f[D*d, d]
    return qr.qr_r_unchecked(r_all)
  if combine != 'tree':
    raise ValueError(f'combine must be one of {COMBINES}; got {combine!r}.')
  idx = jax.lax.axis_index(axis_name)
  p = 1 << (axis_size.bit_length() - 1)  # largest power of two <= D
  extra = axis_size - p
  if extra:  # devices p.. fold into 0..
    recv = jax.lax.ppermute(r, axis_name, [(p + i, i) for i in range(extra)])
    r = jnp.where(idx < extra, _qr_stack(r, recv), r)
  step = 1
  while step < p:  # butterfly over the first p
    recv = jax.lax.ppermute(r, axis_name, [(i, i ^ step) for i in range(p)])
    low = (idx & step) == 0  # same stacking order on both
    r = _qr_stack(jnp.where(low, r, recv), jnp.where(low, recv, r))
    step *= 2
  if extra:  # and get the result back
    recv = jax.lax.ppermute(r, axis_name, [(i, p + i) for i in range(extra)])
    r = jnp.where(idx >= p, recv, r)
  return r


def check_mesh(mesh: Any, axis: str, combine: str = 'tree') -> int:
  """Raises unless `axis` names an axis of `mesh`; returns its size."""
  if not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(
        f'mesh must be a jax.sharding.Mesh; got ' f'{type(mesh).__name__}.'
    )
  if axis not in mesh.axis_names:
    raise ValueError(
        f'axis {axis!r} is not an axis of the mesh ' f'{dict(mesh.shape)}.'
    )
  if combine not in COMBINES:
    raise ValueError(f'combine must be one of {COMBINES}; got {combine!r}.')
  return mesh.shape[axis]


@functools.lru_cache(maxsize=None)
def _tsqr_fn(mesh, axis, combine):
  size = mesh.shape[axis]

  def body(x_blk):  # f[n/D, d]
    ok = jnp.all(jnp.isfinite(x_blk)).astype(jnp.int32)
    r = combine_r(
        qr.qr_r_unchecked(x_blk), axis, axis_size=size, combine=combine
    )
    return r, jax.lax.psum(ok, axis) == size  # f[d, d], bool[]

  return jax.jit(
      jax.shard_map(
          body,
          mesh=mesh,
          in_specs=P(axis, None),
          out_specs=(P(), P()),
          check_vma=False,
      )
  )


def tsqr(
    x: Any,
    *,
    mesh: jax.sharding.Mesh | None = None,
    axis: str = 'rows',
    combine: str = 'tree',
) -> jax.Array:
  """R of X with its rows sharded over `axis` of `mesh`.

  >>> mesh = jax.make_mesh((jax.device_count(),), ('rows',))
  >>> tsqr(np.ones((1000, 16), np.float32), mesh=mesh).shape
  (16, 16)

  Args:
    x: X, float[n, d], any n >= 1. A NumPy or fully addressable JAX array
      (the whole X, as every process sees it) is zero-padded to a multiple
      of D rows (zero rows do not change R) and sharded. A global array of
      several processes (`ctxlr.distributed.shard_rows`) is used as is.
    mesh: default: one axis `axis` over all devices of all processes.
    axis: the mesh axis the rows are sharded over; other axes replicate.
    combine: `'tree'` or `'gather'` (see `combine_r`).

  Returns:
    R, float[d, d] (float32 at least), non-negative diagonal, replicated
    over the mesh.

  Raises:
    ValueError: on a bad mesh/axis/combine, a non-matrix or empty x, or
      NaN/Inf in x.
  """
  if mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), (axis,), devices=jax.devices())
  size = check_mesh(mesh, axis, combine)
  checks.check_matrix('x', x)
  n, d = np.shape(x)
  if n == 0:
    raise ValueError(f'x has shape {(n, d)}: no rows (empty calibration).')
  sharding = jax.sharding.NamedSharding(mesh, P(axis, None))
  if not (isinstance(x, jax.Array) and not x.is_fully_addressable):
    pad = -n % size
    if pad:
      xp = jnp if isinstance(x, jax.Array) else np
      x = xp.concatenate([x, xp.zeros((pad, d), x.dtype)])
  r, ok = _tsqr_fn(mesh, axis, combine)(jax.device_put(x, sharding))
  if not bool(ok):
    raise ValueError('x contains NaN or Inf; refusing to compute with it.')
  return r


def zeros_sharded(
    d: int,
    *,
    mesh: jax.sharding.Mesh,
    axis: str = 'rows',
    dtype: Any = jnp.float32,
) -> jax.Array:
  """Per-device R's to start folding from: zeros, float[D, d, d] on `axis`."""
  size = check_mesh(mesh, axis)
  d = streaming.check_size('d', d)
  dtype = streaming.check_dtype(dtype)
  sharding = jax.sharding.NamedSharding(mesh, P(axis))
  return jax.jit(
      lambda: jnp.zeros((size, d, d), dtype), out_shardings=sharding
  )()


def _check_stacked(name: str, r: Any, size: int) -> None:
  shape = np.shape(r)
  if len(shape) != 3 or shape[0] != size or shape[1] != shape[2]:
    raise ValueError(
        f"{name} has shape {shape}; expected per-device R's "
        f'stacked as ({size}, d, d) for a mesh axis of size '
        f'{size}.'
    )
  if not jnp.issubdtype(jnp.result_type(r), jnp.floating):
    raise ValueError(
        f'{name} must be floating point; got dtype ' f'{jnp.result_type(r)}.'
    )


def _paths(tree: Any) -> list[tuple[str, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def fold_sharded(
    rs: Any,
    xs: Any,
    *,
    mesh: jax.sharding.Mesh,
    axis: str = 'rows',
    masks: Any = None,
) -> tuple[Any, Any]:
  """Each device folds its rows of each X into its own R; pure, jit-able.

  The pipeline's data-parallel step: a batch's inputs to every layer,
  rows sharded over `axis`, folded into that layer's per-device R. No
  communication; `reduce_r` combines once at the end.

  Args:
    rs: pytree of float[D, d, d] (per-device R's, `zeros_sharded` to start),
      sharded over `axis`.
    xs: pytree of the same structure, float[n, d] with n a multiple of D,
      sharded over `axis` (device i folds rows i·n/D … (i+1)·n/D − 1).
    mesh: the mesh; D = mesh.shape[axis].
    axis: the mesh axis of the data parallelism.
    masks: optional pytree of bool[n] (False: a padding row, ignored).

  Returns:
    (rs: the new per-device R's, same structure; oks: pytree of bool[D],
    False where a device's kept rows held NaN/Inf; check it and raise.)
  """
  size = check_mesh(mesh, axis)
  if jax.tree.structure(rs) != jax.tree.structure(xs):
    raise ValueError(
        'rs and xs must be pytrees of the same structure; got '
        f'{jax.tree.structure(rs)} and {jax.tree.structure(xs)}.'
    )
  for (name, r), (_, x) in zip(_paths(rs), _paths(xs)):
    _check_stacked(f'rs{name}', r, size)
    checks.check_matrix(f'xs{name}', x, cols=np.shape(r)[-1])
    if np.shape(x)[0] % size:
      raise ValueError(
          f'xs{name} has {np.shape(x)[0]} rows, not a multiple '
          f'of the {size} devices of axis {axis!r}: pad with '
          'zero rows (or pass a mask).'
      )
  if masks is not None:
    if jax.tree.structure(masks) != jax.tree.structure(xs):
      raise ValueError('masks must have the structure of xs.')
    for (name, m), (_, x) in zip(_paths(masks), _paths(xs)):
      if np.shape(m) != np.shape(x)[:1]:
        raise ValueError(
            f'masks{name} has shape {np.shape(m)}; expected '
            f'({np.shape(x)[0]},).'
        )
  return _fold_sharded_fn(mesh, axis, masks is not None)(rs, xs, masks)


@functools.lru_cache(maxsize=None)
def _fold_sharded_fn(mesh, axis, masked):
  def one(r, x, m):  # f[1, d, d], f[n/D, d], b[n/D]
    r, ok = streaming.fold_padded(r[0], x, m)
    return r[None], ok[None]

  def body(rs, xs, masks):
    treedef = jax.tree.structure(rs)
    r_l, x_l = jax.tree.leaves(rs), jax.tree.leaves(xs)
    m_l = jax.tree.leaves(masks) if masked else [None] * len(r_l)
    pairs = [one(r, x, m) for r, x, m in zip(r_l, x_l, m_l)]
    return (
        treedef.unflatten([p[0] for p in pairs]),
        treedef.unflatten([p[1] for p in pairs]),
    )

  spec = P(axis)
  fn = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(spec, spec, spec),
      out_specs=(spec, spec),
      check_vma=False,
  )
  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _reduce_fn(mesh, axis, combine):
  size = mesh.shape[axis]

  def one(r):  # f[1, d, d]
    r = r[0].astype(checks.compute_dtype(r.dtype))
    ok = jax.lax.all_gather(jnp.all(jnp.isfinite(r)), axis)  # bool[D]
    return combine_r(r, axis, axis_size=size, combine=combine), ok

  def body(rs):
    treedef = jax.tree.structure(rs)
    pairs = [one(r) for r in jax.tree.leaves(rs)]
    return (
        treedef.unflatten([p[0] for p in pairs]),
        treedef.unflatten([p[1] for p in pairs]),
    )

  return jax.jit(
      jax.shard_map(
          body,
          mesh=mesh,
          in_specs=P(axis),
          out_specs=(P(), P()),
          check_vma=False,
      )
  )


def reduce_r(
    rs: Any,
    *,
    mesh: jax.sharding.Mesh,
    axis: str = 'rows',
    combine: str = 'tree',
) -> Any:
  """One R per leaf from per-device R's: the end of data-parallel folding.

  Runs once, outside `jit` (it checks values and raises); inside your own
  `shard_map`, `combine_r` is the same reduction without the checks.

  Args:
    rs: pytree (e.g. `{layer_name: r}`) of float[D, d, d] per-device R's
      stacked along `axis` (D = mesh.shape[axis]); d may differ per leaf.
    mesh: the mesh; several processes' devices under `jax.distributed`.
    axis: the mesh axis the R's are stacked over.
    combine: `'tree'` or `'gather'` (see `combine_r`).

  Returns:
    Pytree of R, float[d, d] (float32 at least), non-negative diagonal,
    replicated over the mesh (`np.asarray(r)` gives a host copy on every
    process).

  Raises:
    ValueError: naming the leaf and the devices, if a per-device R holds
      NaN/Inf; on leaves that are not float[D, d, d].
  """
  size = check_mesh(mesh, axis, combine)
  named = _paths(rs)
  if not named:
    raise ValueError('rs is an empty pytree: nothing to reduce.')
  for name, r in named:
    _check_stacked(f'rs{name}', r, size)
  sharding = jax.sharding.NamedSharding(mesh, P(axis))
  rs = jax.tree.map(lambda r: jax.device_put(r, sharding), rs)
  out, oks = _reduce_fn(mesh, axis, combine)(rs)
  for (name, _), ok in zip(named, jax.tree.leaves(oks)):
    bad = np.flatnonzero(~np.asarray(ok))
    if bad.size:
      raise ValueError(
          f'rs{name}: the R of device(s) {bad.tolist()} '
          'contains NaN or Inf; refusing to reduce it.'
      )
  return out


class ShardedRAccumulator(streaming.RAccumulator):
  """Streams blocks over this process's devices, then one reduction.

  Each chunk of `D_local × block_size` rows is split over the process's own
  devices on `axis`; each device folds its part into its own R (no
  communication, so processes may stream different numbers of rows). At
  `result()` the per-device R's of all processes are reduced over `mesh`:
  every process must call it.

  Args:
    d: columns of every block.
    mesh: a mesh whose only axis of size > 1 is `axis` (e.g.
      `ctxlr.distributed.make_mesh()`), spanning all processes.
    axis: the mesh axis.
    block_size: rows per device per fold; default
      `streaming.default_block_size(d)`.
    dtype: float32 or float64 (needs 64-bit JAX).
    combine: `'tree'` or `'gather'`.
  """

  def __init__(
      self,
      d: int,
      *,
      mesh: jax.sharding.Mesh,
      axis: str = 'rows',
      block_size: int | None = None,
      dtype: Any = jnp.float32,
      combine: str = 'tree',
  ):
    super().__init__(d, block_size=block_size, dtype=dtype)
    self.size = check_mesh(mesh, axis, combine)
    if mesh.devices.size != self.size:
      raise ValueError(
          f'mesh {dict(mesh.shape)} has axes other than {axis!r}'
          ' of size > 1; use a mesh with the one axis.'
      )
    self.mesh, self.axis, self.combine = mesh, axis, combine
    here = jax.process_index()
    local = [dev for dev in mesh.devices.flat if dev.process_index == here]
    if not local:
      raise ValueError(f'mesh has no device of process {here}.')
    self._local_mesh = jax.sharding.Mesh(
        np.array(local), (axis,), axis_types=mesh.axis_types[:1]
    )
    self._rs = zeros_sharded(
        self.d, mesh=self._local_mesh, axis=axis, dtype=self.dtype
    )
    self._r = self._rs

  @property
  def chunk_rows(self) -> int:
    return self.block_size * self._local_mesh.size

  def _fold(self, chunk: np.ndarray) -> None:
    sharding = jax.sharding.NamedSharding(self._local_mesh, P(self.axis))
    self._rs, _ = _fold_sharded_fn(self._local_mesh, self.axis, False)(
        self._rs, jax.device_put(chunk, sharding), None
    )
    self._r = self._rs

  def _check_not_empty(self) -> None:
    if jax.process_count() == 1:
      return super()._check_not_empty()
    counts = multihost_utils.process_allgather(np.int64(self.num_rows))
    if not np.any(counts):
      raise ValueError(
          'The stream is empty on every process: no rows to ' 'compute R from.'
      )

  def _finish(self) -> jax.Array:
    sharding = jax.sharding.NamedSharding(self.mesh, P(self.axis))
    shards = [s.data for s in self._rs.addressable_shards]
    rs = jax.make_array_from_single_device_arrays(
        (self.size, self.d, self.d), sharding, shards
    )
    return reduce_r(rs, mesh=self.mesh, axis=self.axis, combine=self.combine)


def accumulate_r_sharded(
    blocks: Iterable[Any],
    *,
    mesh: jax.sharding.Mesh | None = None,
    axis: str = 'rows',
    d: int | None = None,
    block_size: int | None = None,
    dtype: Any = jnp.float32,
    combine: str = 'tree',
) -> jax.Array:
  """`streaming.accumulate_r` with every device folding its share.

  On several processes each one passes its own stream (of any length, even
  none: then give `d`) and all get the R of all rows of all processes.

  Args:
    blocks: iterable of float[b, d] NumPy/JAX arrays, read once, lazily.
    mesh: one-axis mesh over the devices; default all devices.
    axis: its axis name.
    d: columns; default the first block's (required for an empty stream).
    block_size: rows per device per fold.
    dtype: float32 or float64.
    combine: `'tree'` or `'gather'`.

  Returns:
    R, float[d, d], non-negative diagonal, replicated over the mesh.
  """
  if mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), (axis,), devices=jax.devices())
  make = lambda d_: ShardedRAccumulator(
      d_,
      mesh=mesh,
      axis=axis,
      block_size=block_size,
      dtype=dtype,
      combine=combine,
  )
  if d is None or jax.process_count() == 1:
    return streaming.stream(blocks, d, make)
  acc = make(d)
  for block in blocks:
    acc.add(block)
  return acc.result()
