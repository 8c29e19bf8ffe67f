"""Saved models and factor exports: verified on load, safe to save over."""

import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ctxlr import checkpoint
from ctxlr import pipeline
from ctxlr import results
from tests import toy_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = jnp.arange(10).reshape(1, 10)


def _batches():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.integers(0, 64, (2, 12))) for _ in range(3)]


def _compressed(ratio):
  model = toy_model.Toy()
  pipeline.compress(model, _batches(), ratio=ratio)
  return model


@pytest.fixture(scope='module')
def models():
  """Two compressed toy models with different specs (ranks), and logits."""
  a, b = _compressed(0.5), _compressed(0.3)
  return dict(
      a=a, b=b, logits_a=np.asarray(a(IDS)), logits_b=np.asarray(b(IDS))
  )


def _logits(directory):
  return np.asarray(checkpoint.load(directory, toy_model.Toy)(IDS))


def _state_files(directory):
  record = checkpoint.verify(directory)
  folder = os.path.join(directory, record['save'])
  return sorted(
      (info['size'], os.path.join(folder, rel))
      for rel, info in record['files'].items()
  )


def test_save_load_round_trip_and_layout(tmp_path, models):
  directory = str(tmp_path / 'ckpt')
  checkpoint.save(models['a'], directory, base={'toy': True})
  assert sorted(os.listdir(directory)) == ['checkpoint.json', 'save-000001']
  record = results.read_json(os.path.join(directory, 'checkpoint.json'))
  assert record['spec'] == checkpoint.surgery_spec(models['a'])
  assert record['base'] == {'toy': True}
  np.testing.assert_array_equal(_logits(directory), models['logits_a'])
  checkpoint.save(models['b'], directory)  # save over
  assert sorted(os.listdir(directory)) == ['checkpoint.json', 'save-000002']
  np.testing.assert_array_equal(_logits(directory), models['logits_b'])


class _Killed(BaseException):
  """Stands in for SIGKILL inside the process (nothing after it runs)."""


def test_save_over_interrupted_at_each_step_keeps_a_whole_checkpoint(
    tmp_path, models, monkeypatch
):
  """Case 2, deterministic: the old save stays until the new one commits."""
  directory = str(tmp_path / 'ckpt')
  checkpoint.save(models['a'], directory)

  def die(*args, **kwargs):
    raise _Killed()

  with monkeypatch.context() as m:  # state written, commit not yet
    m.setattr(checkpoint, '_file_table', die)
    with pytest.raises(_Killed):
      checkpoint.save(models['b'], directory)
  assert 'save-000002' in os.listdir(directory)  # the new state
  np.testing.assert_array_equal(_logits(directory), models['logits_a'])
  remove = checkpoint._remove_other_saves
  calls = []

  def remove_then_die(directory, keep):
    calls.append(keep)
    if len(calls) == 2:  # committed; old folder not deleted
      raise _Killed()
    remove(directory, keep)

  with monkeypatch.context() as m:
    m.setattr(checkpoint, '_remove_other_saves', remove_then_die)
    with pytest.raises(_Killed):
      checkpoint.save(models['b'], directory)
  assert calls == ['save-000001', 'save-000003']  # leftover 2 was removed
  assert sorted(os.listdir(directory)) == [
      'checkpoint.json',
      'save-000001',
      'save-000003',
  ]
  np.testing.assert_array_equal(_logits(directory), models['logits_b'])
  checkpoint.save(models['a'], directory)  # cleans up as it goes
  assert sorted(os.listdir(directory)) == ['checkpoint.json', 'save-000004']
  np.testing.assert_array_equal(_logits(directory), models['logits_a'])


def _save_b_over(directory):
  """Worker: compress model B and save it over `directory` (then exit)."""
  checkpoint.save(_compressed(0.3), directory)


def _kill_at(directory, event, timeout=120):
  """Starts `_save_b_over` and SIGKILLs it as soon as `event(dir)` holds."""
  proc = subprocess.Popen(
      [
          sys.executable,
          '-c',
          'from tests import test_checkpoint as t; '
          f't._save_b_over({directory!r})',
      ],
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
  )
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      if event(directory):
        proc.send_signal(signal.SIGKILL)
        break
      if proc.poll() is not None:
        break
      time.sleep(0.001)
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode


