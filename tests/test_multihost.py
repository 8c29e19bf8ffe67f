"""Two processes on loopback, 4 CPU devices each: the global R of TSQR.

The test starts two copies of tests/multihost_worker.py (gloo collectives
over 127.0.0.1, a free port), waits with a time-out, kills both on failure,
and compares each process's R with a float64 NumPy R of all rows.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import multihost_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _reference_r(x: np.ndarray) -> np.ndarray:
  r = np.linalg.qr(x.astype(np.float64), mode='r')
  return r * np.where(np.diag(r) < 0, -1.0, 1.0)[:, None]


def _run_workers(tmp_path):
  port = _free_port()
  procs, outs = [], []
  for pid in range(2):
    env = dict(os.environ)
    env.update(
        {
            'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
            'JAX_PLATFORMS': 'cpu',
            'CTXLR_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
            'JAX_COORDINATOR_BIND_ADDRESS': f'127.0.0.1:{port}',
            'CTXLR_NUM_PROCESSES': '2',
            'CTXLR_PROCESS_ID': str(pid),
            'PYTHONPATH': ROOT,
        }
    )
    env.pop('JAX_NUM_CPU_DEVICES', None)
    out = tmp_path / f'process{pid}.npz'
    log = (tmp_path / f'process{pid}.log').open('w')
    procs.append(
        (
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(ROOT, 'tests', 'multihost_worker.py'),
                    str(out),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            ),
            log,
        )
    )
    outs.append(out)
  try:
    for proc, _ in procs:
      proc.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
      log.close()
  logs = [(tmp_path / f'process{pid}.log').read_text() for pid in range(2)]
  for pid, (proc, _) in enumerate(procs):
    if proc.returncode != 0:
      pytest.fail(
          f'process {pid} exited with {proc.returncode}:\n'
          + '\n'.join(
              f'--- process {i} ---\n{t[-3000:]}' for i, t in enumerate(logs)
          )
      )
  return [dict(np.load(out)) for out in outs]


def test_two_processes_match_single_process_reference(tmp_path):
  results = _run_workers(tmp_path)
  x = np.concatenate([multihost_worker.local_rows(p) for p in range(2)])
  expected = _reference_r(x)
  scale = np.linalg.norm(expected)
  for pid, res in enumerate(results):
    assert res['process_count'] == 2
    assert res['num_devices'] == 8 and res['num_local_devices'] == 4
    # 37 and 58 rows, padded to a common 15 rows per device: 8 * 15.
    assert res['global_rows'] == 120
    for key in ('tsqr_tree', 'tsqr_gather', 'stream_tree', 'stream_gather'):
      err = np.linalg.norm(res[key] - expected) / scale
      assert err < 1e-5, (pid, key, err)
  # Every process holds the same R.
  for key in ('tsqr_tree', 'stream_tree'):
    np.testing.assert_array_equal(results[0][key], results[1][key])


@pytest.fixture
def no_env(monkeypatch):
  for name in (
      'CTXLR_COORDINATOR_ADDRESS',
      'JAX_COORDINATOR_ADDRESS',
      'CTXLR_NUM_PROCESSES',
      'CTXLR_PROCESS_ID',
  ):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_initialize_is_a_no_op_for_one_process(no_env):
  from ctxlr import distributed  # pylint: disable=g-import-not-at-top

  assert distributed.initialize() is False
  assert distributed.initialize('127.0.0.1:1234', 1, 0) is False


@pytest.mark.parametrize(
    'args,env,match',
    [
        (('127.0.0.1:1234', 2, None), {}, r"\['process_id'\] not given"),
        ((None, None, 1), {}, r"\['coordinator_address', 'num_processes'\]"),
        (
            ('127.0.0.1:1234', 2, 2),
            {},
            r'process_id must be in \[0, 2\); got 2',
        ),
        (('127.0.0.1', 2, 0), {}, "must be 'host:port'; got '127.0.0.1'"),
        (('127.0.0.1:1234', 0, 0), {}, 'num_processes must be >= 1; got 0'),
        (
            (None, None, None),
            {'CTXLR_NUM_PROCESSES': 'two'},
            "CTXLR_NUM_PROCESSES='two' is not an integer",
        ),
        (
            (None, None, None),
            {'CTXLR_NUM_PROCESSES': '2', 'CTXLR_PROCESS_ID': '0'},
            r"\['coordinator_address'\] not given",
        ),
    ],
)
def test_initialize_rejects_incomplete_setups(no_env, args, env, match):
  from ctxlr import distributed  # pylint: disable=g-import-not-at-top

  for name, value in env.items():
    no_env.setenv(name, value)
  with pytest.raises(ValueError, match=match):
    distributed.initialize(*args)


def test_initialize_rejects_unknown_collectives(no_env):
  from ctxlr import distributed  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="'gloo' or 'mpi'; got 'nccl'"):
    distributed.initialize('127.0.0.1:1234', 2, 0, cpu_collectives='nccl')


def test_make_mesh_and_shard_rows_on_one_process():
  import jax  # pylint: disable=g-import-not-at-top
  from ctxlr import distributed  # pylint: disable=g-import-not-at-top

  mesh = distributed.make_mesh('data')
  assert dict(mesh.shape) == {'data': jax.device_count()}
  x = multihost_worker.local_rows(0)  # 37 rows
  xg = distributed.shard_rows(x, mesh=mesh, axis='data')
  per_device = -(-x.shape[0] // jax.device_count())
  assert xg.shape == (per_device * jax.device_count(), x.shape[1])
  np.testing.assert_array_equal(np.asarray(xg)[: x.shape[0]], x)
  np.testing.assert_array_equal(np.asarray(xg)[x.shape[0] :], 0)
  with pytest.raises(ValueError, match='x_local must be a matrix'):
    distributed.shard_rows(x[0], mesh=mesh, axis='data')
  with pytest.raises(ValueError, match="one axis 'rows'"):
    distributed.shard_rows(x, mesh=mesh, axis='rows')
  with pytest.raises(ValueError, match='devices is empty'):
    distributed.make_mesh(devices=[])
