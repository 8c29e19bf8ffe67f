"""Hugging-Face-style checkpoint directories: `config.json` + `*.safetensors`.

The layout is the one `transformers` writes for `LlamaForCausalLM`,
`MistralForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM`: tensor names
`model.layers.{i}.self_attn.q_proj.weight` etc., linear weights stored
`(d_out, d_in)` (the transpose of our kernels), q/k rows in the half-split
RoPE order, one `model.safetensors` or shards listed in
`model.safetensors.index.json`.

`config_from_hf` reads `config.json` as `transformers` does (its per-family
defaults, the v4 `rope_theta` / `rope_scaling` fields and the v5
`rope_parameters`) and refuses, naming it, any field or value that would make
our forward pass differ from `transformers`' (an unknown field, a RoPE type or
sliding-window layout not implemented, `quantization_config`, ...). A
directory exported by `save_hf_dir` loads back with identical tensors,
config and logits. `from_hf_tensors` is also how the GGUF loader builds a
model.
"""

import collections.abc
import glob
import json
import os
import re
from typing import Any, Iterator, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers

from ctxlr.models import llama

_SAFETENSORS = 'model.safetensors'
_INDEX = 'model.safetensors.index.json'
_SHARD = re.compile(r'model-\d{5}-of-\d{5}\.safetensors')
# Buffers some exporters write that carry no weights.
_IGNORED = ('rotary_emb.inv_freq',)

ARCHITECTURES = {
    'llama': 'LlamaForCausalLM',
    'mistral': 'MistralForCausalLM',
    'qwen2': 'Qwen2ForCausalLM',
    'qwen3': 'Qwen3ForCausalLM',
}

# config.json fields with no effect on the logits of a causal LM: the
# bookkeeping of `transformers`' PretrainedConfig and the generation settings
# older versions wrote there.
_BOOKKEEPING = frozenset(
    {
        '_name_or_path',
        'architectures',
        'auto_map',
        'model_type',
        'transformers_version',
        'torch_dtype',
        'dtype',
        'use_bfloat16',
        'bos_token_id',
        'eos_token_id',
        'pad_token_id',
        'sep_token_id',
        'decoder_start_token_id',
        'use_cache',
        'initializer_range',
        'attention_dropout',
        'output_attentions',
        'output_hidden_states',
        'return_dict',
        'chunk_size_feed_forward',
        'is_encoder_decoder',
        'is_decoder',
        'add_cross_attention',
        'cross_attention_hidden_size',
        'tie_encoder_decoder',
        'id2label',
        'label2id',
        'problem_type',
        'tokenizer_class',
        'prefix',
        'task_specific_params',
        'finetuning_task',
        'torchscript',
        'pruned_heads',
        'tf_legacy_loss',
        'max_length',
        'min_length',
        'do_sample',
        'early_stopping',
        'num_beams',
        'num_beam_groups',
        'diversity_penalty',
        'temperature',
        'top_k',
        'top_p',
        'typical_p',
        'repetition_penalty',
        'length_penalty',
        'no_repeat_ngram_size',
        'encoder_no_repeat_ngram_size',
        'bad_words_ids',
        'num_return_sequences',
        'output_scores',
        'return_dict_in_generate',
        'forced_bos_token_id',
        'forced_eos_token_id',
        'remove_invalid_values',
        'exponential_decay_length_penalty',
        'suppress_tokens',
        'begin_suppress_tokens',
    }
)
# Fields every family reads.
_COMMON = frozenset(
    {
        'vocab_size',
        'hidden_size',
        'intermediate_size',
        'num_hidden_layers',
        'num_attention_heads',
        'num_key_value_heads',
        'hidden_act',
        'max_position_embeddings',
        'rms_norm_eps',
        'tie_word_embeddings',
        'rope_theta',
        'rope_scaling',
        'rope_parameters',
        'head_dim',
    }
)
_FAMILY_FIELDS = {
    # is_llama_config, rope_interleaved: nanotron's, in SmolLM2's config.json
    # (transformers ignores both; rope_interleaved must be false).
    'llama': frozenset(
        {
            'attention_bias',
            'mlp_bias',
            'pretraining_tp',
            'is_llama_config',
            'rope_interleaved',
        }
    ),
    'mistral': frozenset({'sliding_window'}),
    'qwen2': frozenset(
        {
            'use_sliding_window',
            'sliding_window',
            'max_window_layers',
            'layer_types',
        }
    ),
    'qwen3': frozenset(
        {
            'attention_bias',
            'use_sliding_window',
            'sliding_window',
            'max_window_layers',
            'layer_types',
        }
    ),
}
# transformers' class defaults where they differ between the families.
_DEFAULTS = {
    'llama': dict(max_position_embeddings=2048, num_key_value_heads=None),
    'mistral': dict(max_position_embeddings=131072, num_key_value_heads=8),
    'qwen2': dict(max_position_embeddings=32768, num_key_value_heads=32),
    'qwen3': dict(max_position_embeddings=32768, num_key_value_heads=32),
}
_ROPE_KEYS = {
    'default': frozenset(
        {'rope_type', 'type', 'rope_theta', 'partial_rotary_factor'}
    ),
    'linear': frozenset(
        {'rope_type', 'type', 'rope_theta', 'factor', 'partial_rotary_factor'}
    ),
    'llama3': frozenset(
        {
            'rope_type',
            'type',
            'rope_theta',
            'factor',
            'low_freq_factor',
            'high_freq_factor',
            'original_max_position_embeddings',
            'partial_rotary_factor',
        }
    ),
}


