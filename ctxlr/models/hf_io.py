"""Hugging-Face-style checkpoint directories: `config.json` + `*.safetensors`.

The layout is the one `transformers` writes for `LlamaForCausalLM`: tensor
names `model.layers.{i}.self_attn.q_proj.weight` etc., linear weights stored
`(d_out, d_in)` (the transpose of our kernels), q/k rows in the half-split
RoPE order. A directory exported by `save_hf_dir` loads back with identical
logits, and a user's own (unsharded or sharded) Llama checkpoint loads with
`load_hf_dir`. `from_hf_tensors` is also how the GGUF loader builds a model.
"""
import glob
import json
import os
from typing import Any, Iterator

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers

from ctxlr.models import llama

_SAFETENSORS = 'model.safetensors'
# Buffers some exporters write that carry no weights.
_IGNORED = ('rotary_emb.inv_freq',)


def _tensor_paths(
    config: llama.LlamaConfig) -> Iterator[tuple[str, tuple[Any, ...], bool]]:
  """(Hugging Face name, attribute path in `Llama`, transposed?) per tensor."""
  yield 'model.embed_tokens.weight', ('embed_tokens', 'embedding'), False
  for i in range(config.num_layers):
    pre = f'model.layers.{i}.'
    yield pre + 'input_layernorm.weight', ('layers', i, 'attn_norm',
                                           'scale'), False
    yield pre + 'post_attention_layernorm.weight', ('layers', i, 'mlp_norm',
                                                    'scale'), False
    for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
      yield f'{pre}self_attn.{name}.weight', ('layers', i, 'attn', name,
                                               'kernel'), True
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      yield f'{pre}mlp.{name}.weight', ('layers', i, 'mlp', name,
                                         'kernel'), True
  yield 'model.norm.weight', ('norm', 'scale'), False
  if not config.tie_embeddings:
    yield 'lm_head.weight', ('lm_head', 'kernel'), True


def _variable(model: llama.Llama, path: tuple[Any, ...]):
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def from_hf_tensors(config: llama.LlamaConfig, tensors: dict[str, Any], *,
                    param_dtype: Any = jnp.float32,
                    source: str = 'tensors') -> llama.Llama:
  """Builds a `Llama` from Hugging-Face-named arrays.

  Args:
    config: the model's sizes.
    tensors: name -> array in Hugging Face layout (linear weights
      `(d_out, d_in)`), any float dtype. Extra names (e.g. a `lm_head.weight`
      equal to the embedding of a tied model, rotary caches) are an error
      unless listed in `_IGNORED`.
    param_dtype: storage dtype of the parameters (float32 or bfloat16).
    source: where the tensors came from, for error messages.

  Returns:
    The model, every parameter filled.

  Raises:
    ValueError: a tensor missing, of the wrong shape, not floating point,
      non-finite, or not used by the model.
  """
  model = llama.abstract_llama(config, param_dtype=param_dtype)
  unused = {k for k in tensors if not k.endswith(_IGNORED)}
  for name, path, transposed in _tensor_paths(config):
    if name not in tensors:
      raise ValueError(f'{source}: tensor {name!r} is missing.')
    unused.discard(name)
    array = np.asarray(tensors[name])
    if transposed:
      array = array.T
    var = _variable(model, path)
    want = tuple(var.get_value().shape)
    if array.shape != want:
      stored = array.T.shape if transposed else array.shape
      needed = want[::-1] if transposed else want
      raise ValueError(f'{source}: tensor {name!r} has shape {stored}; the '
                       f'config needs {needed}.')
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(f'{source}: tensor {name!r} has dtype {array.dtype}; '
                       'expected floating point.')
    if not np.isfinite(array).all():
      raise ValueError(f'{source}: tensor {name!r} contains NaN or Inf.')
    var.set_value(jnp.asarray(array, dtype=param_dtype))
  if unused:
    raise ValueError(f'{source}: tensors not used by a Llama model with this '
                     f'config: {sorted(unused)[:5]} ({len(unused)} in all).')
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if isinstance(var.get_value(), jax.ShapeDtypeStruct):  # a mapping bug
      raise AssertionError(f'parameter {path} was not loaded.')
  return model



def to_hf_tensors(model: llama.Llama) -> dict[str, np.ndarray]:
  """The model's parameters as Hugging-Face-named NumPy arrays (same dtype)."""
  out = {}
  for name, path, transposed in _tensor_paths(model.config):
    array = np.asarray(_variable(model, path).get_value())
    out[name] = np.ascontiguousarray(array.T if transposed else array)
  return out


