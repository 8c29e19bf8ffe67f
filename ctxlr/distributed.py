"""Multi-host helpers: start `jax.distributed`, a mesh over every process.

One process per host, the same program on each. Call `initialize()` first
thing (before any JAX computation), then build the mesh and run the same
`ctxlr.linalg.tsqr` code as on one host:

    # on every host, with its own CTXLR_PROCESS_ID:
    #   CTXLR_COORDINATOR_ADDRESS=host0:12345 CTXLR_NUM_PROCESSES=2 \\
    #   CTXLR_PROCESS_ID=0 python my_script.py
    from ctxlr import distributed
    distributed.initialize()           # no-op without the variables
    mesh = distributed.make_mesh()     # axis 'rows' over all devices
    r = tsqr.accumulate_r_sharded(my_local_blocks(), mesh=mesh, d=576)

On CPU the cross-process collectives are gloo's (TCP).
"""

import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

ENV_ADDRESS = 'CTXLR_COORDINATOR_ADDRESS'  # host:port of process 0
ENV_NUM_PROCESSES = 'CTXLR_NUM_PROCESSES'
ENV_PROCESS_ID = 'CTXLR_PROCESS_ID'


def _from_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(
        f'Environment variable {name}={value!r} is not an ' 'integer.'
    ) from e


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    cpu_collectives: str = 'gloo',
) -> bool:
  """Joins this process to a multi-process JAX job, if one is configured.

  Arguments left as None are read from the environment
  (`CTXLR_COORDINATOR_ADDRESS` or JAX's own `JAX_COORDINATOR_ADDRESS`,
  `CTXLR_NUM_PROCESSES`, `CTXLR_PROCESS_ID`). With none of the three set
  anywhere, or one process, nothing happens: the program runs single-host.
  Must run before any JAX computation (JAX raises otherwise).

  Args:
    coordinator_address: `'host:port'` of process 0, reachable by all.
    num_processes: number of processes (hosts), >= 1.
    process_id: this process's index in [0, num_processes).
    timeout_s: how long to wait for the other processes to join (and to
      shut down), in seconds.
    cpu_collectives: cross-process collectives on CPU: 'gloo' or 'mpi'.

  Returns:
    True if `jax.distributed` was initialized, False for a single process.

  Raises:
    ValueError: if only some of the three settings are given, or they are
      out of range.
  """
  address = (
      coordinator_address
      or os.environ.get(ENV_ADDRESS)
      or os.environ.get('JAX_COORDINATOR_ADDRESS')
  )
  if num_processes is None:
    num_processes = _from_env(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _from_env(ENV_PROCESS_ID)
  given = {
      'coordinator_address': address,
      'num_processes': num_processes,
      'process_id': process_id,
  }
  if all(v is None for v in given.values()):
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(
        f'Multi-process setup is incomplete: {missing} not '
        f'given (arguments or {ENV_ADDRESS}, {ENV_NUM_PROCESSES},'
        f' {ENV_PROCESS_ID}).'
    )
  if ':' not in address or not address.rsplit(':', 1)[1].isdigit():
    raise ValueError(
        f"coordinator_address must be 'host:port'; got " f'{address!r}.'
    )
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1; got {num_processes}.')
  if not 0 <= process_id < num_processes:
    raise ValueError(
        f'process_id must be in [0, {num_processes}); got ' f'{process_id}.'
    )
  if cpu_collectives not in ('gloo', 'mpi'):
    raise ValueError(
        "cpu_collectives must be 'gloo' or 'mpi'; got " f'{cpu_collectives!r}.'
    )
  if num_processes == 1:
    return False
  jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=timeout_s,
      shutdown_timeout_seconds=timeout_s,
  )
  return True


def make_mesh(axis: str = 'rows', *, devices: Any = None) -> jax.sharding.Mesh:
  """A one-axis mesh over the devices of every process (default: all).

  Devices are in `jax.devices()` order: process 0's first. Axis type:
  JAX's default (Explicit since 0.9), so inputs must carry their sharding.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError('devices is empty: a mesh needs at least one device.')
  return jax.make_mesh((len(devices),), (axis,), devices=devices)


def shard_rows(
    x_local: Any, *, mesh: jax.sharding.Mesh, axis: str = 'rows'
) -> jax.Array:
  """One global array of rows from each process's own rows.

  Every process passes its local rows (row counts may differ between
  processes); each is zero-padded to a common count, a multiple of its
  number of devices on `axis` (zero rows do not change R). Every process
  must call this (the counts are exchanged).

  Args:
    x_local: this process's rows, float[n_p, d] (NumPy or JAX).
    mesh: a mesh whose only axis of size > 1 is `axis`, over all processes.
    axis: the axis the rows are sharded over.

  Returns:
    float[n, d] global array, sharded over `axis`, n = D · max_p
    ceil(n_p / D_p) with D_p the devices of process p.
  """
  if axis not in mesh.axis_names or mesh.devices.size != mesh.shape[axis]:
    raise ValueError(
        f'mesh {dict(mesh.shape)} must have one axis {axis!r} '
        'holding all its devices.'
    )
  shape = np.shape(x_local)
  if len(shape) != 2:
    raise ValueError(f'x_local must be a matrix (rows, d); got shape {shape}.')
  here = jax.process_index()
  n_local_devices = sum(d.process_index == here for d in mesh.devices.flat)
  if not n_local_devices:
    raise ValueError(f'mesh has no device of process {here}.')
  per_device = -(-shape[0] // n_local_devices)
  if jax.process_count() > 1:
    per_device = int(
        np.max(multihost_utils.process_allgather(np.int64(per_device)))
    )
  per_device = max(per_device, 1)
  x = np.asarray(x_local)
  x = np.concatenate(
      [
          x,
          np.zeros(
              (per_device * n_local_devices - shape[0], shape[1]), x.dtype
          ),
      ]
  )
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
  return jax.make_array_from_process_local_data(
      sharding, x, (per_device * mesh.size, shape[1])
  )
