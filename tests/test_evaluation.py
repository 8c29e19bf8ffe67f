"""Perplexity and greedy generation on a tiny random Llama.

References are float64 NumPy computations from the model's logits (the model
itself is checked against a float64 forward pass in test_models.py).
"""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import evaluation
from ctxlr import models
from ctxlr import results
from experiments import eval_dense
from experiments.configs import eval_dense as eval_dense_config

CONFIG = models.LlamaConfig(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
)


@pytest.fixture(scope='module')
def model():
  m = models.Llama(CONFIG, rngs=nnx.Rngs(0))
  # Larger embeddings make the next-token distribution far from uniform.
  emb = m.embed_tokens.embedding
  emb.set_value(emb.get_value() * 8.0)
  return m


@nnx.jit
def forward(model, ids):
  return model(ids)


def reference_nll(model, seqs):
  """float64 mean NLL of seqs[:, 1:] given the model's logits."""
  logits = np.asarray(forward(model, jnp.asarray(seqs)), np.float64)[:, :-1]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, seqs[:, 1:, None], -1)[..., 0]
  return -picked.mean()


@pytest.mark.parametrize(
    'shape,chunked', [((2, 12, 40), True), ((1, 13, 40), False)]
)
def test_logsumexp_rows_in_chunks(monkeypatch, shape, chunked):
  """The CPU normaliser in chunks of 3 rows (a prime row count: whole)
  against float64 NumPy."""
  monkeypatch.setattr(evaluation, '_LSE_CHUNK_BYTES', 3 * 40 * 4)
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 30
  got = evaluation._logsumexp_rows(jnp.asarray(x))
  x64 = x.astype(np.float64)
  m = x64.max(-1)
  want = m + np.log(np.exp(x64 - m[..., None]).sum(-1))
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  jaxpr = str(jax.make_jaxpr(evaluation._logsumexp_rows)(jnp.asarray(x)))
  assert ('scan' in jaxpr) == chunked, jaxpr


@pytest.mark.parametrize('n,batch_size', [(5, 2), (3, 8)])
def test_perplexity_matches_reference(model, n, batch_size):
  seqs = np.random.default_rng(n).integers(0, 40, (n, 12), dtype=np.int32)
  result = evaluation.perplexity(
      model, seqs, batch_size=batch_size, progress=False
  )
  want = reference_nll(model, seqs)
  np.testing.assert_allclose(result.nll, want, rtol=1e-5)
  np.testing.assert_allclose(result.perplexity, np.exp(want), rtol=1e-5)
  assert result.num_tokens == n * 11 and result.num_sequences == n
  assert result.seconds > 0 and result.tokens_per_second > 0
  # A uniform guesser scores log(40) nats; this model is far from that.
  assert abs(result.nll - np.log(40)) > 0.1


def test_generate_is_greedy_argmax(model):
  prompt = [3, 14, 15, 9, 2]
  out = evaluation.generate(model, prompt, max_new_tokens=6)
  ids = list(prompt)
  for _ in range(6):  # the naive loop: a forward pass on the prefix
    padded = np.zeros((1, 16), np.int32)  # one shape; causal, so the
    padded[0, : len(ids)] = ids  # padding cannot change [len-1]
    logits = np.asarray(forward(model, jnp.asarray(padded)))[0, len(ids) - 1]
    ids.append(int(np.argmax(logits)))
  assert out == ids[len(prompt) :]
  # Stops right after a stop id (which is included).
  first = out[2]
  stopped = evaluation.generate(
      model, prompt, max_new_tokens=6, stop_ids=[first]
  )
  assert stopped == out[: out.index(first) + 1]


def test_errors(model):
  with pytest.raises(ValueError, match=r'sequences must be int\[num_seq'):
    evaluation.perplexity(model, np.zeros((3,), np.int32))
  with pytest.raises(ValueError, match=r'seq_len >= 2'):
    evaluation.perplexity(model, np.zeros((3, 1), np.int32))
  with pytest.raises(ValueError, match=r'sequences must be int'):
    evaluation.perplexity(model, np.zeros((3, 4), np.float32))
  with pytest.raises(ValueError, match='sequences is empty'):
    evaluation.perplexity(model, np.zeros((0, 4), np.int32))
  with pytest.raises(ValueError, match=r'outside \[0, 40\): min 0, max 40'):
    evaluation.perplexity(
        model,
        np.full((2, 4), 40, np.int32).clip(0, None) * np.array([0, 1, 1, 1]),
    )
  with pytest.raises(ValueError, match='batch_size must be an int >= 1'):
    evaluation.perplexity(model, np.zeros((2, 4), np.int32), batch_size=0)
  with pytest.raises(ValueError, match='prompt_ids is empty'):
    evaluation.generate(model, [])
  with pytest.raises(ValueError, match='max_new_tokens must be an int >= 1'):
    evaluation.generate(model, [1], max_new_tokens=0)
  with pytest.raises(ValueError, match=r'prompt_ids holds token ids outside'):
    evaluation.generate(model, [1, -2])


def test_eval_dense_quick_experiment(tmp_path, monkeypatch):
  """The eval_dense experiment end to end on a few tokens of the real model."""
  monkeypatch.setenv('CTXLR_CACHE', str(tmp_path / 'cache'))
  config = eval_dense_config.get_config('quick')
  config.seq_len, config.num_sequences, config.max_new_tokens = 64, 2, 8
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  eval_dense.run(config, workdir)
  rows = results.read_json(os.path.join(workdir, 'results.json'))
  assert [r['corpus'] for r in rows] == ['wikipedia', 'sotu']
  for r in rows:
    assert r['num_tokens'] == 2 * 63 and 3 < r['perplexity'] < 100
    assert r['tokens_per_second'] > 0
  samples = results.read_json(os.path.join(workdir, 'samples.json'))
  assert 'Paris' in samples[0]['answer']
  os.remove(os.path.join(workdir, 'perplexity.png'))
  eval_dense.plot(workdir)  # from results.json
  assert os.path.getsize(os.path.join(workdir, 'perplexity.png')) > 1000
  with pytest.raises(ValueError, match='Unknown config arg'):
    eval_dense_config.get_config('fast')