def test_save_over_sigkilled_at_file_events_loses_nothing(tmp_path, models):
  """Case 2 with real SIGKILLs, at the moments the issue found them."""
  directory = str(tmp_path / 'ckpt')
  checkpoint.save(models['a'], directory)
  record = os.path.join(directory, 'checkpoint.json')
  committed = os.stat(record).st_ino
  events = [
      (
          'new save folder appears',
          lambda d: os.path.isdir(os.path.join(d, 'save-000002')),
      ),
      (
          'orbax finalizes the new state',
          lambda d: any(
              os.path.isdir(os.path.join(d, e, 'state'))
              for e in os.listdir(d)
              if e != 'save-000001' and e.startswith('save-')
          ),
      ),
      (
          'the new record is committed',
          lambda d: os.stat(os.path.join(d, 'checkpoint.json')).st_ino
          != committed,
      ),
  ]
  for label, event in events:
    code = _kill_at(directory, event)
    now = os.stat(record).st_ino
    # Either the old checkpoint (not committed yet) or the new one: whole.
    want = models['logits_a'] if now == committed else models['logits_b']
    np.testing.assert_array_equal(_logits(directory), want, err_msg=label)
    if label != events[-1][0]:  # (the last event may come just as it ends)
      assert code == -signal.SIGKILL, f'{label}: exit code {code}'
  assert os.stat(record).st_ino != committed  # the last kill was after it


def test_flipped_bytes_in_the_state_are_named(tmp_path, models):
  """Case 3: 64 flipped bytes in the orbax state are found and named."""
  directory = str(tmp_path / 'ckpt')
  checkpoint.save(models['a'], directory)
  size, path = _state_files(directory)[-1]  # the largest: the arrays
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    data = f.read(64)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xA5 for b in data))
  rel = os.path.relpath(path, os.path.join(directory, 'save-000001'))
  with pytest.raises(
      ValueError,
      match=rf'is damaged: in save-000001/, '
      rf'{rel} is corrupt \(SHA-256 mismatch\)',
  ):
    checkpoint.load(directory, toy_model.Toy)


def test_truncated_or_missing_state_files_are_named(tmp_path, models):
  """Case 6: a truncated orbax state is a one-line error, not a traceback."""
  directory = str(tmp_path / 'ckpt')
  checkpoint.save(models['a'], directory)
  files = _state_files(directory)
  size, path = files[-1]
  with open(path, 'r+b') as f:
    f.truncate(size // 3)
  os.remove(files[0][1])
  with pytest.raises(ValueError) as e:
    checkpoint.load(directory, toy_model.Toy)
  rel = os.path.relpath(files[0][1], os.path.join(directory, 'save-000001'))
  assert f'{rel} is missing' in str(e.value)
  assert (
      f'has {size // 3} bytes, expected {size} (truncated or altered)'
      in str(e.value)
  )
  assert str(e.value).endswith('It cannot be loaded.')


def test_no_or_damaged_record_is_a_clear_error(tmp_path, models):
  directory = str(tmp_path / 'ckpt')
  os.makedirs(directory)
  with pytest.raises(
      ValueError,
      match='holds no finished checkpoint: ' 'checkpoint.json is missing',
  ):
    checkpoint.load(directory, toy_model.Toy)
  checkpoint.save(models['a'], directory)
  record = os.path.join(directory, 'checkpoint.json')
  with open(record, 'r+b') as f:
    f.truncate(100)
  with pytest.raises(
      ValueError, match='is damaged: .*checkpoint.json is not ' 'valid JSON'
  ):
    checkpoint.load(directory, toy_model.Toy)
  checkpoint.save(models['b'], directory)  # a damaged record: redone
  np.testing.assert_array_equal(_logits(directory), models['logits_b'])


def test_export_import_round_trip(tmp_path, models):
  path = str(tmp_path / 'f.safetensors')
  checkpoint.export_factors(models['a'], path, metadata=dict(note='x'))
  meta = safetensors.safe_open(path, 'np').metadata()  # readable w/o JAX
  assert set(meta) == {
      'ctxlr_spec',
      'ctxlr_metadata',
      'ctxlr_name',
      'ctxlr_sha256',
  }
  dense = checkpoint.import_factors(toy_model.Toy(), path)
  np.testing.assert_array_equal(np.asarray(dense(IDS)), models['logits_a'])
  with pytest.raises(ValueError, match='another model'):
    checkpoint.import_factors(toy_model.Toy(d=8), path)


def test_corrupt_export_is_named(tmp_path, models):
  """Case 3: 64 corrupted bytes in factors.safetensors are found."""
  path = str(tmp_path / 'f.safetensors')
  checkpoint.export_factors(models['a'], path)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(size - 200)
    f.write(b'\x7f' * 64)
  with pytest.raises(
      ValueError, match=r'f.safetensors is corrupt: the ' 'SHA-256'
  ):
    checkpoint.import_factors(toy_model.Toy(), path)


def test_import_of_a_file_without_the_spec_is_a_clear_error(tmp_path):
  """Case 6: not `TypeError: 'NoneType' object is not subscriptable`."""
  path = str(tmp_path / 'plain.safetensors')
  safetensors.numpy.save_file(dict(w=np.ones((2, 2), np.float32)), path)
  with pytest.raises(
      ValueError,
      match=r'is not a ctxlr factors export: its '
      r'safetensors metadata has no ctxlr_spec \(keys \[\]\)',
  ):
    checkpoint.import_factors(toy_model.Toy(), path)
