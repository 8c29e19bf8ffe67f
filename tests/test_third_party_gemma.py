"""Google DeepMind's gemma (Linen Gemma transformers) at a tiny random config.

gemma 3.3.0 (4.x needs Python 3.12) with kauldron and tensorflow-cpu goes in
a folder of its own, as requirements-dev.txt says; skipped where gemma
cannot be imported. gemma's code is used as it is. Run it in a pytest
process of its own (as `make test` does): importing gemma patches
`nn.Module.param` for every Linen module, which breaks other models'
initializers (transformers' Flax RMSNorm).

gemma's layers are its `Einsum` modules (and its FeedForward's own einsum
params), kernels contracted by `jnp.einsum`: ctxlr.linen's einsum layers,
named by their param paths. `Transformer.__call__` is wrapped in `nn.jit`,
whose cached trace runs no Python, so ctxlr traces it under
`jax.disable_jit()`; without, the layers are listed as not seen called.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ctxlr import linen as ctxlr_linen

try:
  from gemma import gm  # pylint: disable=g-import-not-at-top

  Transformer = gm.nn.Transformer  # its lazy imports, now
  TransformerConfig = gm.nn.config.TransformerConfig
  AttentionType = gm.nn.AttentionType
except Exception as e:  # pylint: disable=broad-except
  pytest.skip(
      f'gemma is not importable ({type(e).__name__}: {e}); see '
      'requirements-dev.txt',
      allow_module_level=True,
  )

# gemma's layers, by param path; each block has them all.
LAYERS = {
    f'layer_{i}.{p}'
    for i in range(2)
    for p in (
        'attn.q_einsum.w',
        'attn.kv_einsum.w',
        'attn.attn_vec_einsum.w',
        'mlp.gating_einsum',
        'mlp.linear',
    )
}


@pytest.fixture(scope='module')
def gemma():
  # Gemma 3 270M's architecture (sliding and global attention, q/k norms,
  # post norms, one KV head, transposed gating einsum), tiny.
  config = TransformerConfig(
      num_embed=64,
      embed_dim=16,
      hidden_dim=32,
      num_heads=4,
      head_dim=8,
      num_kv_heads=1,
      final_logit_softcap=None,
      use_post_attn_norm=True,
      use_post_ffw_norm=True,
      use_qk_norm=True,
      attention_types=(AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL),
      sliding_window_size=4,
      transpose_gating_einsum=True,
      local_base_frequency=10_000,
      global_base_frequency=1_000_000,
  )
  model = Transformer(config=config, dtype=jnp.float32)
  rng = np.random.default_rng(0)  # token 0 is gemma's padding
  batches = [jnp.asarray(rng.integers(1, 64, (2, 10))) for _ in range(3)]

  def apply(variables, ids):
    with jax.disable_jit():  # Transformer.__call__'s nn.jit, inlined
      return model.apply(variables, ids).logits

  def logits(variables, ids):  # compiled; a new trace for each call
    return jax.jit(lambda v, x: apply(v, x))(variables, ids)

  def init(ids):
    with jax.disable_jit():
      return model.init(jax.random.key(0), ids)

  variables = jax.jit(init)(batches[0])
  return model, apply, logits, variables, batches


def test_full_rank_params_keep_logits(gemma):
  _, apply, logits, variables, batches = gemma
  views, unhandled = ctxlr_linen.find_layers(apply, variables, batches[0])
  assert set(views) == LAYERS
  assert views['layer_0.attn.kv_einsum.w'].einsum_str == 'BSD,CKDH->CBSKH'
  assert views['layer_0.attn.kv_einsum.w'].out_shape == (2, 1, 8)
  assert views['layer_1.attn.attn_vec_einsum.w'].in_shape == (4, 8)
  assert unhandled == {'embedder': 'Embedder: params input_embedding'}
  shapes = ctxlr_linen.select(apply, variables, batches[0])
  assert set(shapes) == LAYERS and shapes['layer_0.mlp.gating_einsum'] == (
      16,
      64,
  )
  exact = {}
  for name in shapes:
    k = np.asarray(
        ctxlr_linen.kernel_matrix(variables, name, views), np.float64
    )
    u, s, vt = np.linalg.svd(k, full_matrices=False)
    exact[name] = (u * s, vt)
  params = ctxlr_linen.factor_params(variables['params'], exact, views)
  assert set(params['layer_0']['attn']['q_einsum']['w']) == {'a', 'b'}
  with ctxlr_linen.factored():
    got = logits({'params': params}, batches[0])
  np.testing.assert_allclose(
      got, logits(variables, batches[0]), rtol=1e-4, atol=1e-5
  )


def test_half_ratio_report_names_and_round_trip(gemma, tmp_path):
  _, apply, logits, variables, batches = gemma
  params, report = ctxlr_linen.compress(
      apply, variables['params'], batches, ratio=0.5
  )
  assert set(report['layers']) == LAYERS  # gemma's own param paths
  own = {
      '.'.join(str(k.key) for k in path)
      for path, _ in jax.tree_util.tree_leaves_with_path(variables['params'])
  }
  assert LAYERS <= own
  assert report['layers']['layer_0.mlp.linear']['rank'] == 5  # 0.5·512/48
  assert report['unhandled'] == {}  # the embedding is excluded by default
  size = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))
  assert size(params) < size(variables['params'])
  assert report['model_ratio'] < 1
  # Saved as gemma's gm.ckpts.save_params does (orbax), read back as written.
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'ckpt', params)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / 'ckpt')
  assert jax.tree.map(jnp.shape, restored) == jax.tree.map(jnp.shape, params)
  with ctxlr_linen.factored():
    before = logits({'params': params}, batches[0])
    after = logits({'params': restored}, batches[0])
  assert before.shape == (2, 10, 64) and np.isfinite(before).all()
  np.testing.assert_array_equal(after, before)


def test_a_cached_nn_jit_hides_the_layers_but_lists_them(gemma):
  model, _, _, variables, batches = gemma
  plain = lambda v, ids: model.apply(v, ids).logits
  plain(variables, batches[0])  # nn.jit's trace cached
  views, unhandled = ctxlr_linen.find_layers(plain, variables, batches[0])
  assert views == {}
  modules = {n.rsplit('.', 1)[0] for n in LAYERS}  # mlp: one module, 2 params
  assert set(unhandled) == modules | {'embedder'}
  assert all('not seen called' in why for why in unhandled.values())
  assert 'gating_einsum, linear' in unhandled['layer_1.mlp']
  with pytest.raises(ValueError, match='not seen called'):
    ctxlr_linen.select(plain, variables, batches[0])
