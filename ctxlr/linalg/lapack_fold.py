"""The structured fold on CPU: LAPACK `?tpqrt` as an XLA FFI call.

`fold(r, block)` is `qr_r([R; X_b])` computed by LAPACK's `stpqrt` /
`dtpqrt` (blocked Householder where every reflector touches one row of R
and the block's rows: R's zeros are never read or written), called by XLA
from inside the jitted program like any LAPACK kernel jaxlib itself runs: no
host callback, no Python, no GIL. The kernel is the C++ extension
`_lapack_fold` (ctxlr/linalg/_lapack_fold.cc), compiled against jaxlib's
FFI headers when the package is installed; LAPACK itself is SciPy's, the
library jaxlib's CPU kernels call (docs/method.md §3).

The extension is optional: where it was not built (no C++ compiler at
install) `available()` is False and `qr.fold_r_unchecked` folds densely.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

TARGET = 'ctxlr_tpqrt'
# nb of ?tpqrt, reflectors per block: of 16 ... 128, 32 was the fastest at
# d = 576 (1.38-1.61x a Gram update at d = 576 and 1,536,
# docs/results/bench_pipeline).
BLOCK_SIZE = 32


@functools.cache
def available() -> bool:
  """Whether the extension is built and registered (CPU only)."""
  try:
    from ctxlr.linalg import _lapack_fold  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  from scipy.linalg import cython_lapack  # pylint: disable=g-import-not-at-top

  capi = cython_lapack.__pyx_capi__
  if 'stpqrt' not in capi or 'dtpqrt' not in capi:  # a SciPy without them
    return False
  _lapack_fold.set_lapack(capi['stpqrt'], capi['dtpqrt'])
  for name, capsule in _lapack_fold.handlers().items():
    jax.ffi.register_ffi_target(
        f'{TARGET}_{name}', capsule, platform='cpu', api_version=1
    )
  return True


def fold(
    r: jax.Array, block: jax.Array, *, block_size: int = BLOCK_SIZE
) -> jax.Array:
  """R of `[r; block]` by LAPACK `?tpqrt`, with a non-negative diagonal.

  Traceable (jit, vmap over leading dimensions, shard_map); CPU only, and
  only where `available()`. No argument checks (`qr.fold_r` has them).

  Args:
    r: R so far, float32/float64[..., d, d], upper triangular.
    block: X_b, float[..., b, d], the same leading dimensions.
    block_size: LAPACK's nb (reflectors per block), clipped to [1, d].

  Returns:
    The new R, float[..., d, d], upper triangular, diagonal >= 0.
  """
  if not available():
    raise RuntimeError(
        'ctxlr.linalg._lapack_fold is not built (the package was installed '
        'without a C++ compiler); use qr.fold_r_dense.'
    )
  dtype = jnp.result_type(r.dtype, block.dtype)
  name = np.dtype(dtype).name
  if name not in ('float32', 'float64'):
    raise TypeError(f'fold: expected float32 or float64, got {name}.')
  # LAPACK is column-major: R column-major is Rᵀ row-major (likewise X_b).
  rt = jnp.swapaxes(r.astype(dtype), -1, -2)
  xt = jnp.swapaxes(block.astype(dtype), -1, -2)
  call = jax.ffi.ffi_call(
      f'{TARGET}_{name}',
      (
          jax.ShapeDtypeStruct(rt.shape, dtype),
          jax.ShapeDtypeStruct(xt.shape, dtype),
      ),
      vmap_method='broadcast_all',
      input_output_aliases={0: 0, 1: 1},
  )
  out_t, _ = call(rt, xt, block_size=np.int64(block_size))
  out = jnp.triu(jnp.swapaxes(out_t, -1, -2))
  signs = jnp.where(jnp.diagonal(out, axis1=-2, axis2=-1) < 0, -1, 1)
  return out * signs.astype(dtype)[..., :, None]
