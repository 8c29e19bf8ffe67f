"""Finished work on disk: calibration statistics and each solved layer.

A run directory holds `manifest.json` (the run's identity: a fingerprint of
the model and of every option that changes the result, and the SHA-256 of
the calibration batches), `stats.safetensors` once calibration is done, and
`layers/<name>.safetensors` as each layer is solved.

Every file is self-verifying (`write_verified`): written under a temporary
name and renamed into place in one step, with a SHA-256 in its own metadata
over its name, the run's identity, its metadata and every tensor's name,
shape, dtype and bytes. A run killed at any point (even SIGKILL) therefore
leaves each file complete or absent, and a file that does not verify
(truncated, altered, another layer's, another run's) is *not finished*: it is
named in a warning and recomputed, never used, never a reason to refuse the
run. Files of a run killed mid-write (`*.tmp`, and safetensors' own
`.tmp??????`) are removed on opening.

A directory made for another model or other options is refused with a clear
error (`RunStore`), and so is one made for other calibration data: the data
are identified by their content by default (`fingerprinted`,
`RunStore.bind_data`); an explicit `data_id` in the fingerprint names them
instead. One run at a time may use a directory.
"""

import hashlib
import json
import logging
import os
from typing import Any, Iterable, Iterator, Mapping
import urllib.parse

import jax
import numpy as np
import safetensors
import safetensors.numpy

from ctxlr import results
from ctxlr import stats as stats_lib

FORMAT = 'ctxlr-run-store/2'
NAME_KEY = 'ctxlr_name'  # safetensors metadata: what the file holds
SHA256_KEY = 'ctxlr_sha256'  # safetensors metadata: its checksum
_JSON_KEY = 'ctxlr_json'  # run-store files: their JSON metadata
_SUFFIX = '.safetensors'


class CorruptFileError(ValueError):
  """A file that does not verify: truncated, altered, or another one's."""


def _hash_array(h: Any, key: str, array: np.ndarray) -> None:
  a = np.ascontiguousarray(array).reshape(-1)  # bytes in C order
  h.update(f'{key}\0{array.dtype.str}\0{array.shape}\0'.encode())
  h.update(a.view(np.uint8))


def fingerprint_arrays(arrays: Mapping[str, Any]) -> str:
  """SHA-256 over names, shapes, dtypes and bytes of the arrays."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(jax.device_get(arrays[name]))
    h.update(f'{name}:{a.shape}:{a.dtype};'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def tensors_digest(
    tensors: Mapping[str, np.ndarray], *, name: str, metadata: Mapping[str, str]
) -> str:
  """SHA-256 binding a file's name, metadata and tensors together.

  Each tensor enters with its key, dtype and shape, then its bytes, so a
  file is only valid for the name it was written for, with the shapes and
  dtypes it was written with.
  """
  h = hashlib.sha256(b'ctxlr-verified-safetensors/1\0')
  h.update(json.dumps([name, sorted(metadata.items())]).encode() + b'\0')
  for key in sorted(tensors):
    _hash_array(h, key, np.asarray(tensors[key]))
  return h.hexdigest()


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory or '.', os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_verified(
    path: str,
    tensors: Mapping[str, Any],
    *,
    name: str,
    metadata: Mapping[str, str] | None = None,
) -> int:
  """Writes a self-verifying safetensors file atomically.

  The tensors go to `<path>.tmp` with `metadata`, `ctxlr_name = name` and
  `ctxlr_sha256` (`tensors_digest`) in the safetensors metadata; the file is
  synced and renamed to `path`, so `path` is either the complete new file or
  what it was before.

  Args:
    path: where the file goes (its directory must exist).
    tensors: {key: array}; JAX arrays are fetched to the host.
    name: what the file holds (e.g. the layer), checked by `read_verified`.
    metadata: extra string metadata (e.g. JSON), covered by the checksum.

  Returns:
    The size of the file in bytes.
  """
  metadata = dict(metadata or {})
  for key, value in metadata.items():
    if not isinstance(value, str) or key in (NAME_KEY, SHA256_KEY):
      raise ValueError(
          f'metadata must map str to str without {NAME_KEY!r} '
          f'or {SHA256_KEY!r}; got {key!r}: '
          f'{type(value).__name__}.'
      )
  arrays = {}
  for key, value in tensors.items():
    a = np.asarray(jax.device_get(value))
    arrays[key] = a if a.flags.c_contiguous else np.ascontiguousarray(a)
  digest = tensors_digest(arrays, name=name, metadata=metadata)
  tmp = f'{path}.tmp'
  safetensors.numpy.save_file(
      arrays,
      tmp,
      metadata=dict(metadata, **{NAME_KEY: name, SHA256_KEY: digest}),
  )
  fd = os.open(tmp, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(path))
  return os.path.getsize(path)


def read_metadata(path: str) -> dict[str, str]:
  """The safetensors metadata of `path` (header only; not verified).

  Raises:
    FileNotFoundError: if `path` does not exist.
    CorruptFileError: if its header cannot be read.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist.')
  try:
    with safetensors.safe_open(path, 'np') as f:
      return dict(f.metadata() or {})
  except Exception as e:  # pylint: disable=broad-except  (any parse error)
    raise CorruptFileError(
        f'{path} is not a readable safetensors file ({type(e).__name__}: '
        f'{e}): truncated or damaged.'
    ) from e


