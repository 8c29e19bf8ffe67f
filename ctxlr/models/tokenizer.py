"""A `tokenizers.Tokenizer` from GGUF tokenizer metadata (no hand-written BPE).

GGUF's `tokenizer.ggml.model == 'gpt2'` is a byte-level BPE: `tokens` is the
vocabulary (already in byte-level alphabet), `merges` the merge list in rank
order, `token_type` marks control tokens (3, special) and user-defined tokens
(4). `tokenizer.ggml.pre` names the pre-tokenizer; supported:

  * `smollm`: split digits individually, then byte-level (GPT-2 regex);
  * `gpt2`, `default`: byte-level with the GPT-2 regex;
  * `llama-bpe`: the Llama-3 split regex, then byte-level.

The model's text is `ByteLevel`-decoded, so `decode(encode(s)) == s`.
"""

from typing import Any

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r' ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+'
)


def _pre_tokenizer(pre: str, source: str):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == 'smollm':
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  if pre in ('gpt2', 'default'):
    return byte_level
  if pre == 'llama-bpe':
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), 'isolated'),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
  raise ValueError(
      f'{source}: tokenizer.ggml.pre={pre!r} is not supported '
      "(supported: 'smollm', 'gpt2', 'default', 'llama-bpe')."
  )


def from_gguf_metadata(
    meta: dict[str, Any], *, source: str = 'GGUF'
) -> tokenizers.Tokenizer:
  """Builds the tokenizer described by GGUF metadata.

  Args:
    meta: GGUF key/values (`gguf_io.read_metadata`), with
      `tokenizer.ggml.{model, pre, tokens, merges, token_type}`.
    source: file name for error messages.

  Returns:
    A `tokenizers.Tokenizer`; control tokens are special tokens (matched
    whole, skipped by `decode(..., skip_special_tokens=True)`). When the file
    sets `tokenizer.ggml.add_bos_token`, `encode` prepends BOS.

  Raises:
    ValueError: a tokenizer type or pre-tokenizer not supported, or
      inconsistent metadata.
  """
  kind = meta.get('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(
        f'{source}: tokenizer.ggml.model={kind!r}; only byte-'
        "level BPE ('gpt2') tokenizers are supported."
    )
  tokens = meta.get('tokenizer.ggml.tokens')
  merges = meta.get('tokenizer.ggml.merges')
  if not tokens or merges is None:
    raise ValueError(f'{source}: tokenizer.ggml.tokens / merges missing.')
  types = meta.get('tokenizer.ggml.token_type') or [1] * len(tokens)
  if len(types) != len(tokens):
    raise ValueError(
        f'{source}: {len(types)} token types for ' f'{len(tokens)} tokens.'
    )
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f'{source}: tokenizer.ggml.tokens has duplicates.')
  pairs = []
  for merge in merges:
    left, sep, right = merge.partition(' ')
    if not sep:
      raise ValueError(f'{source}: merge {merge!r} is not "left right".')
    pairs.append((left, right))
  tok = tokenizers.Tokenizer(
      models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
  )
  tok.pre_tokenizer = _pre_tokenizer(
      meta.get('tokenizer.ggml.pre', 'default'), source
  )
  tok.decoder = decoders.ByteLevel()
  post = [processors.ByteLevel(trim_offsets=False)]
  tok.add_special_tokens(
      [
          tokenizers.AddedToken(t, special=True, normalized=False)
          for t, ty in zip(tokens, types)
          if ty == _CONTROL
      ]
  )
  tok.add_tokens(
      [
          tokenizers.AddedToken(t, special=False, normalized=False)
          for t, ty in zip(tokens, types)
          if ty == _USER_DEFINED
      ]
  )
  bos = meta.get('tokenizer.ggml.bos_token_id')
  if meta.get('tokenizer.ggml.add_bos_token') and bos is not None:
    post.append(
        processors.TemplateProcessing(
            single=f'{tokens[bos]} $A',
            pair=f'{tokens[bos]} $A $B',
            special_tokens=[(tokens[bos], int(bos))],
        )
    )
  tok.post_processor = processors.Sequence(post)
  return tok


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
  """bos/eos/pad ids named in GGUF metadata (those present)."""
  out = {}
  for name in ('bos', 'eos', 'padding', 'unknown'):
    value = meta.get(f'tokenizer.ggml.{name}_token_id')
    if value is not None:
      out[name] = int(value)
  return out


def chatml(question: str, system: str | None = None) -> str:
  """A one-turn ChatML prompt (SmolLM2-Instruct's chat format).

  >>> chatml('Hi?')
  '<|im_start|>user\\nHi?<|im_end|>\\n<|im_start|>assistant\\n'
  """
  text = f'<|im_start|>system\n{system}<|im_end|>\n' if system else ''
  return (
      text + f'<|im_start|>user\n{question}<|im_end|>\n'
      '<|im_start|>assistant\n'
  )
