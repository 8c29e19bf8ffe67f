"""Streaming R (ctxlr/linalg/streaming.py) against float64 NumPy QR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr.linalg import qr
from ctxlr.linalg import streaming

D = 16
TOL = {np.float32: 1e-5, np.float64: 1e-12}


reference_r = reference.r_factor
rel_err = reference.r_error


def make_blocks(sizes, d=D, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((b, d)).astype(dtype) for b in sizes]


@pytest.mark.parametrize('block_size', [1, 7, 32, 1000, None])
@pytest.mark.parametrize('sizes', [(1,), (5, 3), (40, 1, 17, 64, 2)])
def test_accumulate_matches_float64_qr(sizes, block_size):
  # Long blocks are split, short ones gathered, the last chunk zero-padded:
  # e.g. 5 + 3 rows with block_size 32 is one chunk of 8 rows and 24 zeros.
  blocks = make_blocks(sizes)
  r = streaming.accumulate_r(iter(blocks), block_size=block_size)
  assert r.shape == (D, D) and r.dtype == jnp.float32
  assert rel_err(r, np.concatenate(blocks)) < TOL[np.float32]
  assert np.all(np.diag(np.asarray(r)) >= 0)
  np.testing.assert_array_equal(np.tril(np.asarray(r), -1), 0)


def test_float64_accumulation():
  blocks = make_blocks((30, 9, 50), dtype=np.float64)
  with jax.enable_x64(True):
    r = streaming.accumulate_r(blocks, block_size=16, dtype=jnp.float64)
    assert r.dtype == jnp.float64
    assert rel_err(r, np.concatenate(blocks)) < TOL[np.float64]


def test_jax_and_bfloat16_blocks():
  blocks = [jnp.asarray(b, jnp.bfloat16) for b in make_blocks((20, 33))]
  r = streaming.accumulate_r(blocks, block_size=24)
  assert r.dtype == jnp.float32  # bf16 storage, float32 accumulation
  x = np.concatenate([np.asarray(b, np.float32) for b in blocks])
  assert rel_err(r, x) < TOL[np.float32]


def test_ill_conditioned_stream_keeps_small_directions():
  # cond(X) = 1e5: a float32 Gram XᵀX would have cond 1e10, beyond float32;
  # the streamed R keeps even the smallest diagonal entry to 1%.
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.standard_normal((400, D)))
  x = (q * np.logspace(0, -5, D)).astype(np.float32)
  r = streaming.accumulate_r(np.split(x, 8), block_size=64)
  expected = reference_r(x)
  np.testing.assert_allclose(
      np.diag(np.asarray(r)), np.diag(expected), rtol=1e-2
  )


def test_generator_is_read_once_and_lazily():
  blocks = make_blocks((10,) * 6)
  seen = []

  def gen():
    for i, b in enumerate(blocks):
      seen.append(i)
      yield b

  acc = streaming.RAccumulator(D, block_size=16)
  it = gen()
  acc.add(next(it))
  assert seen == [0]  # nothing read ahead
  for b in it:
    acc.add(b)
  assert seen == list(range(6)) and acc.num_rows == 60 and acc.num_blocks == 6
  assert rel_err(acc.result(), np.concatenate(blocks)) < TOL[np.float32]


def test_one_compiled_shape_whatever_the_block_sizes():
  d = 23  # a shape no other test uses
  before = qr.fold_r_unchecked._cache_size()
  blocks = make_blocks((1, 5, 90, 3, 31), d=d)
  r = streaming.accumulate_r(blocks, block_size=20)
  assert qr.fold_r_unchecked._cache_size() - before == 1
  assert rel_err(r, np.concatenate(blocks)) < TOL[np.float32]


def test_result_mid_stream_then_continue():
  blocks = make_blocks((13, 8, 21))
  acc = streaming.RAccumulator(D, block_size=16)
  acc.add(blocks[0])
  assert rel_err(acc.result(), blocks[0]) < TOL[np.float32]
  acc.add(blocks[1])
  acc.add(blocks[2])
  assert rel_err(acc.result(), np.concatenate(blocks)) < TOL[np.float32]


def test_bad_block_is_not_folded_and_stream_goes_on():
  blocks = make_blocks((10, 10))
  acc = streaming.RAccumulator(D, block_size=8)
  acc.add(blocks[0])
  bad = blocks[1].copy()
  bad[3, 4] = np.inf
  with pytest.raises(ValueError, match='block 1 contains 1 NaN or Inf'):
    acc.add(bad)
  acc.add(blocks[1])
  assert rel_err(acc.result(), np.concatenate(blocks)) < TOL[np.float32]


def test_fold_padded_under_jit_with_mask():
  blocks = make_blocks((12, 12))
  mask = np.arange(12) < 7  # rows 7.. are padding
  second = blocks[1].copy()
  second[9] = np.nan  # ignored: a padding row
  fold = jax.jit(streaming.fold_padded)
  r, ok0 = fold(jnp.zeros((D, D)), blocks[0], jnp.ones(12, bool))
  r, ok1 = fold(r, second, mask)
  assert bool(ok0) and bool(ok1)
  x = np.concatenate([blocks[0], blocks[1][:7]])
  assert rel_err(r, x) < TOL[np.float32]
  second[2] = np.nan  # a data row: flagged, not raised
  _, ok = fold(r, second, mask)
  assert not bool(ok)
  _, ok = fold(r, second)
  assert not bool(ok)


@pytest.mark.parametrize('blocks', [[], iter(())], ids=['list', 'generator'])
def test_empty_stream_raises(blocks):
  with pytest.raises(ValueError, match='stream is empty'):
    streaming.accumulate_r(blocks)


def test_empty_stream_with_d_raises():
  with pytest.raises(ValueError, match='stream is empty'):
    streaming.accumulate_r([], d=D)


@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_block(value):
  blocks = make_blocks((4, 4, 4))
  blocks[2][1, 1] = value
  with pytest.raises(ValueError, match='block 2 contains 1 NaN or Inf'):
    streaming.accumulate_r(blocks)


@pytest.mark.parametrize(
    'bad,match',
    [
        (
            np.ones((3, D + 1), np.float32),
            'block 1 has shape \\(3, 17\\); ' 'expected d=16',
        ),
        (np.ones((D,), np.float32), 'block 1 must be a matrix'),
        (np.ones((0, D), np.float32), 'block 1 has shape \\(0, 16\\): no rows'),
        (np.ones((3, D), np.int32), 'block 1 must be floating point'),
    ],
)
def test_bad_block_names_its_index(bad, match):
  with pytest.raises(ValueError, match=match):
    streaming.accumulate_r([np.ones((2, D), np.float32), bad])


def test_block_beyond_float32_range():
  big = np.ones((3, D), np.float64)
  big[1, 2] = 1e39  # finite in float64, not float32
  with pytest.raises(
      ValueError, match='block 1 has values beyond the range ' 'of float32'
  ):
    streaming.accumulate_r([np.ones((2, D), np.float64), big])


def test_first_block_not_a_matrix():
  with pytest.raises(ValueError, match='block 0 must be a matrix'):
    streaming.accumulate_r([np.ones(3, np.float32)])


def test_given_d_mismatch():
  with pytest.raises(
      ValueError, match='block 0 has shape \\(2, 16\\); ' 'expected d=8'
  ):
    streaming.accumulate_r([np.ones((2, D), np.float32)], d=8)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(dtype=jnp.bfloat16), 'float32 or float64'),
        (dict(dtype=jnp.float64), '64-bit JAX'),
        (dict(dtype='nonsense'), 'is not a dtype'),
        (dict(block_size=0), 'block_size must be an int >= 1; got 0'),
        (dict(block_size=2.5), 'block_size must be an int'),
        (dict(d=0), 'd must be an int >= 1'),
    ],
)
def test_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    streaming.accumulate_r([np.ones((2, D), np.float32)], **{'d': D, **kwargs})


def test_fold_padded_shape_errors():
  r = jnp.zeros((D, D))
  with pytest.raises(ValueError, match='block has shape \\(4, 8\\)'):
    streaming.fold_padded(r, jnp.ones((4, 8)))
  with pytest.raises(ValueError, match='mask has shape \\(3,\\)'):
    streaming.fold_padded(r, jnp.ones((4, D)), jnp.ones(3, bool))
  with pytest.raises(ValueError, match='r has shape \\(4, 16\\)'):
    streaming.fold_padded(jnp.zeros((4, D)), jnp.ones((4, D)))


def test_default_block_size():
  assert streaming.default_block_size(1536) == 4 * 1536
  assert streaming.default_block_size(16) == 256


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_wide_blocks_into_a_mostly_zero_r(dtype):
  # jaxlib 0.10's float64 CPU geqrf gave NaN for [R; X_block] with R = 0 (or
  # R of 8 rows) and a few wide rows; the fold stacks data first.
  rng = np.random.default_rng(0)
  d = 1024
  blocks = [rng.standard_normal((b, d)) for b in (8, 31, 33)]
  with jax.enable_x64(dtype == 'float64'):
    r = jnp.zeros((d, d), dtype)
    for i, block in enumerate(blocks):
      r = qr.fold_r(r, jnp.asarray(block, dtype))
      x = np.concatenate(blocks[: i + 1])
      tol = 1e-12 if dtype == 'float64' else 1e-5
      assert reference.r_error(np.asarray(r), x) < tol, (i, dtype)
      padded, ok = streaming.fold_padded(
          jnp.zeros((d, d), dtype), jnp.asarray(x, dtype)
      )
      assert bool(ok) and reference.r_error(np.asarray(padded), x) < tol
