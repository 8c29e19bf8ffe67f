"""Saving and loading compressed models, verified and crash-safe.

Two formats, both loading to identical logits:

* orbax-checkpoint: the whole `nnx.state` of the compressed model, in a
  fresh `save-<n>/state` folder of the checkpoint directory, committed by
  `checkpoint.json`: the surgery spec (which layer has which rank), the name
  of the save folder and the SHA-256 and size of every file in it. The record
  is replaced atomically, only once the new state is complete, and the old
  save folder is deleted only after that: a save killed at any point leaves
  the previous checkpoint loadable, and the state and the spec always come
  from the same save. `load` verifies every file before restoring, and names
  what is missing or corrupt.
* safetensors: only the factors (`<layer>/a`, `<layer>/b`, `<layer>/bias`),
  with the surgery spec as metadata (`ctxlr_spec`) and a checksum over the
  whole file (`store.write_verified`), applied to a dense model you load
  yourself (e.g. the original GGUF): small, and readable without JAX.
"""

import hashlib
import json
import os
import shutil
from typing import Any, Callable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ctxlr import results
from ctxlr import store
from ctxlr import surgery


def surgery_spec(model: nnx.Module) -> dict[str, dict[str, Any]]:
  """{layer: dict(rank, d_in, d_out, bias)} for every FactoredLinear."""
  return {
      surgery.path_name(p): dict(
          rank=m.rank,
          d_in=m.in_features,
          d_out=m.out_features,
          bias=m.bias is not None,
      )
      for p, m in nnx.iter_modules(model)
      if isinstance(m, surgery.FactoredLinear)
  }


def apply_spec(
    model: nnx.Module, spec: Mapping[str, Mapping[str, Any]]
) -> nnx.Module:
  """Replaces each spec'd layer of a dense model by zero factors, in place.

  The factored modules are `surgery.factored_like` the dense layers, so they
  keep each layer's contraction, stacking and compute settings.
  """
  for name, s in spec.items():
    layer = surgery.get_module(model, name)
    try:
      view = surgery.matrix_view(layer)
    except ValueError:
      view = None
    if (
        view is None
        or (view.d_in, view.d_out) != (s['d_in'], s['d_out'])
        or ((layer.bias is not None) != s['bias'])
    ):
      raise ValueError(
          f'{name}: the model has {type(layer).__name__} '
          f'where the checkpoint expects a ({s["d_in"]}, '
          f'{s["d_out"]}) dense layer'
          f'{" with" if s["bias"] else " without"} bias: '
          'another model?'
      )
    surgery.replace_module(model, name, surgery.factored_like(layer, s['rank']))
  return model


FORMAT = 'ctxlr-checkpoint/1'
RECORD = 'checkpoint.json'  # the commit: spec, save folder, checksums
_SAVE_PREFIX = 'save-'
FACTORS_NAME = 'ctxlr factors'  # what an export_factors file holds


def _hash_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _file_table(folder: str) -> dict[str, dict[str, Any]]:
  """{relative path: dict(sha256, size)} of every file under `folder`."""
  table = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      table[os.path.relpath(path, folder)] = dict(
          sha256=_hash_file(path), size=os.path.getsize(path)
      )
  return dict(sorted(table.items()))


def _read_record(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, RECORD)
  if not os.path.isfile(path):
    raise ValueError(
        f'{directory} holds no finished checkpoint: {RECORD} is missing '
        '(nothing was saved there, the first save was interrupted before it '
        'completed, or it was written by an older ctxlr).'
    )
  try:
    record = results.read_json(path)
  except ValueError as e:
    raise ValueError(f'Checkpoint {directory} is damaged: {e}') from e
  if not isinstance(record, dict) or record.get('format') != FORMAT:
    found = record.get('format') if isinstance(record, dict) else None
    raise ValueError(
        f'{path} is not a checkpoint record of this version '
        f'(format {found!r}, expected {FORMAT!r}).'
    )
  return record


def _save_folders(directory: str) -> list[str]:
  return [
      e
      for e in os.listdir(directory)
      if e.startswith(_SAVE_PREFIX) and e[len(_SAVE_PREFIX) :].isdigit()
  ]


def _remove_other_saves(directory: str, keep: str | None) -> None:
  for entry in _save_folders(directory):
    if entry != keep:
      shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def verify(directory: str) -> dict[str, Any]:
  """Checks every file of the checkpoint in `directory` against its record.

  Returns:
    The record (format, save, spec, base, files).

  Raises:
    ValueError: naming the checkpoint and each missing, truncated or
      corrupt file (or a missing or damaged record).
  """
  directory = os.path.abspath(directory)
  record = _read_record(directory)
  folder = os.path.join(directory, record['save'])
  bad = []
  for rel, info in record['files'].items():
    path = os.path.join(folder, rel)
    if not os.path.isfile(path):
      bad.append(f'{rel} is missing')
    elif os.path.getsize(path) != info['size']:
      bad.append(
          f'{rel} has {os.path.getsize(path)} bytes, expected '
          f'{info["size"]} (truncated or altered)'
      )
    elif _hash_file(path) != info['sha256']:
      bad.append(f'{rel} is corrupt (SHA-256 mismatch)')
  if bad:
    raise ValueError(
        f'Checkpoint {directory} is damaged: in {record["save"]}/, '
        + '; '.join(bad[:5])
        + (f'; and {len(bad) - 5} more' if len(bad) > 5 else '')
        + '. It cannot be loaded.'
    )
  return record