def read_verified(
    path: str, *, name: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a `write_verified` file and checks it against its checksum.

  Args:
    path: the file.
    name: if given, the name it must have been written for.

  Returns:
    (tensors, metadata) with the metadata as written (strings).

  Raises:
    FileNotFoundError: if `path` does not exist.
    CorruptFileError: (a ValueError) naming the file and what is wrong: not
      readable, no checksum, written for another name, or a checksum that
      does not match its contents.
  """
  meta = read_metadata(path)
  if SHA256_KEY not in meta or NAME_KEY not in meta:
    raise CorruptFileError(
        f'{path} has no ctxlr checksum in its metadata (keys '
        f'{sorted(meta)}): not written by ctxlr.store.write_verified, or '
        'written by an older version; it cannot be verified.'
    )
  if name is not None and meta[NAME_KEY] != name:
    raise CorruptFileError(
        f'{path} holds {meta[NAME_KEY]!r}, not {name!r}: '
        "another file's contents under this name."
    )
  try:
    tensors = safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (any parse error)
    raise CorruptFileError(
        f'{path} cannot be read ({type(e).__name__}: '
        f'{e}): truncated or damaged.'
    ) from e
  expected = meta.pop(SHA256_KEY)
  stored_name = meta.pop(NAME_KEY)
  digest = tensors_digest(tensors, name=stored_name, metadata=meta)
  if digest != expected:
    raise CorruptFileError(
        f'{path} is corrupt: the SHA-256 of its name, metadata and tensors '
        f'(keys, shapes, dtypes, bytes) is {digest[:16]}…, the file records '
        f'{expected[:16]}….'
    )
  return tensors, meta


class BatchFingerprint:
  """Running SHA-256 of a stream of batches (pytrees of arrays).

      fp = BatchFingerprint()
      for batch in batches:
        fp.update(batch)
      fp.hexdigest()

  Each batch enters with its index, tree structure, and every leaf's dtype,
  shape and bytes: the same batches in the same order give the same digest,
  any other data another one.
  """

  def __init__(self):
    self._hash = hashlib.sha256(b'ctxlr-batches/1\0')
    self.count = 0

  def update(self, batch: Any) -> None:
    leaves, treedef = jax.tree.flatten(batch)
    self._hash.update(f'{self.count}\0{treedef}\0'.encode())
    for i, leaf in enumerate(leaves):
      _hash_array(self._hash, str(i), np.asarray(jax.device_get(leaf)))
    self.count += 1

  def hexdigest(self) -> str:
    return self._hash.hexdigest()


def fingerprint_batches(batches: Iterable[Any]) -> str:
  """`BatchFingerprint` digest of all of `batches` (iterates them once)."""
  fp = BatchFingerprint()
  for batch in batches:
    fp.update(batch)
  return fp.hexdigest()


class Fingerprinted:
  """Batches that hash themselves as they are read (`fingerprinted`)."""

  def __init__(self, batches: Iterable[Any]):
    self._batches = batches
    self._digest = None
    self._started = False

  def __iter__(self) -> Iterator[Any]:
    self._started = True
    fp = BatchFingerprint()
    for batch in self._batches:
      fp.update(batch)
      yield batch
    if self._digest is None:  # the first complete pass
      self._digest = fp.hexdigest()

  def __len__(self) -> int:
    return len(self._batches)  # TypeError for unsized iterables, as usual

  def hexdigest(self) -> str:
    """The digest of the batches; reads them now if no pass has completed.

    Raises:
      ValueError: if a one-pass iterator was read part of the way only (the
        rest of its batches are gone, so its digest is unknown).
    """
    if self._digest is None:
      if self._started and iter(self._batches) is self._batches:
        raise ValueError(
            'The calibration batches (a one-pass iterator) were '
            'read part of the way only: their fingerprint is '
            'unknown.'
        )
      for _ in self:
        pass
    return self._digest


def fingerprinted(batches: Iterable[Any]) -> Fingerprinted:
  """Wraps `batches` so that reading them also computes their SHA-256.

      batches = fingerprinted(batches)
      stats = calibrate(model, batches, ...)   # one pass, hashed on the way
      store.bind_data(batches.hexdigest())

  The wrapper yields the same objects; `hexdigest()` is the digest of the
  first complete pass (`BatchFingerprint`), and reads the batches itself
  (without any model) if nothing has yet.
  """
  return Fingerprinted(batches)


def _file_name(name: str) -> str:
  if not isinstance(name, str) or not name:
    raise ValueError(f'A layer name must be a non-empty str; got {name!r}.')
  return urllib.parse.quote(name, safe='') + _SUFFIX  # '/' -> '%2F'


class RunStore:
  """Saves and restores finished work of one compression run."""

  def __init__(self, directory: str, fingerprint: Mapping[str, Any]):
    """Opens (or creates) the store; refuses one made for something else.

    Args:
      directory: the run's checkpoint directory.
      fingerprint: JSON-able description of the model and the options;
        compared key by key with the stored one.

    Raises:
      ValueError: if the directory holds a store with another fingerprint,
        a damaged manifest, or a store of another format.
    """
    self.directory = directory
    self.fingerprint = json.loads(
        json.dumps(dict(fingerprint), sort_keys=True, default=str)
    )
    self.not_finished: list[str] = []  # files found invalid, recomputed
    self._verified: dict[str, tuple[dict, dict]] = {}
    if os.path.exists(self._manifest_path):
      stored = self._read_manifest()
      diff = sorted(
          k
          for k in set(stored['fingerprint']) | set(self.fingerprint)
          if stored['fingerprint'].get(k) != self.fingerprint.get(k)
      )
      if diff:
        raise ValueError(
            f'Checkpoint {directory} was made for another run: it differs in '
            f'{diff} (stored {[stored["fingerprint"].get(k) for k in diff]}, '
            f'now {[self.fingerprint.get(k) for k in diff]}). Use another '
            'directory or delete it.'
        )
      self.data_sha256 = stored.get('data_sha256')
    else:
      os.makedirs(self._layers_dir, exist_ok=True)
      self.data_sha256 = None
      self._write_manifest()
    os.makedirs(self._layers_dir, exist_ok=True)
    for folder in (directory, self._layers_dir):  # a killed run's leftovers
      for entry in os.listdir(folder):  # ours, and safetensors' own
        if entry.endswith('.tmp') or entry.startswith('.tmp'):
          os.remove(os.path.join(folder, entry))

  @property
  def _manifest_path(self) -> str:
    return os.path.join(self.directory, 'manifest.json')

  @property
  def _layers_dir(self) -> str:
    return os.path.join(self.directory, 'layers')

  def _read_manifest(self) -> dict[str, Any]:
    path = self._manifest_path
    try:
      stored = results.read_json(path)
    except ValueError as e:
      raise ValueError(
          f'{path} is damaged ({e}). It identifies the run the directory '
          f'holds, so none of its files can be trusted: delete '
          f'{self.directory} (or use another directory) to start over.'
      ) from e
    if not isinstance(stored, dict) or stored.get('format') != FORMAT:
      found = stored.get('format') if isinstance(stored, dict) else None
      raise ValueError(
          f'{self.directory} is not a run store of this version (manifest '
          f'format {found!r}, expected {FORMAT!r}): delete it or use another '
          'directory.'
      )
    return stored

  def _write_manifest(self) -> None:
    results.write_json(
        self._manifest_path,
        dict(
            format=FORMAT,
            fingerprint=self.fingerprint,
            data_sha256=self.data_sha256,
        ),
    )

  @property
  def run_id(self) -> str:
    """SHA-256 of the fingerprint and the data digest: bound into each file."""
    return hashlib.sha256(
        json.dumps(
            [self.fingerprint, self.data_sha256], sort_keys=True
        ).encode()
    ).hexdigest()

  def bind_data(self, digest: str) -> None:
    """Records the calibration data's digest, or checks it against the store.

    Call it (with `fingerprinted(batches).hexdigest()`) before saving work
    that depends on the data. Work saved before the first binding belongs to
    a run of unknown data and is recomputed.

    Raises:
      ValueError: if the store was made for batches of another digest.
    """
    if not isinstance(digest, str) or not digest:
      raise ValueError(f'digest must be a non-empty str; got {digest!r}.')
    if self.data_sha256 is None:
      self.data_sha256 = digest
      self._write_manifest()
      self._verified.clear()
    elif digest != self.data_sha256:
      raise ValueError(
          f'Checkpoint {self.directory} was made for other calibration data: '
          f'their batches hash to {self.data_sha256[:16]}…, these to '
          f'{digest[:16]}…. Use another directory or delete it (or pass '
          'data_id to name the data yourself).'
      )

  def _write(
      self,
      path: str,
      name: str,
      tensors: Mapping[str, Any],
      meta: Mapping[str, Any],
  ) -> None:
    self._verified.pop(path, None)
    write_verified(
        path,
        tensors,
        name=name,
        metadata={
            _JSON_KEY: json.dumps(
                dict(run=self.run_id, meta=meta), default=results.json_default
            )
        },
    )

  def _load(
      self, path: str, name: str, *, strict: bool = False
  ) -> tuple[dict, dict] | None:
    """(tensors, meta) of a finished file, or None (absent / not finished)."""
    if path in self._verified:
      return self._verified[path]
    if not os.path.exists(path):
      return None
    try:
      tensors, raw = read_verified(path, name=name)
      stored = json.loads(raw[_JSON_KEY])
      if stored['run'] != self.run_id:
        raise CorruptFileError(
            f'{path} was written for another run of this directory (other '
            'calibration data, or before they were fingerprinted).'
        )
    except (CorruptFileError, KeyError, ValueError) as e:
      if strict:
        raise
      logging.warning('Not finished, recomputing: %s', e)
      self.not_finished.append(path)
      return None
    self._verified[path] = tensors, stored['meta']
    return self._verified[path]

  # Calibration statistics.
  @property
  def stats_path(self) -> str:
    return os.path.join(self.directory, 'stats' + _SUFFIX)

  def has_stats(self) -> bool:
    """Whether finished (verified) statistics are stored."""
    return self._load(self.stats_path, 'stats') is not None

  def save_stats(
      self,
      stats: Mapping[str, stats_lib.LayerStats],
      group_of: Mapping[str, str],
  ) -> None:
    tensors = {}
    for g, s in stats.items():
      for field in ('r', 'gram', 'abs_sum'):
        if getattr(s, field) is not None:
          tensors[f'{g}/{field}'] = getattr(s, field)
    self._write(
        self.stats_path,
        'stats',
        tensors,
        dict(
            group_of=dict(group_of),
            count={g: s.count for g, s in stats.items()},
        ),
    )

  def load_stats(
      self,
  ) -> tuple[dict[str, stats_lib.LayerStats], dict[str, str]]:
    """The stored statistics and group_of.

    Raises:
      FileNotFoundError / CorruptFileError: if none are finished.
    """
    found = self._load(self.stats_path, 'stats', strict=True)
    if found is None:
      raise FileNotFoundError(f'{self.stats_path} does not exist.')
    tensors, meta = self._verified.pop(self.stats_path)
    stats = {
        g: stats_lib.LayerStats(
            r=tensors[f'{g}/r'],
            gram=tensors.get(f'{g}/gram'),
            abs_sum=tensors.get(f'{g}/abs_sum'),
            count=int(count),
        )
        for g, count in meta['count'].items()
    }
    return stats, meta['group_of']

  # Solved layers.
  def _layer_path(self, name: str) -> str:
    return os.path.join(self._layers_dir, _file_name(name))

  def save_layer(self, name: str, result: Mapping[str, Any]) -> None:
    meta = {k: v for k, v in result.items() if k not in ('a', 'b')}
    self._write(
        self._layer_path(name),
        f'layer {name}',
        dict(a=result['a'], b=result['b']),
        meta,
    )

  def finished_layers(self) -> list[str]:
    """Names of the layers whose files verify (others are recomputed)."""
    names = [
        urllib.parse.unquote(f[: -len(_SUFFIX)])
        for f in os.listdir(self._layers_dir)
        if f.endswith(_SUFFIX)
    ]
    return sorted(
        n
        for n in names
        if self._load(self._layer_path(n), f'layer {n}') is not None
    )

  def load_layer(self, name: str) -> dict[str, Any]:
    """dict(meta, a=, b=) of a finished layer.

    Raises:
      FileNotFoundError / CorruptFileError: if the layer is not finished.
    """
    path = self._layer_path(name)
    if self._load(path, f'layer {name}', strict=True) is None:
      raise FileNotFoundError(f'{path} does not exist.')
    tensors, meta = self._verified.pop(path)
    return dict(meta, a=tensors['a'], b=tensors['b'])