def _tensor_paths(
    config: llama.LlamaConfig,
) -> Iterator[tuple[str, tuple[Any, ...], bool]]:
  """(Hugging Face name, attribute path in `Llama`, transposed?) per tensor."""
  yield 'model.embed_tokens.weight', ('embed_tokens', 'embedding'), False
  for i in range(config.num_layers):
    pre = f'model.layers.{i}.'
    yield pre + 'input_layernorm.weight', (
        'layers',
        i,
        'attn_norm',
        'scale',
    ), False
    yield pre + 'post_attention_layernorm.weight', (
        'layers',
        i,
        'mlp_norm',
        'scale',
    ), False
    for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
      path = ('layers', i, 'attn', name)
      yield f'{pre}self_attn.{name}.weight', path + ('kernel',), True
      if config.o_bias if name == 'o_proj' else config.qkv_bias:
        yield f'{pre}self_attn.{name}.bias', path + ('bias',), False
    if config.qk_norm:
      for name in ('q_norm', 'k_norm'):
        yield f'{pre}self_attn.{name}.weight', (
            'layers',
            i,
            'attn',
            name,
            'scale',
        ), False
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      path = ('layers', i, 'mlp', name)
      yield f'{pre}mlp.{name}.weight', path + ('kernel',), True
      if config.mlp_bias:
        yield f'{pre}mlp.{name}.bias', path + ('bias',), False
  yield 'model.norm.weight', ('norm', 'scale'), False
  if not config.tie_embeddings:
    yield 'lm_head.weight', ('lm_head', 'kernel'), True


