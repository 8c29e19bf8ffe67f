"""Llama / Qwen2 / Qwen3 / Mistral directories vs `transformers`' fixtures.

tests/fixtures/hf/<name>/ are tiny random checkpoints that `transformers`'
PyTorch classes saved (tests/fixtures/make_hf_fixtures.py), with the logits
of `AutoModelForCausalLM` on a fixed id sequence and the ids of
`PreTrainedTokenizerFast` on a fixed multilingual text. No torch needed here.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from ctxlr import models
from ctxlr import results
from ctxlr import stats as stats_lib
from ctxlr import surgery
from ctxlr.models import hf_io
from ctxlr.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'hf')
NAMES = ('llama3', 'llama2', 'qwen2', 'qwen3', 'mistral')
# float32 rounding: measured max |logit difference| / max |logit| is
# 2.3e-7 (llama3), 2.6e-7 (llama2), 2.6e-7 (qwen2), 3.0e-7 (qwen3) and
# 3.5e-7 (mistral); the bound leaves a factor ~6.
RTOL = 2e-6


def fixture(name):
  path = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(path, 'reference.npz'))
  with open(os.path.join(path, 'reference.json')) as f:
    meta = json.load(f)
  return path, ref, meta


def logits(model, ids):
  return np.asarray(model(jnp.asarray(np.asarray(ids)[None])))[0]


def tolerance(want):
  return RTOL * np.abs(want).max()


EXPECTED = {
    'llama3': dict(
        model_type='llama',
        num_kv_heads=2,
        head_dim=8,
        tie_embeddings=True,
        rope_theta=5e5,
        rope_scaling=llama.RopeScaling(
            'llama3',
            8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position=256,
        ),
    ),
    'llama2': dict(
        model_type='llama',
        num_kv_heads=4,
        head_dim=4,
        tie_embeddings=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        rope_scaling=llama.RopeScaling('linear', 2.0),
    ),
    'qwen2': dict(
        model_type='qwen2',
        num_kv_heads=2,
        head_dim=4,
        tie_embeddings=True,
        qkv_bias=True,
        o_bias=False,
        rope_theta=1e6,
        sliding_window=None,
    ),
    'qwen3': dict(
        model_type='qwen3',
        num_kv_heads=2,
        head_dim=8,
        tie_embeddings=True,
        qk_norm=True,
        qkv_bias=False,
    ),
    'mistral': dict(
        model_type='mistral',
        num_kv_heads=2,
        head_dim=4,
        tie_embeddings=False,
        sliding_window=6,
    ),
}


@pytest.mark.parametrize('name', NAMES)
def test_logits_match_transformers(name):
  path, ref, _ = fixture(name)
  model, _ = models.load_llama(path)
  for key, value in EXPECTED[name].items():
    assert getattr(model.config, key) == value, key
  want = ref['logits']
  got = logits(model, ref['input_ids'])
  assert got.shape == want.shape == (16, model.config.vocab_size)
  np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want))
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


# The fixtures exercise each feature: leaving it out is far outside RTOL.
SENSITIVITY = {
    'llama3': ('rope_scaling', None),  # measured max |diff| 0.60
    'llama2': ('rope_scaling', None),  # 2.1
    'mistral': ('sliding_window', None),  # 1.9
    'qwen2': ('bias', 0.0),  # 12.8
    'qwen3': ('norm', 1.0),  # 3.1 (q/k norm weights all ones)
}


@pytest.mark.parametrize('name', NAMES)
def test_each_feature_matters(name):
  path, ref, _ = fixture(name)
  model, _ = models.load_llama(path)
  tensors = hf_io.to_hf_tensors(model)
  config = model.config
  field, value = SENSITIVITY[name]
  if field == 'bias':
    tensors = {
        k: v * 0 if k.endswith('.bias') else v for k, v in tensors.items()
    }
  elif field == 'norm':
    tensors = {
        k: np.ones_like(v) if '_norm.' in k and 'self_attn' in k else v
        for k, v in tensors.items()
    }
  else:
    config = dataclasses.replace(config, **{field: value})
  without = hf_io.from_hf_tensors(config, tensors)
  diff = np.abs(logits(without, ref['input_ids']) - ref['logits']).max()
  assert diff > 1e4 * tolerance(ref['logits']), diff


@pytest.mark.parametrize('name', NAMES)
def test_tokenizer_ids_match_transformers(name):
  path, _, meta = fixture(name)
  _, tok = models.load_llama(path)
  text = meta['text']
  assert tok.encode(text, add_special_tokens=False).ids == meta['ids']
  assert tok.encode(text).ids == meta['ids_with_special']
  assert tok.decode(meta['ids'], skip_special_tokens=False) == meta['decoded']
  assert len(meta['ids']) > 300  # scripts outside the vocab -> bytes


def _safetensors(path):
  out = {}
  for file in sorted(os.listdir(path)):
    if file.endswith('.safetensors'):
      with safetensors.safe_open(os.path.join(path, file), 'np') as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


@pytest.mark.parametrize('name', NAMES)
def test_export_round_trips_exactly(name, tmp_path):
  path, ref, _ = fixture(name)
  # bf16 storage, as saved: the export writes the same bytes.
  model, tok = models.load_llama(path, param_dtype=jnp.bfloat16)
  out = str(tmp_path / 'out')
  models.save_hf_dir(model, out, tok)
  original, exported = _safetensors(path), _safetensors(out)
  assert set(exported) == set(original) - {
      'lm_head.weight' if model.config.tie_embeddings else ''
  }
  for key, array in exported.items():
    assert array.dtype == original[key].dtype, key
    np.testing.assert_array_equal(array, original[key], err_msg=key)
  again, tok2 = models.load_llama(out, param_dtype=jnp.bfloat16)
  assert again.config == model.config
  assert tok2.to_str() == tok.to_str()
  np.testing.assert_array_equal(
      logits(again, ref['input_ids']), logits(model, ref['input_ids'])
  )
  # The exported config.json means the same to config_from_hf as the
  # original (`transformers` v5 wrote it; the export is v4-style RoPE).
  with open(os.path.join(out, 'config.json')) as f:
    hf = json.load(f)
  assert hf['architectures'] == [hf_io.ARCHITECTURES[model.config.model_type]]
  assert hf_io.read_config(path) == hf_io.read_config(out)
  # float32 and sharded: the same again.
  f32, _ = models.load_llama(path)
  sharded = str(tmp_path / 'sharded')
  models.save_hf_dir(f32, sharded, max_shard_bytes=4096)
  files = os.listdir(sharded)
  assert 'model.safetensors.index.json' in files
  assert sum(f.endswith('.safetensors') for f in files) > 2
  back, _ = models.load_hf_dir(sharded)
  for key, array in hf_io.to_hf_tensors(back).items():
    np.testing.assert_array_equal(array, hf_io.to_hf_tensors(f32)[key])
  # Re-exported unsharded into the same directory: stale shards go.
  models.save_hf_dir(back, sharded)
  assert sorted(os.listdir(sharded)) == ['config.json', 'model.safetensors']


def test_v4_config_fields_read_alike(tmp_path):
  """rope_theta + rope_scaling (transformers v4) == rope_parameters (v5)."""
  for name in NAMES:
    path, _, _ = fixture(name)
    with open(os.path.join(path, 'config.json')) as f:
      hf = json.load(f)
    rope = dict(hf.pop('rope_parameters'))
    hf['rope_theta'] = rope.pop('rope_theta')
    hf['rope_scaling'] = None if rope['rope_type'] == 'default' else rope
    if name == 'llama2':  # the oldest spelling: 'type'
      hf['rope_scaling'] = dict(type='linear', factor=2.0)
    assert hf_io.config_from_hf(hf, 'v4') == hf_io.read_config(path), name


def test_layers_are_plain_linears_the_surgery_finds():
  path, _, _ = fixture('qwen2')
  model, _ = models.load_llama(path)
  spec = surgery.select_linears(model, include=('*_proj',))
  assert len(spec) == 7 * 2
  assert spec['layers.1.attn.q_proj'] == (16, 16)
  assert spec['layers.0.mlp.down_proj'] == (32, 16)
  block = model.layers[0]
  for name in ('q_proj', 'k_proj', 'v_proj'):
    assert getattr(block.attn, name).bias is not None
  assert block.attn.o_proj.bias is None and block.mlp.up_proj.bias is None
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params == model.config.num_params()
  model3, _ = models.load_llama(fixture('qwen3')[0])
  assert model3.layers[0].attn.q_norm.scale.shape == (8,)
  assert surgery.select_linears(model3, include=('*_proj',))[
      'layers.0.attn.q_proj'
  ] == (16, 32)
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model3, nnx.Param)))
  assert params == model3.config.num_params()


def _bad_config(tmp_path, name, **changes):
  path, _, _ = fixture(name)
  bad = str(tmp_path / f'bad_{name}')
  if not os.path.isdir(bad):
    shutil.copytree(path, bad)
  with open(os.path.join(path, 'config.json')) as f:
    hf = json.load(f)
  for key, value in changes.items():
    if value is _DROP:
      hf.pop(key)
    else:
      hf[key] = value
  with open(os.path.join(bad, 'config.json'), 'w') as f:
    json.dump(hf, f)
  return bad


_DROP = object()


@pytest.mark.parametrize(
    'name,changes,message',
    [
        (
            'llama3',
            dict(model_type='gemma'),
            "model_type is 'gemma'; supported",
        ),
        (
            'llama3',
            dict(quantization_config={'quant_method': 'gptq'}),
            "config field 'quantization_config'",
        ),
        ('qwen2', dict(attention_bias=True), "config field 'attention_bias'"),
        (
            'mistral',
            dict(num_experts_per_tok=2),
            "config field 'num_experts_per_tok'",
        ),
        ('llama3', dict(hidden_act='gelu'), "hidden_act='gelu'"),
        ('llama3', dict(rope_interleaved=True), 'rope_interleaved=True'),
        (
            'llama3',
            dict(
                rope_parameters=dict(
                    rope_type='yarn', factor=4.0, rope_theta=1e4
                )
            ),
            "rope_type='yarn' is not supported",
        ),
        (
            'llama3',
            dict(
                rope_parameters=dict(
                    rope_type='default',
                    rope_theta=1e4,
                    partial_rotary_factor=0.5,
                )
            ),
            'partial_rotary_factor=0.5',
        ),
        (
            'llama3',
            dict(
                rope_parameters=dict(
                    rope_type='llama3',
                    factor=8.0,
                    rope_theta=1e4,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    beta=2,
                )
            ),
            "field 'beta' is not supported",
        ),
        (
            'qwen2',
            dict(
                use_sliding_window=True,
                sliding_window=4,
                max_window_layers=1,
                layer_types=_DROP,
            ),
            r"layers \[1\] have attention 'sliding_attention'",
        ),
        (
            'qwen3',
            dict(layer_types=['sliding_attention', 'full_attention']),
            r'layers \[0\]',
        ),
        ('llama3', dict(attention_bias='yes'), "attention_bias='yes'"),
        ('llama3', dict(num_key_value_heads=3), 'not a multiple of'),
        ('llama3', dict(hidden_size=_DROP), "lacks 'hidden_size'"),
        (
            'llama3',
            dict(hidden_size=32),
            "'model.embed_tokens.weight' has shape",
        ),
        (
            'qwen3',
            dict(head_dim=_DROP),
            r'has shape \(32, 16\); the config needs ' r'\(512, 16\)',
        ),  # Qwen3's default head_dim is 128, as transformers
    ],
)
def test_unsupported_configs_are_refused(tmp_path, name, changes, message):
  with pytest.raises(ValueError, match=message):
    models.load_hf_dir(_bad_config(tmp_path, name, **changes))


def test_harmless_fields_are_read_as_transformers_reads_them(tmp_path):
  # SmolLM2's config.json carries two nanotron fields transformers ignores.
  smol = _bad_config(
      tmp_path,
      'llama3',
      is_llama_config=True,
      rope_interleaved=False,
      eos_token_id=[1, 2],
  )
  assert hf_io.read_config(smol) == hf_io.read_config(fixture('llama3')[0])


def test_mistral_default_window_is_transformers(tmp_path):
  bad = _bad_config(tmp_path, 'mistral', sliding_window=_DROP)
  assert hf_io.read_config(bad).sliding_window == 4096
  null = _bad_config(tmp_path, 'mistral', sliding_window=None)
  assert hf_io.read_config(null).sliding_window is None


def test_shard_index_errors(tmp_path):
  path, _, _ = fixture('llama2')
  bad = str(tmp_path / 'bad')
  shutil.copytree(path, bad)
  os.remove(os.path.join(bad, 'model-00002-of-00004.safetensors'))
  with pytest.raises(FileNotFoundError, match="lists 'model-00002-of-00004"):
    models.load_hf_dir(bad)
  # Without the index every file is read; a name in two files is an error.
  shutil.rmtree(bad)
  shutil.copytree(path, bad)
  os.remove(os.path.join(bad, 'model.safetensors.index.json'))
  models.load_hf_dir(bad)
  shutil.copy(
      os.path.join(bad, 'model-00001-of-00004.safetensors'),
      os.path.join(bad, 'extra.safetensors'),
  )
  with pytest.raises(
      ValueError,
      match='is in both extra.safetensors and '
      'model-00001-of-00004.safetensors',
  ):
    models.load_hf_dir(bad)


def test_compressed_model_is_not_exported_dense(tmp_path):
  model, _ = models.load_llama(fixture('qwen2')[0])
  linear = model.layers[0].attn.q_proj
  k = linear.kernel.get_value()
  surgery.replace_module(
      model,
      'layers.0.attn.q_proj',
      surgery.factored_from_linear(linear, k, jnp.eye(16)),
  )
  with pytest.raises(
      ValueError,
      match=r'FactoredLinear at layers\.0\.attn' r'\.q_proj has no .kernel.',
  ):
    models.save_hf_dir(model, str(tmp_path / 'x'))


@pytest.fixture(scope='module')
def token_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('token_cache'))


@pytest.mark.parametrize('name', NAMES)
def test_quick_compress_through_launch(name, tmp_path, token_cache):
  path, _, _ = fixture(name)
  env = dict(os.environ, CTXLR_CACHE=token_cache)
  proc = subprocess.run(
      [
          sys.executable,
          'launch.py',
          '--config=experiments/configs/compress.py:quick',
          f'--config.model.path={path}',
          f'--workdir={tmp_path}',
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  layers = out['layers']
  factored = [l for l in layers.values() if l['rank'] is not None]
  assert len(layers) == 7 and factored  # fisher ranks may keep some dense
  assert all(0 < l['rel_err'] < 1 and not l['failed'] for l in factored)
  assert 0.7 < out['kept_ratio'] <= 0.8
  for split in ('dense', 'compressed'):
    assert all(np.isfinite(v['perplexity']) for v in out[split].values())


def test_scale_facts():
  model, _ = models.load_llama(fixture('qwen3')[0])
  shapes = surgery.select_linears(model, include=('*_proj',))
  facts = models.scale_facts(model, shapes)
  # Per block: q/k/v share a 16-wide input, o_proj reads 4 heads x 8 = 32,
  # gate/up share 16, down_proj reads 32: 16² + 32² + 16² + 32² = 2,560.
  assert facts == dict(
      num_params=model.config.num_params(),
      param_bytes=4 * model.config.num_params(),
      num_layers=14,
      layer_params=sum(a * b for a, b in shapes.values()),
      num_inputs=8,
      sum_d_in_sq=2 * 2560,
      largest_d_in=32,
      stats_dtype='float32',
      stats_bytes=4 * 2 * 2560,
  )
  both = models.scale_facts(
      model, shapes, jnp.float64, want=stats_lib.Want(gram=True)
  )
  assert both['stats_bytes'] == 8 * 2 * 2 * 2560
  assert both['stats_dtype'] == 'float64'
  one = {'layers.1.mlp.down_proj': (32, 16)}
  assert models.scale_facts(model, one)['sum_d_in_sq'] == 32 * 32
  assert '5,120 elements = 20.5 KB in float32' in models.describe_scale(facts)
  with pytest.raises(ValueError, match='its input has width 32'):
    models.scale_facts(model, {'layers.1.mlp.down_proj': (16, 16)})
