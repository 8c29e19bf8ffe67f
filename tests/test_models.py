"""Llama model, GGUF / HF-directory loaders and tokenizer.

Tiny models are checked against an independent float64 NumPy forward pass that
uses llama.cpp's conventions (GGUF rows as stored, interleaved RoPE), so the
q/k un-permutation is checked too. The bundled SmolLM2-135M is loaded once per
module for the real-model checks (tokenizer ids, perplexity band, "Paris",
GGUF -> safetensors -> reload).
"""

import json
import os
import shutil

from flax import nnx
import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ctxlr import data
from ctxlr import evaluation
from ctxlr import models
from ctxlr.models import gguf_io
from ctxlr.models import hf_io
from ctxlr.models import llama
from ctxlr.models import tokenizer as tokenizer_lib

TINY = dict(
    vocab=262,
    hidden=16,
    ffn=24,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=8,
    theta=10000.0,
    eps=1e-5,
)


# --- an independent float64 reference (llama.cpp conventions) ---------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's q/k row permutation (HF -> GGUF)."""
  return (
      w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
      .swapaxes(1, 2)
      .reshape(w.shape)
  )


def reference_logits(
    t: dict[str, np.ndarray],
    ids: np.ndarray,
    *,
    layers,
    heads,
    kv_heads,
    head_dim,
    theta,
    eps,
    tied=True,
):
  """float64 forward pass from GGUF-named, GGUF-ordered weights.

  Interleaved RoPE rotates adjacent pairs (2i, 2i+1), as llama.cpp does on
  the permuted q/k rows.
  """

  def rms(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

  def rope(x):  # x: [s, h, d], interleaved
    s, d = x.shape[0], x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(s)[:, None] * freq[None]  # [s, d/2]
    c, si = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * si
    out[..., 1::2] = a * si + b * c
    return out

  w = {k: v.astype(np.float64) for k, v in t.items()}
  h = w['token_embd.weight'][ids]  # [s, d]
  s = len(ids)
  group = heads // kv_heads
  mask = np.tril(np.ones((s, s), bool))
  for i in range(layers):
    p = f'blk.{i}.'
    x = rms(h, w[p + 'attn_norm.weight'])
    q = rope((x @ w[p + 'attn_q.weight'].T).reshape(s, heads, head_dim))
    k = rope((x @ w[p + 'attn_k.weight'].T).reshape(s, kv_heads, head_dim))
    v = (x @ w[p + 'attn_v.weight'].T).reshape(s, kv_heads, head_dim)
    out = np.empty((s, heads, head_dim))
    for hh in range(heads):
      sc = q[:, hh] @ k[:, hh // group].T / np.sqrt(head_dim)
      sc = np.where(mask, sc, -np.inf)
      pr = np.exp(sc - sc.max(-1, keepdims=True))
      pr /= pr.sum(-1, keepdims=True)
      out[:, hh] = pr @ v[:, hh // group]
    h = h + out.reshape(s, -1) @ w[p + 'attn_output.weight'].T
    x = rms(h, w[p + 'ffn_norm.weight'])
    g = x @ w[p + 'ffn_gate.weight'].T
    u = x @ w[p + 'ffn_up.weight'].T
    h = h + (g / (1 + np.exp(-g)) * u) @ w[p + 'ffn_down.weight'].T
  h = rms(h, w['output_norm.weight'])
  head = w['token_embd.weight'] if tied else w['output.weight']
  return h @ head.T


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table."""
  bs = (
      list(range(ord('!'), ord('~') + 1))
      + list(range(ord('¡'), ord('¬') + 1))
      + list(range(ord('®'), ord('ÿ') + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def tiny_vocab():
  """<|endoftext|>, <|im_end|>, 256 byte tokens, and four merges."""
  byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
  merges = ['Ġ t', 'h e', 'Ġt he', 'Ġ a']
  tokens = (
      ['<|endoftext|>', '<|im_end|>']
      + byte_tokens
      + [m.replace(' ', '') for m in merges]
  )
  types = [3, 3] + [1] * (len(tokens) - 2)
  assert len(tokens) == TINY['vocab']
  return tokens, types, merges


def tiny_gguf_tensors(seed=0, tied=True) -> dict[str, np.ndarray]:
  """Random GGUF-named weights in HF orientation, q/k rows permuted."""
  rng = np.random.default_rng(seed)
  c = TINY

  def mat(rows, cols):
    return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(
        np.float32
    )

  t = {
      'token_embd.weight': mat(c['vocab'], c['hidden']),
      'output_norm.weight': (1 + 0.1 * rng.standard_normal(c['hidden'])).astype(
          np.float32
      ),
  }
  if not tied:
    t['output.weight'] = mat(c['vocab'], c['hidden'])
  q_rows, kv_rows = c['heads'] * c['head_dim'], c['kv_heads'] * c['head_dim']
  for i in range(c['layers']):
    p = f'blk.{i}.'
    t[p + 'attn_norm.weight'] = (
        1 + 0.1 * rng.standard_normal(c['hidden'])
    ).astype(np.float32)
    t[p + 'ffn_norm.weight'] = (
        1 + 0.1 * rng.standard_normal(c['hidden'])
    ).astype(np.float32)
    t[p + 'attn_q.weight'] = llama_cpp_permute(
        mat(q_rows, c['hidden']), c['heads']
    )
    t[p + 'attn_k.weight'] = llama_cpp_permute(
        mat(kv_rows, c['hidden']), c['kv_heads']
    )
    t[p + 'attn_v.weight'] = mat(kv_rows, c['hidden'])
    t[p + 'attn_output.weight'] = mat(c['hidden'], q_rows)
    t[p + 'ffn_gate.weight'] = mat(c['ffn'], c['hidden'])
    t[p + 'ffn_up.weight'] = mat(c['ffn'], c['hidden'])
    t[p + 'ffn_down.weight'] = mat(c['hidden'], c['ffn'])
  return t


def write_tiny_gguf(path, tensors, *, arch='llama', rope_scaling=None):
  c = TINY
  w = gguf.GGUFWriter(path, arch)
  if arch == 'llama':
    w.add_block_count(c['layers'])
    w.add_context_length(128)
    w.add_embedding_length(c['hidden'])
    w.add_feed_forward_length(c['ffn'])
    w.add_head_count(c['heads'])
    w.add_head_count_kv(c['kv_heads'])
    w.add_rope_dimension_count(c['head_dim'])
    w.add_rope_freq_base(c['theta'])
    w.add_layer_norm_rms_eps(c['eps'])
    w.add_vocab_size(c['vocab'])
    if rope_scaling:
      w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
  tokens, types, merges = tiny_vocab()
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('smollm')
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_eos_token_id(0)
  for name, array in tensors.items():
    w.add_tensor(name, array)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def tiny_reference(tensors, ids, tied=True):
  c = TINY
  return reference_logits(
      tensors,
      ids,
      layers=c['layers'],
      heads=c['heads'],
      kv_heads=c['kv_heads'],
      head_dim=c['head_dim'],
      theta=c['theta'],
      eps=c['eps'],
      tied=tied,
  )


IDS = np.array([5, 77, 3, 200, 9, 9, 130, 42, 1, 255, 17], np.int32)


# --- tiny models --------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
  for heads in (1, 2, 3, 6):
    got = gguf_io.unpermute_rope_rows(llama_cpp_permute(w, heads), heads)
    np.testing.assert_array_equal(got, w)
  with pytest.raises(ValueError, match='not a multiple of'):
    gguf_io.unpermute_rope_rows(w, 5)


@pytest.mark.parametrize('tied', [True, False])
def test_tiny_gguf_matches_float64_reference(tmp_path, tied):
  tensors = tiny_gguf_tensors(seed=1, tied=tied)
  path = write_tiny_gguf(tmp_path / 'tiny.gguf', tensors)
  model, tok = models.load_llama(path)
  assert model.config == llama.LlamaConfig(
      vocab_size=262,
      hidden_size=16,
      intermediate_size=24,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      rope_theta=1e4,
      rms_eps=1e-5,
      tie_embeddings=tied,
      max_position=128,
  )
  logits = model(jnp.asarray(IDS[None]))
  assert logits.dtype == jnp.float32 and logits.shape == (1, len(IDS), 262)
  want = tiny_reference(tensors, IDS, tied=tied)
  np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=1e-5, atol=2e-5)
  assert tok.get_vocab_size() == 262


def test_structure_and_piecewise_forward(tmp_path):
  path = write_tiny_gguf(tmp_path / 'tiny.gguf', tiny_gguf_tensors(seed=2))
  model, _ = models.load_llama(path)
  assert isinstance(model.layers, nnx.List) and len(model.layers) == 2
  for block in model.layers:
    for name, shape in [
        ('q_proj', (16, 32)),
        ('k_proj', (16, 16)),
        ('v_proj', (16, 16)),
        ('o_proj', (32, 16)),
    ]:
      linear = getattr(block.attn, name)
      assert isinstance(linear, nnx.Linear) and linear.kernel.shape == shape
    for name, shape in [
        ('gate_proj', (16, 24)),
        ('up_proj', (16, 24)),
        ('down_proj', (24, 16)),
    ]:
      assert getattr(block.mlp, name).kernel.shape == shape
  ids = jnp.asarray(np.stack([IDS, IDS[::-1]]))
  whole = model(ids)
  h = model.embed(ids)
  assert h.dtype == jnp.float32 and h.shape == (2, len(IDS), 16)
  for block in model.layers:
    h = block(h)
  np.testing.assert_array_equal(np.asarray(model.head(h)), np.asarray(whole))
  # Surgery is attribute assignment: a copy of the Linear changes nothing.
  old = model.layers[1].mlp.down_proj
  new = nnx.Linear(24, 16, use_bias=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
  new.kernel.set_value(old.kernel.get_value())
  model.layers[1].mlp.down_proj = new
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(whole))
  # Rows are causal: a changed last token leaves earlier logits alone.
  ids2 = ids.at[:, -1].set(7)
  np.testing.assert_allclose(
      np.asarray(model(ids2)[:, :-1]),
      np.asarray(whole[:, :-1]),
      rtol=1e-6,
      atol=1e-6,
  )


def test_bf16_storage_computes_in_float32(tmp_path):
  tensors = tiny_gguf_tensors(seed=3)
  path = write_tiny_gguf(tmp_path / 'tiny.gguf', tensors)
  model, _ = models.load_llama(path, param_dtype=jnp.bfloat16)
  kernel = model.layers[0].attn.q_proj.kernel.get_value()
  assert kernel.dtype == jnp.bfloat16
  logits = model(jnp.asarray(IDS[None]))
  assert logits.dtype == jnp.float32
  rounded = {
      k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
      for k, v in tensors.items()
  }
  np.testing.assert_allclose(
      np.asarray(logits[0]), tiny_reference(rounded, IDS), rtol=1e-5, atol=2e-5
  )
  # bf16 tensors go to safetensors as BF16 and come back bit for bit.
  models.save_hf_dir(model, str(tmp_path / 'hf'))
  again, _ = models.load_hf_dir(str(tmp_path / 'hf'), param_dtype=jnp.bfloat16)
  assert again.layers[0].attn.q_proj.kernel.get_value().dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(again(jnp.asarray(IDS[None]))), np.asarray(logits)
  )


def test_random_init_model_runs():
  config = llama.LlamaConfig(
      vocab_size=50,
      hidden_size=8,
      intermediate_size=12,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=4,
  )
  model = models.Llama(config, rngs=nnx.Rngs(0))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params == config.num_params()
  assert np.isfinite(np.asarray(model(jnp.zeros((2, 3), jnp.int32)))).all()


def test_tiny_tokenizer_from_metadata(tmp_path):
  path = write_tiny_gguf(tmp_path / 'tiny.gguf', tiny_gguf_tensors())
  _, tok = models.load_llama(path)
  tokens, _, _ = tiny_vocab()
  enc = tok.encode(' the cat a1<|endoftext|>')
  # ' the' -> one merged token; digits alone; the control token matched whole.
  assert enc.tokens == ['Ġthe', 'Ġ', 'c', 'a', 't', 'Ġa', '1', '<|endoftext|>']
  assert [tokens[i] for i in enc.ids] == enc.tokens
  for text in ['Hello, wörld! 😀\n\n\t x', '  two  spaces', '']:
    assert tok.decode(tok.encode(text).ids) == text


def test_llama_config_errors():
  base = dict(
      vocab_size=8,
      hidden_size=8,
      intermediate_size=8,
      num_layers=1,
      num_heads=4,
      num_kv_heads=2,
      head_dim=4,
  )
  with pytest.raises(ValueError, match='not a multiple of num_kv_heads'):
    llama.LlamaConfig(**{**base, 'num_kv_heads': 3})
  with pytest.raises(ValueError, match='head_dim=3 must be even'):
    llama.LlamaConfig(**{**base, 'head_dim': 3})
  with pytest.raises(ValueError, match='num_layers must be >= 1'):
    llama.LlamaConfig(**{**base, 'num_layers': 0})
  with pytest.raises(ValueError, match='hidden_size must be an int'):
    llama.LlamaConfig(**{**base, 'hidden_size': 8.0})
  with pytest.raises(ValueError, match='rms_eps must be > 0'):
    llama.LlamaConfig(**base, rms_eps=0.0)
  model = models.Llama(llama.LlamaConfig(**base), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'ids must be int\[batch, seq\]'):
    model(jnp.zeros((3,), jnp.int32))


def test_gguf_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    models.load_llama(str(tmp_path / 'missing.gguf'))
  other = write_tiny_gguf(
      tmp_path / 'gpt2.gguf',
      {'token_embd.weight': np.zeros((4, 4), np.float32)},
      arch='gpt2',
  )
  with pytest.raises(ValueError, match="architecture is 'gpt2'"):
    models.load_llama(other)
  good = write_tiny_gguf(tmp_path / 'good.gguf', tiny_gguf_tensors())
  raw = open(good, 'rb').read()
  garbage = tmp_path / 'garbage.gguf'
  garbage.write_bytes(b'\x00' * 64 + raw[64:])
  with pytest.raises(ValueError, match='not a readable GGUF file'):
    models.load_llama(str(garbage))
  truncated = tmp_path / 'truncated.gguf'
  truncated.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match='not a readable GGUF file'):
    models.load_llama(str(truncated))
  scaled = write_tiny_gguf(
      tmp_path / 'scaled.gguf', tiny_gguf_tensors(), rope_scaling=True
  )
  with pytest.raises(ValueError, match='RoPE scaling'):
    models.load_llama(scaled)
  extra = {**tiny_gguf_tensors(), 'blk.0.attn_q.bias': np.zeros(32, np.float32)}
  with pytest.raises(
      ValueError,
      match=r'not used by a Llama model.*' r'self_attn\.q_proj\.bias',
  ):
    models.load_llama(write_tiny_gguf(tmp_path / 'bias.gguf', extra))
  fused = {
      **tiny_gguf_tensors(),
      'blk.0.attn_qkv.weight': np.zeros((64, 16), np.float32),
  }
  with pytest.raises(ValueError, match="unexpected tensor 'blk.0.attn_qkv"):
    models.load_llama(write_tiny_gguf(tmp_path / 'fused.gguf', fused))
  missing = tiny_gguf_tensors()
  del missing['blk.1.ffn_up.weight']
  with pytest.raises(
      ValueError, match=r"'model.layers.1.mlp.up_proj.weight' " 'is missing'
  ):
    models.load_llama(write_tiny_gguf(tmp_path / 'missing_t.gguf', missing))
  wrong = tiny_gguf_tensors()
  wrong['blk.0.ffn_down.weight'] = np.zeros((16, 20), np.float32)
  with pytest.raises(
      ValueError, match=r'has shape \(16, 20\); the config ' r'needs \(16, 24\)'
  ):
    models.load_llama(write_tiny_gguf(tmp_path / 'wrong.gguf', wrong))
  nan = tiny_gguf_tensors()
  nan['output_norm.weight'][3] = np.nan
  with pytest.raises(ValueError, match='contains NaN or Inf'):
    models.load_llama(write_tiny_gguf(tmp_path / 'nan.gguf', nan))


def test_hf_dir_round_trip_and_errors(tmp_path):
  path = write_tiny_gguf(tmp_path / 'tiny.gguf', tiny_gguf_tensors(seed=4))
  model, tok = models.load_llama(path)
  out = str(tmp_path / 'hf')
  models.save_hf_dir(model, out, tok)
  hf = json.load(open(os.path.join(out, 'config.json')))
  assert hf['model_type'] == 'llama' and hf['num_key_value_heads'] == 2
  again, tok2 = models.load_llama(out)
  ids = jnp.asarray(IDS[None])
  np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
  assert tok2.encode(' the cat').ids == tok.encode(' the cat').ids
  # Without tokenizer.json: load_hf_dir gives (model, None), load_llama says.
  os.remove(os.path.join(out, 'tokenizer.json'))
  assert models.load_hf_dir(out)[1] is None
  with pytest.raises(ValueError, match='no tokenizer.json'):
    models.load_llama(out)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    models.load_hf_dir(str(tmp_path / 'nowhere'))
  bad = str(tmp_path / 'bad')
  shutil.copytree(out, bad)
  json.dump(
      {**hf, 'rope_scaling': {'type': 'dynamic', 'factor': 2.0}},
      open(os.path.join(bad, 'config.json'), 'w'),
  )
  with pytest.raises(ValueError, match="rope_scaling rope_type='dynamic'"):
    models.load_hf_dir(bad)
  json.dump(
      {**hf, 'model_type': 'gpt2'}, open(os.path.join(bad, 'config.json'), 'w')
  )
  with pytest.raises(ValueError, match="model_type is 'gpt2'"):
    models.load_hf_dir(bad)
  json.dump(
      {**hf, 'hidden_size': 32}, open(os.path.join(bad, 'config.json'), 'w')
  )
  with pytest.raises(ValueError, match='model.embed_tokens.weight'):
    models.load_hf_dir(bad)
  with open(os.path.join(bad, 'model.safetensors'), 'wb') as f:
    f.write(b'not safetensors')
  json.dump(hf, open(os.path.join(bad, 'config.json'), 'w'))
  with pytest.raises(ValueError, match='not a readable safetensors file'):
    models.load_hf_dir(bad)
  os.remove(os.path.join(bad, 'config.json'))
  with pytest.raises(FileNotFoundError, match='no config.json'):
    models.load_hf_dir(bad)


# --- the bundled SmolLM2-135M -------------------------------------------------

EIFFEL = 'The Eiffel Tower is a wrought-iron'  # one shape for eager calls


@pytest.fixture(scope='module')
def smollm():
  return models.load_llama()


def test_smollm_config_from_metadata(smollm):
  model, _ = smollm
  c = model.config
  assert (
      c.num_layers,
      c.hidden_size,
      c.intermediate_size,
      c.num_heads,
      c.num_kv_heads,
      c.head_dim,
      c.vocab_size,
  ) == (30, 576, 1536, 9, 3, 64, 49152)
  assert c.tie_embeddings and c.rope_theta == 1e5
  np.testing.assert_allclose(c.rms_eps, 1e-5, rtol=1e-6)
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params == c.num_params()
  assert round(params / 1e6, 1) == 134.5


def test_smollm_tokenizer(smollm):
  _, tok = smollm
  assert tok.encode('Building a bridge').ids == [20115, 253, 7395]
  assert tok.encode('<|im_start|>user\n').ids[0] == 1
  for text in [
      'In 1999, 12,345 people—“quoted”—said: ünïcödé 😀\n\n\tok',
      '<|im_start|>assistant\nHi<|im_end|>\n',
      '   x  ',
  ]:
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
  # Digits are split one by one (the `smollm` pre-tokenizer).
  assert tok.encode('2024').tokens == ['2', '0', '2', '4']


def test_smollm_perplexity_band(smollm, tmp_path, monkeypatch):
  monkeypatch.setenv('CTXLR_CACHE', str(tmp_path))
  model, tok = smollm
  seqs = data.sequences('wikipedia', 'eval', tok, seq_len=128, num_sequences=4)
  result = evaluation.perplexity(model, seqs, batch_size=4, progress=False)
  # Measured 16.40 on this slice; without the q/k un-permutation it is 108.
  assert 12.0 < result.perplexity < 22.0, result


def test_smollm_answers_paris(smollm):
  model, tok = smollm
  prompt = tok.encode(tokenizer_lib.chatml('What is the capital of France?'))
  out = evaluation.generate(
      model,
      prompt.ids,
      max_new_tokens=12,
      stop_ids=[tok.token_to_id('<|im_end|>')],
  )
  assert 'Paris' in tok.decode(out)


def test_smollm_safetensors_round_trip(smollm, tmp_path):
  model, tok = smollm
  models.save_hf_dir(model, str(tmp_path), tok)
  again, tok2 = models.load_llama(str(tmp_path))
  assert again.config == model.config
  ids = jnp.asarray([tok.encode(EIFFEL).ids])
  np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
  assert tok2.encode('Building a bridge').ids == [20115, 253, 7395]


def test_smollm_matches_float64_reference(smollm):
  """The whole real model vs the float64 llama.cpp-convention reference."""
  model, tok = smollm
  reader = gguf_io.open_gguf(gguf_io.default_gguf_path())
  tensors = {
      t.name: np.asarray(
          gguf.quants.dequantize(t.data, t.tensor_type), np.float32
      ).reshape([int(n) for n in t.shape[::-1]])
      for t in reader.tensors
  }
  ids = np.asarray(tok.encode(EIFFEL).ids)
  c = model.config
  want = reference_logits(
      tensors,
      ids,
      layers=c.num_layers,
      heads=c.num_heads,
      kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      theta=c.rope_theta,
      eps=c.rms_eps,
  )
  got = np.asarray(model(jnp.asarray(ids[None])))[0]
  # Measured: max |diff| 1.2e-4 with logits up to 28 (float32 rounding).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_family_config_errors():
  base = dict(
      vocab_size=8,
      hidden_size=8,
      intermediate_size=8,
      num_layers=1,
      num_heads=4,
      num_kv_heads=2,
      head_dim=4,
  )
  with pytest.raises(ValueError, match="model_type='gemma'"):
    llama.LlamaConfig(**base, model_type='gemma')
  with pytest.raises(ValueError, match='sliding_window must be None or an int'):
    llama.LlamaConfig(**base, sliding_window=0)
  with pytest.raises(ValueError, match='qk_norm must be a bool'):
    llama.LlamaConfig(**base, qk_norm=1)
  with pytest.raises(ValueError, match='rope_scaling must be a RopeScaling'):
    llama.LlamaConfig(**base, rope_scaling={'factor': 2.0})
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    llama.RopeScaling('yarn', 2.0)
  with pytest.raises(ValueError, match='factor must be > 0'):
    llama.RopeScaling('linear', 0.0)
  with pytest.raises(ValueError, match='low_freq_factor < high_freq_factor'):
    llama.RopeScaling('llama3', 8.0, low_freq_factor=4.0, high_freq_factor=1.0)
  # Features transformers' class for the family cannot express.
  for kwargs in (
      dict(model_type='mistral', mlp_bias=True),
      dict(model_type='qwen2'),  # no q/k/v bias
      dict(model_type='llama', qk_norm=True),
      dict(model_type='qwen3', sliding_window=4),
  ):
    config = llama.LlamaConfig(**base, **kwargs)
    with pytest.raises(ValueError, match='has no .*ForCausalLM equivalent'):
      hf_io.config_to_hf(config, jnp.float32)


def test_rope_inv_freq_scalings():
  plain = llama.rope_inv_freq(8, 5e5)
  np.testing.assert_allclose(plain, 5e5 ** (-np.arange(0, 8, 2) / 8))
  np.testing.assert_allclose(
      llama.rope_inv_freq(8, 5e5, llama.RopeScaling('linear', 4.0)), plain / 4
  )
  scaled = llama.rope_inv_freq(
      8,
      5e5,
      llama.RopeScaling(
          'llama3',
          8.0,
          low_freq_factor=1.0,
          high_freq_factor=4.0,
          original_max_position=256,
      ),
  )
  wavelen = 2 * np.pi / plain  # 6.3, 167, 4443, 118,000
  assert scaled[0] == plain[0]  # < 256/4: kept
  np.testing.assert_allclose(scaled[2:], plain[2:] / 8)  # > 256: / factor
  smooth = (256 / wavelen[1] - 1) / (4 - 1)  # in between: blended
  np.testing.assert_allclose(
      scaled[1], (1 - smooth) * plain[1] / 8 + smooth * plain[1]
  )


def test_sliding_window_mask():
  mask = np.asarray(llama.attention_mask(6, 3))
  want = np.array([[t <= s and s - t < 3 for t in range(6)] for s in range(6)])
  np.testing.assert_array_equal(mask, want)
  np.testing.assert_array_equal(
      np.asarray(llama.attention_mask(4, None)), np.tril(np.ones((4, 4), bool))
  )