def config_to_hf(config: llama.LlamaConfig, dtype: Any) -> dict[str, Any]:
  """`transformers`' LlamaConfig fields for `config`."""
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': config.vocab_size,
      'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size,
      'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads,
      'num_key_value_heads': config.num_kv_heads,
      'head_dim': config.head_dim,
      'rope_theta': config.rope_theta,
      'rms_norm_eps': config.rms_eps,
      'tie_word_embeddings': config.tie_embeddings,
      'max_position_embeddings': config.max_position,
      'hidden_act': 'silu',
      'attention_bias': False,
      'mlp_bias': False,
      'rope_scaling': None,
      'torch_dtype': jnp.dtype(dtype).name,
  }


def config_from_hf(hf: dict[str, Any], source: str) -> llama.LlamaConfig:
  """Our `LlamaConfig` from a Hugging Face `config.json` dict.

  Raises:
    ValueError: not a Llama config, or a feature this model does not
      implement (rope scaling, biases, an activation other than SiLU).
  """
  if hf.get('model_type') != 'llama':
    raise ValueError(f'{source}: model_type is {hf.get("model_type")!r}; only '
                     "'llama' is supported.")
  unsupported = {
      'rope_scaling': hf.get('rope_scaling') is not None,
      'attention_bias': bool(hf.get('attention_bias', False)),
      'mlp_bias': bool(hf.get('mlp_bias', False)),
      'hidden_act': hf.get('hidden_act', 'silu') != 'silu',
  }
  for key, bad in unsupported.items():
    if bad:
      raise ValueError(f'{source}: {key}={hf.get(key)!r} is not supported.')
  try:
    heads = hf['num_attention_heads']
    return llama.LlamaConfig(
        vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'],
        num_layers=hf['num_hidden_layers'], num_heads=heads,
        num_kv_heads=hf.get('num_key_value_heads', heads),
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
        rope_theta=float(hf.get('rope_theta', 10000.0)),
        rms_eps=float(hf.get('rms_norm_eps', 1e-6)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        max_position=hf.get('max_position_embeddings', 2048))
  except KeyError as e:
    raise ValueError(f'{source}: config.json lacks {e.args[0]!r}.') from None


def save_hf_dir(model: llama.Llama, path: str,
                tokenizer: tokenizers.Tokenizer | None = None) -> None:
  """Writes `config.json`, `model.safetensors` (and `tokenizer.json`).

  Tensors keep the model's storage dtype (float32 or bfloat16).

  Args:
    model: the model to export.
    path: directory; created if needed, existing files overwritten.
    tokenizer: also written as `tokenizer.json` when given.
  """
  os.makedirs(path, exist_ok=True)
  tensors = to_hf_tensors(model)
  tmp = os.path.join(path, _SAFETENSORS + '.tmp')
  safetensors.numpy.save_file(tensors, tmp, metadata={'format': 'pt'})
  os.replace(tmp, os.path.join(path, _SAFETENSORS))
  hf = config_to_hf(model.config, model.param_dtype)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None:
    tokenizer.save(os.path.join(path, 'tokenizer.json'))


def load_hf_dir(
    path: str, *, param_dtype: Any = jnp.float32
) -> tuple[llama.Llama, tokenizers.Tokenizer | None]:
  """Loads a local Hugging-Face-style Llama directory.

  Args:
    path: directory with `config.json` and one or more `*.safetensors`
      (sharded checkpoints: all shards in the directory are read).
    param_dtype: storage dtype of the parameters.

  Returns:
    (model, tokenizer): the tokenizer from `tokenizer.json`, or None if the
    directory has none.

  Raises:
    FileNotFoundError: no such directory, or no config.json / safetensors.
    ValueError: unsupported config, or tensors that do not fit it.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'Model directory {path!r} does not exist.')
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{path!r} has no config.json.')
  files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not files:
    raise FileNotFoundError(f'{path!r} has no *.safetensors file.')
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{config_path}: not valid JSON ({e}).') from None
  config = config_from_hf(hf, config_path)
  tensors = {}
  for file in files:
    try:
      with safetensors.safe_open(file, framework='np') as f:
        for key in f.keys():
          tensors[key] = f.get_tensor(key)
    except Exception as e:  # pylint: disable=broad-except  (any parse error)
      raise ValueError(f'{file}: not a readable safetensors file ({e}).') from e
  if config.tie_embeddings and 'lm_head.weight' in tensors:
    if not np.array_equal(tensors['lm_head.weight'],
                          tensors['model.embed_tokens.weight']):
      raise ValueError(f'{path}: tie_word_embeddings is true but '
                       'lm_head.weight differs from model.embed_tokens.weight.')
    del tensors['lm_head.weight']
  model = from_hf_tensors(config, tensors, param_dtype=param_dtype,
                          source=path)
  tok_path = os.path.join(path, 'tokenizer.json')
  tokenizer = (tokenizers.Tokenizer.from_file(tok_path)
               if os.path.isfile(tok_path) else None)
  return model, tokenizer
