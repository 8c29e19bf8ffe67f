"""Saving and loading compressed models.

Two formats, both loading to identical logits:

* orbax-checkpoint: the whole `nnx.state` of the compressed model plus
  `surgery.json` (which layer has which rank), so loading rebuilds the factored
  structure from the dense architecture and restores the state into it.
* safetensors: only the factors (`<layer>/a`, `<layer>/b`, `<layer>/bias`),
  with the surgery spec as metadata, applied to a dense model you load
  yourself (e.g. the original GGUF): small, and readable without JAX.
"""
import json
import os
from typing import Any, Callable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy

from ctxlr import results
from ctxlr import surgery


def surgery_spec(model: nnx.Module) -> dict[str, dict[str, Any]]:
  """{layer: dict(rank, d_in, d_out, bias)} for every FactoredLinear."""
  return {surgery.path_name(p): dict(rank=m.rank, d_in=m.in_features,
                                     d_out=m.out_features,
                                     bias=m.bias is not None)
          for p, m in nnx.iter_modules(model)
          if isinstance(m, surgery.FactoredLinear)}


def apply_spec(model: nnx.Module, spec: Mapping[str, Mapping[str, Any]]
               ) -> nnx.Module:
  """Replaces each spec'd Linear of a dense model by zero factors, in place."""
  for name, s in spec.items():
    linear = surgery.get_module(model, name)
    if not isinstance(linear, nnx.Linear) or (
        linear.in_features, linear.out_features) != (s['d_in'], s['d_out']):
      raise ValueError(f'{name}: the model has {type(linear).__name__} '
                       f'where the checkpoint expects a ({s["d_in"]}, '
                       f'{s["d_out"]}) Linear: another model?')
    dtype = linear.kernel.dtype
    surgery.replace_module(model, name, surgery.FactoredLinear(
        jnp.zeros((s['d_in'], s['rank']), dtype),
        jnp.zeros((s['rank'], s['d_out']), dtype),
        jnp.zeros((s['d_out'],), dtype) if s['bias'] else None))
  return model


def save(model: nnx.Module, directory: str,
         base: Mapping[str, Any] | None = None) -> None:
  """Saves a compressed model with orbax (state) and its surgery spec.

  Args:
    model: a model after `compress` (FactoredLinear layers inside).
    directory: a new or empty directory (absolute or relative).
    base: JSON-able description of the dense model (e.g. its path), stored
      for the reader's benefit.
  """
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, 'state'), nnx.state(model),
                      force=True)
    checkpointer.wait_until_finished()
  results.write_json(os.path.join(directory, 'surgery.json'),
                     dict(spec=surgery_spec(model), base=dict(base or {})))


def load(directory: str, make_dense: Callable[[], nnx.Module]) -> nnx.Module:
  """Rebuilds a model saved by `save`.

  Args:
    directory: what `save` wrote.
    make_dense: builds the dense architecture (its weights are not used:
      it is called under `nnx.eval_shape`), e.g.
      `lambda: ctxlr.models.load_llama()[0]`.

  Returns:
    The compressed model, with the saved state.
  """
  directory = os.path.abspath(directory)
  meta = results.read_json(os.path.join(directory, 'surgery.json'))
  abstract = nnx.eval_shape(lambda: apply_spec(make_dense(), meta['spec']))
  graphdef, abstract_state = nnx.split(abstract)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(directory, 'state'),
                                 abstract_state)
  return nnx.merge(graphdef, state)


def export_factors(model: nnx.Module, path: str,
                   metadata: Mapping[str, Any] | None = None) -> None:
  """Writes every FactoredLinear's a, b (and bias) to one safetensors file."""
  tensors = {}
  for name in surgery_spec(model):
    layer = surgery.get_module(model, name)
    tensors[f'{name}/a'] = np.asarray(jax.device_get(layer.a[...]))
    tensors[f'{name}/b'] = np.asarray(jax.device_get(layer.b[...]))
    if layer.bias is not None:
      tensors[f'{name}/bias'] = np.asarray(jax.device_get(layer.bias[...]))
  meta = {'ctxlr_spec': json.dumps(surgery_spec(model)),
          'ctxlr_metadata': json.dumps(dict(metadata or {}),
                                       default=results.json_default)}
  safetensors.numpy.save_file(tensors, path, metadata=meta)


def import_factors(model: nnx.Module, path: str) -> nnx.Module:
  """Swaps the factors of an `export_factors` file into a dense model."""
  with safetensors.safe_open(path, 'np') as f:
    spec = json.loads(f.metadata()['ctxlr_spec'])
  tensors = safetensors.numpy.load_file(path)
  apply_spec(model, spec)
  for name in spec:
    layer = surgery.get_module(model, name)
    layer.a[...] = jnp.asarray(tensors[f'{name}/a'])
    layer.b[...] = jnp.asarray(tensors[f'{name}/b'])
    if layer.bias is not None:
      layer.bias[...] = jnp.asarray(tensors[f'{name}/bias'])
  return model
