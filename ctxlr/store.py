"""Finished work on disk: calibration statistics and each solved layer.

A run directory holds `manifest.json` (a fingerprint of the model and of every
option that changes the result), `stats.safetensors` once calibration is done,
and `layers/<name>.safetensors` as each layer is solved. Every file is written
to a `.tmp` name and renamed, and its SHA-256 is recorded beside it, so a run
killed at any point (even SIGKILL) leaves only complete files, and a resumed
run recomputes nothing that finished. A store made for another model or other
options, or a file whose checksum does not match, is refused with a clear
error: never silently reused.
"""
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import safetensors.numpy

from ctxlr import results
from ctxlr import stats as stats_lib


def fingerprint_arrays(arrays: Mapping[str, Any]) -> str:
  """SHA-256 over names, shapes, dtypes and bytes of the arrays."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(jax.device_get(arrays[name]))
    h.update(f'{name}:{a.shape}:{a.dtype};'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


class RunStore:
  """Saves and restores finished work of one compression run."""

  def __init__(self, directory: str, fingerprint: Mapping[str, Any]):
    """Opens (or creates) the store; refuses one made for something else.

    Args:
      directory: the run's checkpoint directory.
      fingerprint: JSON-able description of the model and the options;
        compared key by key with the stored one.

    Raises:
      ValueError: if the directory holds a store with another fingerprint.
    """
    self.directory = directory
    fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True,
                                        default=str))
    manifest = os.path.join(directory, 'manifest.json')
    if os.path.exists(manifest):
      stored = results.read_json(manifest)
      diff = sorted(k for k in set(stored) | set(fingerprint)
                    if stored.get(k) != fingerprint.get(k))
      if diff:
        raise ValueError(
            f'Checkpoint {directory} was made for another run: it differs in '
            f'{diff} (stored {[stored.get(k) for k in diff]}, now '
            f'{[fingerprint.get(k) for k in diff]}). Use another directory or '
            'delete it.')
    else:
      os.makedirs(os.path.join(directory, 'layers'), exist_ok=True)
      results.write_json(manifest, fingerprint)

  def _write(self, path: str, tensors: Mapping[str, np.ndarray],
             metadata: Mapping[str, Any]) -> None:
    tmp = f'{path}.tmp'
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(jax.device_get(v)) for k, v in
         tensors.items()}, tmp, metadata={'json': json.dumps(metadata, default=results.json_default)})
    digest = _sha256(tmp)
    os.replace(tmp, path)
    results.write_text(f'{path}.sha256', digest + '\n')

  def _read(self, path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
      with open(f'{path}.sha256') as f:
        expected = f.read().strip()
    except FileNotFoundError:
      raise ValueError(f'{path} has no checksum file: refusing to use it.')
    if _sha256(path) != expected:
      raise ValueError(f'{path} is corrupted (SHA-256 mismatch): delete it '
                       'to recompute, or use another directory.')
    tensors = safetensors.numpy.load_file(path)
    with safetensors.safe_open(path, 'np') as f:
      metadata = json.loads(f.metadata()['json'])
    return tensors, metadata

  # Calibration statistics.
  @property
  def stats_path(self) -> str:
    return os.path.join(self.directory, 'stats.safetensors')

  def has_stats(self) -> bool:
    return os.path.exists(self.stats_path)

  def save_stats(self, stats: Mapping[str, stats_lib.LayerStats],
                 group_of: Mapping[str, str]) -> None:
    tensors = {}
    for g, s in stats.items():
      for field in ('r', 'gram', 'abs_sum'):
        if getattr(s, field) is not None:
          tensors[f'{g}/{field}'] = getattr(s, field)
    self._write(self.stats_path, tensors, dict(
        group_of=dict(group_of), count={g: s.count for g, s in stats.items()}))

  def load_stats(self) -> tuple[dict[str, stats_lib.LayerStats],
                                dict[str, str]]:
    tensors, meta = self._read(self.stats_path)
    stats = {g: stats_lib.LayerStats(
        r=tensors[f'{g}/r'], gram=tensors.get(f'{g}/gram'),
        abs_sum=tensors.get(f'{g}/abs_sum'), count=int(count))
             for g, count in meta['count'].items()}
    return stats, meta['group_of']

  # Solved layers.
  def _layer_path(self, name: str) -> str:
    return os.path.join(self.directory, 'layers', f'{name}.safetensors')

  def save_layer(self, name: str, result: Mapping[str, Any]) -> None:
    meta = {k: v for k, v in result.items() if k not in ('a', 'b')}
    self._write(self._layer_path(name), dict(a=result['a'], b=result['b']),
                meta)

  def finished_layers(self) -> list[str]:
    folder = os.path.join(self.directory, 'layers')
    return sorted(f[:-len('.safetensors')] for f in os.listdir(folder)
                  if f.endswith('.safetensors'))

  def load_layer(self, name: str) -> dict[str, Any]:
    tensors, meta = self._read(self._layer_path(name))
    return dict(meta, a=tensors['a'], b=tensors['b'])
