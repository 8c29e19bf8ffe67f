"""The run store: self-verifying files, not-finished files recomputed,
run identity (options, model, calibration data by content)."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ctxlr import pipeline
from ctxlr import stats as stats_lib
from ctxlr import store as store_lib
from tests import toy_model

FP = dict(kernels='k', method='coala', ratio=0.5)


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.integers(0, 64, (2, 12))) for _ in range(3)]


def _layer(seed, shape=(6, 2)):
  rng = np.random.default_rng(seed)
  return dict(
      a=rng.standard_normal(shape).astype(np.float32),
      b=rng.standard_normal(shape[::-1]).astype(np.float32),
      rank=shape[1],
      rel_err=0.25 + seed,
      data_rank=6,
      tokens=10,
  )


def _flip(path, offset_from_end=8, count=4):
  with open(path, 'r+b') as f:
    f.seek(-offset_from_end, os.SEEK_END)
    data = f.read(count)
    f.seek(-offset_from_end, os.SEEK_END)
    f.write(bytes(b ^ 0xFF for b in data))


def test_write_verified_round_trip_and_every_kind_of_damage(tmp_path):
  path = str(tmp_path / 'x.safetensors')
  tensors = dict(
      w=np.arange(6, dtype=np.float32).reshape(2, 3), s=np.asarray(2.5)
  )
  size = store_lib.write_verified(
      path, tensors, name='layer x', metadata=dict(note='hi')
  )
  assert size == os.path.getsize(path)
  assert not os.path.exists(path + '.tmp')
  got, meta = store_lib.read_verified(path, name='layer x')
  assert meta == dict(note='hi') and sorted(got) == ['s', 'w']
  np.testing.assert_array_equal(got['w'], tensors['w'])
  assert got['s'].shape == ()
  with pytest.raises(
      store_lib.CorruptFileError, match="holds 'layer x', " "not 'layer y'"
  ):
    store_lib.read_verified(path, name='layer y')
  _flip(path)  # bytes of a tensor
  with pytest.raises(
      store_lib.CorruptFileError, match=r'x.safetensors is corrupt: the SHA-256'
  ):
    store_lib.read_verified(path)
  store_lib.write_verified(path, tensors, name='layer x')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 3)
  with pytest.raises(store_lib.CorruptFileError, match='truncated'):
    store_lib.read_verified(path)
  safetensors.numpy.save_file(tensors, path)  # no checksum
  with pytest.raises(store_lib.CorruptFileError, match='no ctxlr checksum'):
    store_lib.read_verified(path)
  # Same tensors, another dtype or shape: another checksum.
  d = store_lib.tensors_digest(dict(w=tensors['w']), name='n', metadata={})
  assert d != store_lib.tensors_digest(
      dict(w=tensors['w'].reshape(3, 2)), name='n', metadata={}
  )
  assert d != store_lib.tensors_digest(
      dict(w=tensors['w'].view(np.int32)), name='n', metadata={}
  )


def test_a_file_that_appears_is_finished_and_leftovers_are_removed(tmp_path):
  """Case 1: the file is the commit: no second (checksum) file to wait for."""
  store = store_lib.RunStore(str(tmp_path), FP)
  store.save_layer('l0', _layer(0))
  files = sorted(os.listdir(tmp_path / 'layers'))
  assert files == ['l0.safetensors']  # nothing beside it
  (tmp_path / 'layers' / 'l1.safetensors.tmp').write_bytes(b'half a file')
  (tmp_path / 'stats.safetensors.tmp').write_bytes(b'half')
  (tmp_path / 'layers' / '.tmpAbC123').write_bytes(b'safetensors own')
  again = store_lib.RunStore(str(tmp_path), FP)  # a resumed run
  assert again.finished_layers() == ['l0']
  assert sorted(os.listdir(tmp_path / 'layers')) == ['l0.safetensors']
  assert not (tmp_path / 'stats.safetensors.tmp').exists()
  got = again.load_layer('l0')
  np.testing.assert_array_equal(got['a'], _layer(0)['a'])
  assert got['rel_err'] == 0.25 and got['rank'] == 2


def test_swapped_layer_files_are_not_finished(tmp_path, caplog):
  """Case 5: a checksum is bound to its layer: swapped files are redone."""
  store = store_lib.RunStore(str(tmp_path), FP)
  store.save_layer('l0', _layer(0))
  store.save_layer('l1', _layer(1))
  store.save_layer('l2', _layer(2))
  p0, p1 = (str(tmp_path / 'layers' / f'l{i}.safetensors') for i in (0, 1))
  os.rename(p0, p0 + '.x')
  os.rename(p1, p0)
  os.rename(p0 + '.x', p1)
  store = store_lib.RunStore(str(tmp_path), FP)
  with caplog.at_level(logging.WARNING):
    assert store.finished_layers() == ['l2']
  assert sorted(store.not_finished) == [p0, p1]
  assert "holds 'layer l1', not 'layer l0'" in caplog.text
  with pytest.raises(store_lib.CorruptFileError):
    store.load_layer('l0')


def test_corrupt_or_truncated_stats_are_recomputed(tmp_path, caplog):
  stats = {
      'g': stats_lib.LayerStats(
          r=np.eye(3, dtype=np.float32), gram=None, abs_sum=None, count=5
      )
  }
  store = store_lib.RunStore(str(tmp_path), FP)
  store.save_stats(stats, {'l0': 'g'})
  assert store_lib.RunStore(str(tmp_path), FP).has_stats()
  loaded, group_of = store_lib.RunStore(str(tmp_path), FP).load_stats()
  np.testing.assert_array_equal(loaded['g'].r, np.eye(3))
  assert loaded['g'].count == 5 and group_of == {'l0': 'g'}
  _flip(store.stats_path)
  fresh = store_lib.RunStore(str(tmp_path), FP)
  with caplog.at_level(logging.WARNING):
    assert not fresh.has_stats()
  assert 'Not finished, recomputing' in caplog.text
  assert 'stats.safetensors is corrupt' in caplog.text
  with open(store.stats_path, 'r+b') as f:
    f.truncate(40)
  assert not store_lib.RunStore(str(tmp_path), FP).has_stats()


def test_layer_names_with_a_slash_round_trip(tmp_path):
  """Case 6: a '/' in a layer name is quoted into the file name."""
  store = store_lib.RunStore(str(tmp_path), FP)
  store.save_layer('blocks/0.attn', _layer(0))
  store.save_layer('weird%name', _layer(1))
  assert sorted(os.listdir(tmp_path / 'layers')) == [
      'blocks%2F0.attn.safetensors',
      'weird%25name.safetensors',
  ]
  again = store_lib.RunStore(str(tmp_path), FP)
  assert again.finished_layers() == ['blocks/0.attn', 'weird%name']
  np.testing.assert_array_equal(
      again.load_layer('blocks/0.attn')['b'], _layer(0)['b']
  )
  with pytest.raises(ValueError, match='non-empty str'):
    again.save_layer('', _layer(0))


def test_damaged_or_old_manifest_is_a_clear_error(tmp_path):
  """Case 6: a truncated manifest.json names itself, not a JSONDecodeError."""
  store_lib.RunStore(str(tmp_path), FP)
  manifest = tmp_path / 'manifest.json'
  text = manifest.read_text()
  manifest.write_text(text[: len(text) // 2])
  with pytest.raises(
      ValueError,
      match=r'manifest.json is damaged \(.*is '
      r'not valid JSON.*delete .* to start over',
  ):
    store_lib.RunStore(str(tmp_path), FP)
  manifest.write_text(json.dumps(FP))  # a store of the old format
  with pytest.raises(ValueError, match='not a run store of this version'):
    store_lib.RunStore(str(tmp_path), FP)


def test_other_options_are_refused(tmp_path):
  store_lib.RunStore(str(tmp_path), FP)
  with pytest.raises(ValueError, match=r"differs in \['ratio'\]"):
    store_lib.RunStore(str(tmp_path), dict(FP, ratio=0.6))


def test_batch_fingerprint_tells_data_apart():
  a, b = _batches(0), _batches(1)
  assert store_lib.fingerprint_batches(a) == store_lib.fingerprint_batches(
      [np.asarray(x) for x in a]
  )  # JAX or NumPy: same
  assert store_lib.fingerprint_batches(a) != store_lib.fingerprint_batches(b)
  assert store_lib.fingerprint_batches(a) != store_lib.fingerprint_batches(
      a[:2]
  )
  assert store_lib.fingerprint_batches(a) != store_lib.fingerprint_batches(
      [x.astype(jnp.float32) for x in a]
  )
  assert store_lib.fingerprint_batches(a) != store_lib.fingerprint_batches(
      [x.reshape(4, 6) for x in a]
  )
  assert store_lib.fingerprint_batches(a) != store_lib.fingerprint_batches(
      a[::-1]
  )
  fp = store_lib.BatchFingerprint()
  for x in a:
    fp.update(x)
  assert fp.hexdigest() == store_lib.fingerprint_batches(a) and fp.count == 3
  trees = [dict(ids=x, mask=x > 3) for x in a]
  assert store_lib.fingerprint_batches(trees) != store_lib.fingerprint_batches(
      [dict(ids=x, other=x > 3) for x in a]
  )


def test_fingerprinted_hashes_on_the_way_and_refuses_a_partial_pass():
  a = _batches(0)
  wrapped = store_lib.fingerprinted(a)
  assert len(wrapped) == 3
  assert [id(x) for x in wrapped] == [id(x) for x in a]  # same objects
  assert wrapped.hexdigest() == store_lib.fingerprint_batches(a)
  unread = store_lib.fingerprinted(iter(a))  # never read: reads itself
  assert unread.hexdigest() == store_lib.fingerprint_batches(a)
  partial = store_lib.fingerprinted(iter(a))
  next(iter(partial))
  with pytest.raises(ValueError, match='read part of the way only'):
    partial.hexdigest()
  gen = store_lib.fingerprinted(x for x in a)  # a second pass reads
  list(gen)  # nothing: the first counts
  list(gen)
  assert gen.hexdigest() == store_lib.fingerprint_batches(a)


def test_new_data_in_a_reused_directory_are_refused(tmp_path, caplog):
  """Case 4 (store level): data bound by content; other data refused."""
  store = store_lib.RunStore(str(tmp_path), FP)
  store.save_layer('early', _layer(0))  # before any binding
  store.bind_data(store_lib.fingerprinted(_batches(0)).hexdigest())
  store.save_layer('l0', _layer(1))
  again = store_lib.RunStore(str(tmp_path), FP)
  again.bind_data(store_lib.fingerprint_batches(_batches(0)))  # same data
  with caplog.at_level(logging.WARNING):
    assert again.finished_layers() == ['l0']  # 'early': unknown data
  assert 'written for another run' in caplog.text
  with pytest.raises(ValueError, match='made for other calibration data'):
    store_lib.RunStore(str(tmp_path), FP).bind_data(
        store_lib.fingerprint_batches(_batches(1))
    )
  with pytest.raises(ValueError, match='non-empty str'):
    again.bind_data('')


def test_compress_recomputes_a_corrupt_layer_to_the_same_factors(tmp_path):
  """Per-artifact corruption, end to end: a flipped layer file is redone."""
  ckpt = str(tmp_path / 'run')
  first = toy_model.Toy()
  pipeline.compress(
      first, _batches(), ratio=0.5, checkpoint_dir=ckpt, data_id={'seed': 0}
  )
  path = os.path.join(ckpt, 'layers', 'layers.0.attn.q_proj.safetensors')
  _flip(path, offset_from_end=16)
  os.remove(os.path.join(ckpt, 'stats.safetensors'))
  second = toy_model.Toy()
  pipeline.compress(
      second, _batches(), ratio=0.5, checkpoint_dir=ckpt, data_id={'seed': 0}
  )
  for layer in ('layers.0.attn.q_proj', 'layers.1.mlp.up_proj'):
    got = second.layers[int(layer[7])]
    want = first.layers[int(layer[7])]
    for part in layer.split('.')[2:]:
      got, want = getattr(got, part), getattr(want, part)
    np.testing.assert_array_equal(got.a[...], want.a[...])
    np.testing.assert_array_equal(got.b[...], want.b[...])
  store_lib.read_verified(path)  # rewritten, valid


def test_compress_with_new_data_in_a_reused_directory_is_refused(tmp_path):
  """Case 4 end to end: the default (no data_id) must tell data apart."""
  ckpt = str(tmp_path / 'run')
  pipeline.compress(
      toy_model.Toy(), _batches(0), ratio=0.5, checkpoint_dir=ckpt
  )
  with pytest.raises(ValueError, match='made for other calibration data'):
    pipeline.compress(
        toy_model.Toy(), _batches(1), ratio=0.5, checkpoint_dir=ckpt
    )
