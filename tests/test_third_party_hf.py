"""transformers' FlaxLlamaForCausalLM (Linen) at a tiny random config.

transformers 4.57.6, the last release with Flax models, needs
tokenizers<=0.23.0 and huggingface-hub<1.0, which requirements.txt's pins
exclude; requirements-dev.txt says how to install it beside them. Skipped
where it cannot be imported.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import linen as ctxlr_linen

try:
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers import FlaxLlamaForCausalLM  # pylint: disable=g-import-not-at-top
except Exception as e:  # pylint: disable=broad-except
  pytest.skip(
      f'transformers with FlaxLlamaForCausalLM is not importable '
      f'({type(e).__name__}: {e}); see requirements-dev.txt',
      allow_module_level=True,
  )


@pytest.fixture(scope='module')
def llama():
  config = transformers.LlamaConfig(
      vocab_size=64,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=32,
  )
  model = FlaxLlamaForCausalLM(config, seed=0, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 10))) for _ in range(3)]

  def apply(variables, ids):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model.module.apply(
        variables, ids, jnp.ones_like(ids), positions
    ).logits

  return model, apply, batches


def test_full_rank_params_keep_logits(llama):
  model, apply, batches = llama
  variables = {'params': model.params}
  views, _ = ctxlr_linen.find_layers(apply, variables, batches[0])
  shapes = ctxlr_linen.select(apply, variables, batches[0])
  assert 'model.layers.0.self_attn.q_proj' in shapes and 'lm_head' not in shapes
  exact = {}
  for name in shapes:
    k = np.asarray(
        ctxlr_linen.kernel_matrix(variables, name, views), np.float64
    )
    u, s, vt = np.linalg.svd(k, full_matrices=False)
    exact[name] = (u * s, vt)
  params = ctxlr_linen.factor_params(model.params, exact, views)
  with ctxlr_linen.factored():
    got = apply({'params': params}, batches[0])
  np.testing.assert_allclose(
      got, apply(variables, batches[0]), rtol=1e-4, atol=1e-4
  )


def test_half_ratio_report_names_and_round_trip(llama, tmp_path):
  model, apply, batches = llama
  params, report = ctxlr_linen.compress(apply, model.params, batches, ratio=0.5)
  names = set(report['layers'])
  assert len(names) == 2 * 7
  assert {
      'model.layers.0.self_attn.q_proj',
      'model.layers.1.mlp.down_proj',
      'model.layers.1.self_attn.k_proj',
  } <= names
  assert report['layers']['model.layers.0.mlp.up_proj']['rank'] == 5
  assert report['model_ratio'] < 1
  # Saved in the model's own Flax format (from_pretrained would drop the
  # keys its dense architecture does not know), read back as written.
  model.save_pretrained(str(tmp_path), params=params)
  with open(tmp_path / 'flax_model.msgpack', 'rb') as f:
    restored = flax.serialization.msgpack_restore(f.read())
  assert jax.tree.map(jnp.shape, restored) == jax.tree.map(jnp.shape, params)
  with ctxlr_linen.factored():
    before = apply({'params': params}, batches[0])
    after = apply({'params': restored}, batches[0])
  np.testing.assert_array_equal(after, before)