def _variable(model: llama.Llama, path: tuple[Any, ...]):
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def from_hf_tensors(
    config: llama.LlamaConfig,
    tensors: Mapping[str, Any],
    *,
    param_dtype: Any = jnp.float32,
    source: str = 'tensors',
) -> llama.Llama:
  """Builds a `Llama` from Hugging-Face-named arrays.

  Args:
    config: the model's sizes.
    tensors: name -> array in Hugging Face layout (linear weights
      `(d_out, d_in)`), any float dtype; read once each, in model order (a
      lazy mapping keeps one tensor in memory at a time). Extra names (e.g. a
      `lm_head.weight` equal to the embedding of a tied model, rotary caches)
      are an error unless listed in `_IGNORED`.
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
      raise ValueError(
          f'{source}: tensor {name!r} has shape {stored}; the '
          f'config needs {needed}.'
      )
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(
          f'{source}: tensor {name!r} has dtype {array.dtype}; '
          'expected floating point.'
      )
    if not np.isfinite(array).all():
      raise ValueError(f'{source}: tensor {name!r} contains NaN or Inf.')
    var.set_value(jnp.asarray(array, dtype=param_dtype))
  if unused:
    raise ValueError(
        f'{source}: tensors not used by a Llama model with this '
        f'config (model_type {config.model_type!r}): '
        f'{sorted(unused)[:5]} ({len(unused)} in all).'
    )
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
  """`config.json` fields for `config`, in `transformers`' own family.

  RoPE is written in the v4 form (`rope_theta`, `rope_scaling`), which
  `transformers` v4 (>= 4.43 for 'llama3') and v5 both read.

  Raises:
    ValueError: a feature the family's `transformers` class cannot express
      (e.g. biases on a Mistral model).
  """
  mt = config.model_type
  expressible = {
      'llama': config.qkv_bias == config.o_bias
      and not config.qk_norm
      and config.sliding_window is None,
      'mistral': not (
          config.qkv_bias or config.o_bias or config.mlp_bias or config.qk_norm
      ),
      'qwen2': config.qkv_bias
      and not (
          config.o_bias
          or config.mlp_bias
          or config.qk_norm
          or config.sliding_window
      ),
      'qwen3': config.qkv_bias == config.o_bias
      and config.qk_norm
      and not config.mlp_bias
      and config.sliding_window is None,
  }[mt]
  if not expressible:
    raise ValueError(
        f'config has no {ARCHITECTURES[mt]} equivalent: ' f'{config}.'
    )
  hf = {
      'architectures': [ARCHITECTURES[mt]],
      'model_type': mt,
      'vocab_size': config.vocab_size,
      'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size,
      'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads,
      'num_key_value_heads': config.num_kv_heads,
      'head_dim': config.head_dim,
      'hidden_act': 'silu',
      'rope_theta': config.rope_theta,
      'rope_scaling': _rope_to_hf(config.rope_scaling),
      'rms_norm_eps': config.rms_eps,
      'tie_word_embeddings': config.tie_embeddings,
      'max_position_embeddings': config.max_position,
      'torch_dtype': jnp.dtype(dtype).name,
  }
  if mt == 'llama':
    hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
  elif mt == 'mistral':
    hf.update(sliding_window=config.sliding_window)
  else:
    hf.update(
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=config.num_layers,
    )
    if mt == 'qwen3':
      hf.update(attention_bias=config.qkv_bias)
  return hf


def _rope_to_hf(scaling: llama.RopeScaling | None) -> dict[str, Any] | None:
  if scaling is None:
    return None
  if scaling.rope_type == 'linear':
    return dict(rope_type='linear', factor=scaling.factor)
  return dict(
      rope_type='llama3',
      factor=scaling.factor,
      low_freq_factor=scaling.low_freq_factor,
      high_freq_factor=scaling.high_freq_factor,
      original_max_position_embeddings=scaling.original_max_position,
  )


def _rope_from_hf(
    hf: dict[str, Any], max_position: int, source: str
) -> tuple[float, llama.RopeScaling | None]:
  """(rope_theta, scaling) from v4 `rope_theta`/`rope_scaling` or v5
  `rope_parameters`, as `transformers`' `standardize_rope_params` reads them.
  """
  key = 'rope_scaling' if hf.get('rope_scaling') else 'rope_parameters'
  params = hf.get(key) or {}
  if not isinstance(params, dict):
    raise ValueError(f'{source}: {key}={params!r} is not an object.')
  theta = params.get('rope_theta', hf.get('rope_theta'))
  theta = 10000.0 if theta is None else float(theta)
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in _ROPE_KEYS:
    raise ValueError(
        f'{source}: {key} rope_type={rope_type!r} is not '
        f'supported (supported: {sorted(_ROPE_KEYS)}).'
    )
  extra = sorted(set(params) - _ROPE_KEYS[rope_type])
  if extra:
    raise ValueError(
        f'{source}: {key} field {extra[0]!r} is not supported '
        f'for rope_type {rope_type!r}.'
    )
  if params.get('partial_rotary_factor', 1.0) != 1.0:
    raise ValueError(
        f'{source}: {key} partial_rotary_factor='
        f'{params["partial_rotary_factor"]!r} is not supported '
        '(only full-width RoPE).'
    )
  if rope_type == 'default':
    return theta, None
  if 'factor' not in params:
    raise ValueError(
        f'{source}: {key} of rope_type {rope_type!r} lacks ' "'factor'."
    )
  if rope_type == 'linear':
    return theta, llama.RopeScaling('linear', float(params['factor']))
  for name in ('low_freq_factor', 'high_freq_factor'):
    if name not in params:
      raise ValueError(f'{source}: {key} of rope_type llama3 lacks {name!r}.')
  return theta, llama.RopeScaling(
      'llama3',
      float(params['factor']),
      low_freq_factor=float(params['low_freq_factor']),
      high_freq_factor=float(params['high_freq_factor']),
      original_max_position=int(
          params.get('original_max_position_embeddings', max_position)
      ),
  )


def _flag(hf: dict[str, Any], key: str, default: bool, source: str) -> bool:
  value = hf.get(key, default)
  if not isinstance(value, bool):
    raise ValueError(f'{source}: {key}={value!r}; expected true or false.')
  return value


def _qwen_window(hf: dict[str, Any], layers: int, source: str) -> None:
  """Refuses sliding-window layers in a Qwen config (not implemented)."""
  use = _flag(hf, 'use_sliding_window', False, source)
  window = hf.get('sliding_window', 4096) if use else None
  types = hf.get('layer_types')
  if types is None:
    first = hf.get('max_window_layers', 28)
    types = [
        'sliding_attention'
        if window is not None and i >= first
        else 'full_attention'
        for i in range(layers)
    ]
  if not isinstance(types, list) or len(types) != layers:
    raise ValueError(
        f'{source}: layer_types={types!r}; expected a list of '
        f'{layers} entries.'
    )
  sliding = [i for i, t in enumerate(types) if t != 'full_attention']
  if sliding:
    raise ValueError(
        f'{source}: layers {sliding[:8]} have attention '
        f'{types[sliding[0]]!r} (use_sliding_window={use}); only full '
        'attention is supported for Qwen models.'
    )


def config_from_hf(hf: dict[str, Any], source: str) -> llama.LlamaConfig:
  """Our `LlamaConfig` from a Hugging Face `config.json` dict.

  Args:
    hf: the parsed `config.json`.
    source: its path, for error messages.

  Raises:
    ValueError: a `model_type` other than llama / mistral / qwen2 / qwen3, a
      field this loader does not know for that family, or a value it does not
      implement (an activation other than SiLU, a RoPE type other than
      default / linear / llama3, sliding-window Qwen layers, ...), each named.
  """
  mt = hf.get('model_type')
  if mt not in ARCHITECTURES:
    raise ValueError(
        f'{source}: model_type is {mt!r}; supported: '
        f'{sorted(ARCHITECTURES)}.'
    )
  known = _BOOKKEEPING | _COMMON | _FAMILY_FIELDS[mt]
  unknown = sorted(set(hf) - known)
  if unknown:
    raise ValueError(
        f'{source}: config field {unknown[0]!r} (= {hf[unknown[0]]!r}) is not '
        f'supported for model_type {mt!r}'
        + (f' (also {unknown[1:]})' if len(unknown) > 1 else '')
        + '; if transformers ignores it for this family, remove it from '
        'config.json.'
    )
  if hf.get('rope_interleaved', False) is not False:
    raise ValueError(
        f'{source}: rope_interleaved={hf["rope_interleaved"]!r} '
        'is not supported (Hugging Face weights use half-split '
        'RoPE).'
    )
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(
        f'{source}: hidden_act={hf["hidden_act"]!r} is not '
        "supported (only 'silu')."
    )
  defaults = _DEFAULTS[mt]
  try:
    heads, hidden = hf['num_attention_heads'], hf['hidden_size']
    layers = hf['num_hidden_layers']
    vocab, ffn = hf['vocab_size'], hf['intermediate_size']
  except KeyError as e:
    raise ValueError(f'{source}: config.json lacks {e.args[0]!r}.') from None
  if not all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0
      for v in (heads, hidden, layers, vocab, ffn)
  ):
    raise ValueError(
        f'{source}: sizes must be positive ints; got '
        f'num_attention_heads={heads!r}, hidden_size={hidden!r}, '
        f'num_hidden_layers={layers!r}, vocab_size={vocab!r}, '
        f'intermediate_size={ffn!r}.'
    )
  if mt == 'qwen3':
    head_dim = hf['head_dim'] if 'head_dim' in hf else 128
  else:
    head_dim = hf.get('head_dim') or hidden // heads
  kv_heads = hf.get('num_key_value_heads', defaults['num_key_value_heads'])
  max_position = hf.get(
      'max_position_embeddings', defaults['max_position_embeddings']
  )
  theta, scaling = _rope_from_hf(hf, max_position, source)
  flags = dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)
  window = None
  if mt == 'llama':
    bias = _flag(hf, 'attention_bias', False, source)
    flags.update(
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=_flag(hf, 'mlp_bias', False, source),
    )
  elif mt == 'mistral':
    window = hf.get('sliding_window', 4096)
  elif mt == 'qwen2':
    _qwen_window(hf, layers, source)
    flags.update(qkv_bias=True)
  else:
    _qwen_window(hf, layers, source)
    bias = _flag(hf, 'attention_bias', False, source)
    flags.update(qkv_bias=bias, o_bias=bias, qk_norm=True)
  try:
    return llama.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        head_dim=head_dim,
        rope_theta=theta,
        rms_eps=float(hf.get('rms_norm_eps', 1e-6)),
        tie_embeddings=_flag(hf, 'tie_word_embeddings', False, source),
        max_position=max_position,
        model_type=mt,
        rope_scaling=scaling,
        sliding_window=window,
        **flags,
    )
  except ValueError as e:
    raise ValueError(f'{source}: {e}') from None


class _SafetensorsDir(collections.abc.Mapping):
  """The tensors of a checkpoint directory, read lazily, one at a time.

  With `model.safetensors.index.json`, exactly the files and tensors its
  `weight_map` names (as `transformers` reads them); otherwise every
  `*.safetensors` in the directory, a name in two files being an error.
  """

  def __init__(self, path: str):
    self._file_of: dict[str, str] = {}
    index_path = os.path.join(path, _INDEX)
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f'{index_path}: not a safetensors index with a '
            f'weight_map ({e!r}).'
        ) from None
      files = sorted(set(weight_map.values()))
      for file in files:
        if not os.path.isfile(os.path.join(path, file)):
          raise FileNotFoundError(
              f'{index_path} lists {file!r}, which is ' f'not in {path!r}.'
          )
      keys = {f: set(self._keys(os.path.join(path, f))) for f in files}
      for name, file in weight_map.items():
        if name not in keys[file]:
          raise ValueError(
              f'{index_path}: tensor {name!r} is not in ' f'{file}.'
          )
        self._file_of[name] = os.path.join(path, file)
    else:
      files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
      if not files:
        raise FileNotFoundError(f'{path!r} has no *.safetensors file.')
      for file in files:
        for name in self._keys(file):
          if name in self._file_of:
            raise ValueError(
                f'{path}: tensor {name!r} is in both '
                f'{os.path.basename(self._file_of[name])} and '
                f'{os.path.basename(file)} (and no {_INDEX}).'
            )
          self._file_of[name] = file

  @staticmethod
  def _keys(file: str) -> list[str]:
    try:
      with safetensors.safe_open(file, framework='np') as f:
        return list(f.keys())
    except Exception as e:  # pylint: disable=broad-except  (any parse error)
      raise ValueError(f'{file}: not a readable safetensors file ({e}).') from e

  def __getitem__(self, name: str) -> np.ndarray:
    file = self._file_of[name]
    try:
      with safetensors.safe_open(file, framework='np') as f:
        return f.get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except  (any parse error)
      raise ValueError(f'{file}: cannot read tensor {name!r} ({e}).') from e

  def __iter__(self) -> Iterator[str]:
    return iter(self._file_of)

  def __len__(self) -> int:
    return len(self._file_of)


class _Without(collections.abc.Mapping):
  """A mapping minus some keys (a tied model's redundant `lm_head.weight`)."""

  def __init__(self, base: Mapping[str, Any], drop: set[str]):
    self._base, self._drop = base, drop

  def __getitem__(self, name):
    if name in self._drop:
      raise KeyError(name)
    return self._base[name]

  def __iter__(self):
    return (k for k in self._base if k not in self._drop)

  def __len__(self):
    return sum(1 for _ in self)


def _remove_weights(path: str) -> None:
  """Deletes the weight files `save_hf_dir` writes (stale ones included)."""
  for name in os.listdir(path):
    if name in (_SAFETENSORS, _INDEX) or _SHARD.fullmatch(name):
      os.remove(os.path.join(path, name))


def save_hf_dir(
    model: llama.Llama,
    path: str,
    tokenizer: tokenizers.Tokenizer | None = None,
    *,
    max_shard_bytes: int | None = None,
) -> None:
  """Writes `config.json`, the weights (and `tokenizer.json`).

  Tensors keep the model's storage dtype (float32 or bfloat16). The
  directory loads back with `load_hf_dir` (same config, same tensors bit for
  bit) and with `transformers`' `AutoModelForCausalLM.from_pretrained`.

  Args:
    model: the model to export (dense: every projection an `nnx.Linear`).
    path: directory; created if needed. Existing `config.json`,
      `tokenizer.json`, `model.safetensors`, `model-*-of-*.safetensors` and
      `model.safetensors.index.json` are replaced (stale shards removed).
    tokenizer: also written as `tokenizer.json` when given.
    max_shard_bytes: None: one `model.safetensors`; else shards of at most
      this many bytes (a larger tensor gets a shard of its own) named
      `model-00001-of-0000N.safetensors`, with the index `transformers`
      writes.

  Raises:
    ValueError: a layer is not an `nnx.Linear` (a compressed model), or the
      config has no equivalent in its `transformers` family.
  """
  for name, attr_path, _ in _tensor_paths(model.config):
    parent = _variable(model, attr_path[:-1])
    if not hasattr(parent, attr_path[-1]):
      raise ValueError(
          f'{type(parent).__name__} at '
          f'{".".join(map(str, attr_path[:-1]))} has no '
          f'{attr_path[-1]!r} ({name}): only a dense model '
          '(every projection an nnx.Linear) can be exported.'
      )
  hf = config_to_hf(model.config, model.param_dtype)
  os.makedirs(path, exist_ok=True)
  tensors = to_hf_tensors(model)
  shards = [{}]
  if max_shard_bytes is not None:
    if (
        isinstance(max_shard_bytes, bool)
        or not isinstance(max_shard_bytes, int)
        or max_shard_bytes < 1
    ):
      raise ValueError(
          f'max_shard_bytes must be None or an int >= 1; got '
          f'{max_shard_bytes!r}.'
      )
    size = 0
    for name, array in tensors.items():
      if shards[-1] and size + array.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = array
      size += array.nbytes
  else:
    shards[0] = tensors
  names = (
      [_SAFETENSORS]
      if max_shard_bytes is None
      else [
          f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
          for i in range(len(shards))
      ]
  )
  for name, shard in zip(names, shards):
    safetensors.numpy.save_file(
        shard, os.path.join(path, name + '.tmp'), metadata={'format': 'pt'}
    )
  _remove_weights(path)
  for name in names:
    os.replace(os.path.join(path, name + '.tmp'), os.path.join(path, name))
  if max_shard_bytes is not None:
    index = dict(
        metadata=dict(total_size=sum(a.nbytes for a in tensors.values())),
        weight_map={t: n for n, s in zip(names, shards) for t in s},
    )
    with open(os.path.join(path, _INDEX), 'w') as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None:
    tokenizer.save(os.path.join(path, 'tokenizer.json'))


def read_config(path: str) -> llama.LlamaConfig:
  """The `LlamaConfig` of a checkpoint directory (reads `config.json` only).

  Raises:
    FileNotFoundError: no such directory or no config.json.
    ValueError: invalid JSON or an unsupported config (see `config_from_hf`).
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'Model directory {path!r} does not exist.')
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{path!r} has no config.json.')
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{config_path}: not valid JSON ({e}).') from None
  if not isinstance(hf, dict):
    raise ValueError(f'{config_path}: not a JSON object.')
  return config_from_hf(hf, config_path)


def load_hf_dir(
    path: str, *, param_dtype: Any = jnp.float32
) -> tuple[llama.Llama, tokenizers.Tokenizer | None]:
  """Loads a local Hugging-Face-style Llama / Mistral / Qwen2 / Qwen3 dir.

  Args:
    path: directory with `config.json` and `model.safetensors`, or shards
      with `model.safetensors.index.json` (without an index, every
      `*.safetensors` in the directory is read).
    param_dtype: storage dtype of the parameters (bf16 checkpoints load
      exactly into float32).

  Returns:
    (model, tokenizer): the tokenizer from `tokenizer.json`, or None if the
    directory has none.

  Raises:
    FileNotFoundError: no such directory, or no config.json / safetensors.
    ValueError: unsupported config, or tensors that do not fit it.
  """
  config = read_config(path)
  tensors = _SafetensorsDir(path)
  if config.tie_embeddings and 'lm_head.weight' in tensors:
    if not np.array_equal(
        tensors['lm_head.weight'], tensors['model.embed_tokens.weight']
    ):
      raise ValueError(
          f'{path}: tie_word_embeddings is true but '
          'lm_head.weight differs from model.embed_tokens.weight.'
      )
    tensors = _Without(tensors, {'lm_head.weight'})
  model = from_hf_tensors(config, tensors, param_dtype=param_dtype, source=path)
  tok_path = os.path.join(path, 'tokenizer.json')
  tokenizer = (
      tokenizers.Tokenizer.from_file(tok_path)
      if os.path.isfile(tok_path)
      else None
  )
  return model, tokenizer
