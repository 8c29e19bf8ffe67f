"""A model built only from flax's own NNX layers, compressed as it is.

`nnx.MultiHeadAttention` (its projections are `nnx.LinearGeneral`), an
`nnx.Linear` MLP and `nnx.LayerNorm`, blocks stacked with `nnx.vmap` and
applied with `nnx.scan`; none of it written for ctxlr.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import ctxlr
from ctxlr import checkpoint
from ctxlr import surgery


class Block(nnx.Module):

  def __init__(self, d: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=2, in_features=d, decode=False, rngs=rngs
    )
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm(x))
    return x + self.down(nnx.gelu(self.up(x)))


class Encoder(nnx.Module):

  def __init__(self, vocab=40, d=16, layers=2, *, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(vocab, d, rngs=rngs)

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(d, rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, ids):
    h = nnx.scan(
        lambda h, block: block(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry
    )(self.embed(ids), self.blocks)
    return self.head(h)


def _batches():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.integers(0, 40, (2, 12))) for _ in range(3)]


def test_full_rank_surgery_keeps_outputs():
  model = Encoder()
  ids = _batches()[0]
  before = model(ids)
  exact = {}
  for name in surgery.select_linears(model):
    k = np.asarray(surgery.kernel_matrix(model, name), np.float64)
    u, s, vt = np.linalg.svd(k, full_matrices=False)
    exact[name] = (u * s, vt)
  surgery.apply_factors(model, exact)
  assert isinstance(model.blocks.attn.query, surgery.FactoredLinear)
  np.testing.assert_allclose(model(ids), before, rtol=1e-4, atol=1e-4)


def test_half_ratio_report_names_and_round_trip(tmp_path):
  model = Encoder()
  report = ctxlr.compress(model, _batches(), ratio=0.5)
  names = set(report['layers'])
  assert {
      'blocks.attn.query[0]',
      'blocks.attn.key[1]',
      'blocks.attn.out[0]',
      'blocks.up[1]',
      'blocks.down[0]',
  } <= names
  assert len(names) == 2 * 6 and report['unhandled'] == {}
  assert report['layers']['blocks.attn.out[1]']['rank'] == 4  # 0.5·256/32
  assert report['layers']['blocks.attn.query[0]']['tokens'] == 72
  assert 0.45 < report['kept_ratio'] <= 0.5 and report['model_ratio'] < 1
  ids = _batches()[1]
  logits = model(ids)
  checkpoint.save(model, str(tmp_path / 'ckpt'))
  restored = checkpoint.load(str(tmp_path / 'ckpt'), Encoder)
  assert restored.blocks.attn.value.a.shape == model.blocks.attn.value.a.shape
  np.testing.assert_array_equal(restored(ids), logits)


def _stored_params(model, names) -> int:
  """Numbers the layers' modules hold (factors or kernels, whole stacks)."""
  total = 0
  for module in dict.fromkeys(surgery.split_name(n)[0] for n in names):
    layer = surgery.get_module(model, module)
    if isinstance(layer, surgery.FactoredLinear):
      total += layer.a.value.size + layer.b.value.size
    else:
      total += layer.kernel.value.size
  return total


def test_allocations_give_a_stack_one_rank_and_a_true_kept_ratio():
  """Allocations that read the error curves tie a stack's layers (one
  FactoredLinear stores one rank), so the reported kept ratio is what the
  model holds."""
  dense = Encoder(layers=3)
  names = surgery.select_linears(dense)
  before = _stored_params(dense, names)
  assert before == sum(a * b for a, b in names.values())
  for allocation in ('global', 'global_dense', 'svd_llm_v2', 'fisher'):
    model = nnx.clone(dense)
    report = ctxlr.compress(model, _batches(), ratio=0.6, allocation=allocation)
    for module in ('blocks.attn.query', 'blocks.up', 'blocks.down'):
      ranks = {report['layers'][f'{module}[{i}]']['rank'] for i in range(3)}
      assert len(ranks) == 1, (allocation, module, ranks)
    np.testing.assert_allclose(
        _stored_params(model, names) / before, report['kept_ratio'], rtol=1e-9
    )
    assert report['kept_ratio'] <= 0.6


class Unrolled(nnx.Module):
  """The Encoder's blocks as a Python list: the same function, no stack."""

  def __init__(self, encoder: Encoder, layers: int):
    graphdef, state = nnx.split(encoder.blocks)
    self.embed, self.head = encoder.embed, encoder.head
    self.blocks = nnx.List(
        [
            nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
            for i in range(layers)
        ]
    )

  def __call__(self, ids):
    h = self.embed(ids)
    for block in self.blocks:
      h = block(h)
    return self.head(h)


def test_loss_gradient_energy_of_stacked_layers_is_the_unrolled_models():
  from ctxlr import sensitivity  # pylint: disable=g-import-not-at-top

  model = Encoder(layers=2)
  unrolled = Unrolled(nnx.clone(model), 2)
  ids = _batches()[:2]
  np.testing.assert_allclose(unrolled(ids[0]), model(ids[0]), atol=1e-5)
  names = ['blocks.up[0]', 'blocks.up[1]', 'blocks.attn.query[1]']
  stacked = sensitivity.output_gradient_energy(model, ids, names)
  flat = sensitivity.output_gradient_energy(
      unrolled, ids, ['blocks.0.up', 'blocks.1.up', 'blocks.1.attn.query']
  )
  for name, ref in zip(names, flat.values()):
    assert stacked[name].tokens == ref.tokens
    np.testing.assert_allclose(stacked[name].channel, ref.channel, rtol=1e-4)
