r"""One process of the two-process TSQR test (tests/test_multihost.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
  CTXLR_COORDINATOR_ADDRESS=127.0.0.1:PORT CTXLR_NUM_PROCESSES=2 \
  CTXLR_PROCESS_ID=0 python tests/multihost_worker.py OUT.npz

Each process holds its own rows (`local_rows`, different counts per
process), builds one mesh over all processes' devices and computes the global
R three ways: `tsqr` of the rows sharded over the mesh (tree and gather
combines) and streaming (`accumulate_r_sharded`, each process its own stream
of blocks). It writes them to OUT.npz. A watchdog ends the process if
anything hangs.
"""

import faulthandler
import sys

import numpy as np

D = 16  # columns
ROWS = (37, 58)  # rows of process 0, 1: uneven, not multiples of 4
WATCHDOG_S = 150


def local_rows(process_id: int) -> np.ndarray:
  """The rows X_p of process p, float32[ROWS[p], D]."""
  rng = np.random.default_rng(100 + process_id)
  scales = np.logspace(0, -3, D)  # cond ≈ 1e3: not a trivial X
  return (rng.standard_normal((ROWS[process_id], D)) * scales).astype(
      np.float32
  )


def blocks_of(x: np.ndarray, process_id: int):
  """A stream of uneven blocks (sizes differ between processes)."""
  sizes = (5, 1, 13) if process_id == 0 else (7, 20, 2, 9)
  start = 0
  while start < x.shape[0]:
    for size in sizes:
      if start < x.shape[0]:
        yield x[start : start + size]
        start += size


def main(out_path: str) -> None:
  faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
  import jax  # pylint: disable=g-import-not-at-top
  from ctxlr import distributed  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import tsqr  # pylint: disable=g-import-not-at-top

  assert distributed.initialize(timeout_s=60), 'not multi-process'
  pid = jax.process_index()
  mesh = distributed.make_mesh('rows')
  x = local_rows(pid)
  x_global = distributed.shard_rows(x, mesh=mesh, axis='rows')
  results = {
      'num_devices': np.int64(jax.device_count()),
      'num_local_devices': np.int64(jax.local_device_count()),
      'process_count': np.int64(jax.process_count()),
      'global_rows': np.int64(x_global.shape[0]),
  }
  for combine in ('tree', 'gather'):
    r = tsqr.tsqr(x_global, mesh=mesh, combine=combine)
    results[f'tsqr_{combine}'] = np.asarray(r)
    r = tsqr.accumulate_r_sharded(
        blocks_of(x, pid), mesh=mesh, d=D, block_size=2, combine=combine
    )
    results[f'stream_{combine}'] = np.asarray(r)
  np.savez(out_path, **results)
  jax.distributed.shutdown()
  faulthandler.cancel_dump_traceback_later()


if __name__ == '__main__':
  main(sys.argv[1])