def save(
    model: nnx.Module, directory: str, base: Mapping[str, Any] | None = None
) -> None:
  """Saves a compressed model with orbax (state) and its surgery spec.

  Saving over an existing checkpoint keeps it until the new one is complete
  (both exist on disk for that moment); a save killed at any point leaves
  the last completed checkpoint loadable.

  Args:
    model: a model after `compress` (FactoredLinear layers inside).
    directory: the checkpoint directory (absolute or relative): new, empty,
      or a checkpoint to replace. Entries other than `checkpoint.json` and
      `save-<n>/` are left alone.
    base: JSON-able description of the dense model (e.g. its path), stored
      for the reader's benefit.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  current = None
  if os.path.isfile(os.path.join(directory, RECORD)):
    try:
      current = _read_record(directory)['save']
    except ValueError:
      current = None  # a damaged record commits nothing
  number = 1 + max(
      [
          int(e[len(_SAVE_PREFIX) :])  # never reused
          for e in _save_folders(directory)
      ],
      default=0,
  )
  _remove_other_saves(directory, keep=current)  # killed saves' leftovers
  name = f'{_SAVE_PREFIX}{number:06d}'
  folder = os.path.join(directory, name)
  spec = surgery_spec(model)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(folder, 'state'), nnx.state(model))
    checkpointer.wait_until_finished()
  results.write_json(
      os.path.join(directory, RECORD),
      dict(
          format=FORMAT,
          save=name,
          spec=spec,
          base=dict(base or {}),
          files=_file_table(folder),
      ),
  )  # the commit
  _remove_other_saves(directory, keep=name)


def load(directory: str, make_dense: Callable[[], nnx.Module]) -> nnx.Module:
  """Rebuilds a model saved by `save`, after verifying every file.

  Args:
    directory: what `save` wrote.
    make_dense: builds the dense architecture (its weights are not used:
      it is called under `nnx.eval_shape`), e.g.
      `lambda: ctxlr.models.load_llama()[0]`.

  Returns:
    The compressed model, with the saved state.

  Raises:
    ValueError: if the checkpoint is missing, damaged (naming each bad file)
      or does not fit the model `make_dense` builds.
  """
  directory = os.path.abspath(directory)
  record = verify(directory)
  abstract = nnx.eval_shape(lambda: apply_spec(make_dense(), record['spec']))
  graphdef, abstract_state = nnx.split(abstract)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      state = checkpointer.restore(
          os.path.join(directory, record['save'], 'state'), abstract_state
      )
  except Exception as e:  # pylint: disable=broad-except  (files verified)
    raise ValueError(
        f'Checkpoint {directory} (verified) does not fit the model built by '
        f'make_dense with its surgery spec: {type(e).__name__}: '
        f'{str(e)[:500]}'
    ) from e
  return nnx.merge(graphdef, state)


def export_factors(
    model: nnx.Module, path: str, metadata: Mapping[str, Any] | None = None
) -> None:
  """Writes every FactoredLinear's a, b (and bias) to one safetensors file.

  Atomic (a `.tmp` file renamed into place) and self-verifying: the
  metadata holds the spec (`ctxlr_spec`), `metadata` (`ctxlr_metadata`) and a
  SHA-256 over both and every tensor (`store.write_verified`).
  """
  tensors = {}
  for name in surgery_spec(model):
    layer = surgery.get_module(model, name)
    tensors[f'{name}/a'] = np.asarray(jax.device_get(layer.a[...]))
    tensors[f'{name}/b'] = np.asarray(jax.device_get(layer.b[...]))
    if layer.bias is not None:
      tensors[f'{name}/bias'] = np.asarray(jax.device_get(layer.bias[...]))
  meta = {
      'ctxlr_spec': json.dumps(surgery_spec(model)),
      'ctxlr_metadata': json.dumps(
          dict(metadata or {}), default=results.json_default
      ),
  }
  store.write_verified(path, tensors, name=FACTORS_NAME, metadata=meta)


def import_factors(model: nnx.Module, path: str) -> nnx.Module:
  """Swaps the factors of an `export_factors` file into a dense model.

  Raises:
    ValueError: if `path` is not an `export_factors` file, is damaged
      (checksum), or does not fit `model` (naming the layer or tensor).
  """
  meta = store.read_metadata(path)
  if 'ctxlr_spec' not in meta:
    raise ValueError(
        f'{path} is not a ctxlr factors export: its safetensors metadata has '
        f'no ctxlr_spec (keys {sorted(meta)}); write one with '
        'checkpoint.export_factors.'
    )
  tensors, meta = store.read_verified(path, name=FACTORS_NAME)
  spec = json.loads(meta['ctxlr_spec'])
  for name, s in spec.items():
    expected = {
        f'{name}/a': (s['d_in'], s['rank']),
        f'{name}/b': (s['rank'], s['d_out']),
    }
    if s['bias']:
      expected[f'{name}/bias'] = (s['d_out'],)
    for key, shape in expected.items():
      got = tensors[key].shape if key in tensors else None
      if got != shape:
        raise ValueError(
            f'{path}: tensor {key} has shape {got}; its spec ' f'says {shape}.'
        )
  apply_spec(model, spec)
  for name in spec:
    layer = surgery.get_module(model, name)
    layer.a[...] = jnp.asarray(tensors[f'{name}/a'])
    layer.b[...] = jnp.asarray(tensors[f'{name}/b'])
    if layer.bias is not None:
      layer.bias[...] = jnp.asarray(tensors[f'{name}/bias'])
  return model
