"""Mixed-domain calibration sequences (data.mixture_sequences)."""

import numpy as np
import pytest

from ctxlr import data
from ctxlr.models import gguf_io
from ctxlr.models import tokenizer as tokenizer_lib


@pytest.fixture(scope='module')
def tok():
  reader = gguf_io.open_gguf(gguf_io.default_gguf_path())
  return tokenizer_lib.from_gguf_metadata(gguf_io.read_metadata(reader))


@pytest.mark.parametrize(
    'weights,n,want',
    [
        ({'wikipedia': 1, 'sotu': 1}, 16, {'wikipedia': 8, 'sotu': 8}),
        ({'wikipedia': 3, 'sotu': 1}, 16, {'wikipedia': 12, 'sotu': 4}),
        ({'wikipedia': 0.7, 'sotu': 0.3}, 5, {'wikipedia': 4, 'sotu': 1}),
        ({'wikipedia': 100, 'sotu': 1}, 4, {'wikipedia': 3, 'sotu': 1}),
    ],
)
def test_counts(weights, n, want):
  assert data.mixture_counts(weights, n) == want


@pytest.mark.parametrize(
    'weights,match',
    [
        ({}, 'weights is empty'),
        ({'wikipedia': 1, 'news': 1}, "corpus='news'"),
        ({'wikipedia': 0}, r"weights\['wikipedia'\]: expected a finite number"),
        ({'wikipedia': -1.0}, 'expected a finite number > 0'),
        ({'wikipedia': float('inf')}, 'expected a finite number > 0'),
        ({'wikipedia': True}, 'expected a finite number > 0'),
    ],
)
def test_bad_weights(weights, match):
  with pytest.raises(ValueError, match=match):
    data.mixture_counts(weights, 8)


def test_too_few_sequences():
  with pytest.raises(ValueError, match='at least one sequence of each'):
    data.mixture_counts({'wikipedia': 1, 'sotu': 1}, 1)


def test_rows_are_each_corpus_calibration_rows_interleaved(tok):
  seqs = data.mixture_sequences(
      {'wikipedia': 3, 'sotu': 1}, 'calib', tok, seq_len=64, num_sequences=8
  )
  assert seqs.shape == (8, 64) and seqs.dtype == np.int32
  wiki = data.sequences('wikipedia', 'calib', tok, seq_len=64, num_sequences=6)
  sotu = data.sequences('sotu', 'calib', tok, seq_len=64, num_sequences=2)
  rows = [tuple(r) for r in seqs]
  assert rows.count(tuple(sotu[0])) == 1 and tuple(sotu[1]) in rows
  assert [r for r in rows if r in {tuple(w) for w in wiki}] == [
      tuple(w) for w in wiki
  ]  # in order
  # Interleaved by share: a SOTU row within the first four.
  assert tuple(sotu[0]) in rows[:4]
  # Never an evaluation row.
  held = {
      tuple(r)
      for c in ('wikipedia', 'sotu')
      for r in data.sequences(c, 'eval', tok, seq_len=64, num_sequences=50)
  }
  assert not held & set(rows)
