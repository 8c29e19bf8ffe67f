"""Training adapters and compressed factors: loss, frozen weights, resume."""

import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctxlr import adapters
from ctxlr import calibration
from ctxlr import results
from ctxlr import surgery
from ctxlr import training
from ctxlr.linalg import qr
from ctxlr.linalg import solvers
from tests import toy_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ids(n=8, length=12, seed=1):
  return np.asarray(
      jax.random.randint(jax.random.key(seed), (n, length), 0, 64), np.int32
  )


def _adapted(method='coala'):
  model = toy_model.Toy()
  ids = _ids()
  layers = surgery.select_linears(model)
  group_stats, group_of = calibration.calibrate(
      model, [ids[:4], ids[4:]], layers, want=calibration.Want(gram=True)
  )
  stats = {n: group_stats[group_of[n]] for n in layers}
  adapters.add_adapters(
      model, stats, method=method, rank=3, general_stats=stats
  )
  return model


def _compressed():
  model = toy_model.Toy()
  for name in surgery.select_linears(model):
    linear = surgery.get_module(model, name)
    x = jax.random.normal(jax.random.key(0), (64, linear.in_features))
    f = solvers.ctx_factors(linear.kernel[...], qr.qr_r(x), rank=4)
    surgery.replace_module(
        model, name, surgery.factored_from_linear(linear, f.a, f.b)
    )
  return model


def test_next_token_loss_matches_float64_reference():
  model = toy_model.Toy()
  ids = _ids(3, 7)
  logits = np.asarray(model(jnp.asarray(ids)), np.float64)[:, :-1]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
  np.testing.assert_allclose(
      training.next_token_loss(model, ids), expected, rtol=1e-5
  )


@pytest.mark.parametrize('kind', ('adapters', 'healing'))
def test_one_step_lowers_the_loss_and_changes_only_what_it_trains(kind):
  model = _adapted() if kind == 'adapters' else _compressed()
  wrt = (
      adapters.TRAINABLE
      if kind == 'adapters'
      else training.factor_filter(model)
  )
  ids = jnp.asarray(_ids(4))
  before = nnx.to_flat_state(nnx.clone(nnx.state(model)))
  trained = {p for p, _ in nnx.to_flat_state(nnx.state(model, wrt))}
  assert trained and all(p[-1] in ('a', 'b') for p in trained)
  if kind == 'healing':  # every factor, nothing else (o_proj's bias stays)
    assert len(trained) == 2 * 14
  loss0 = float(training.next_token_loss(model, ids))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=wrt)
  loss, gnorm = training.train_step(model, optimizer, ids)
  assert float(loss) == pytest.approx(loss0, rel=1e-6) and gnorm > 0
  assert float(training.next_token_loss(model, ids)) < loss0
  after = dict(nnx.to_flat_state(nnx.state(model)))
  for path, value in before:
    changed = not np.array_equal(value[...], after[path][...])
    assert changed == (path in trained), path


def _train(model, steps, **kwargs):
  tx = training.make_tx(
      learning_rate=1e-2,
      steps=6,
      warmup_steps=2,
      clip_norm=1.0,
      weight_decay=1e-3,
  )
  return training.train(
      model,
      _ids(10),
      wrt=adapters.TRAINABLE,
      tx=tx,
      steps=steps,
      batch_size=3,
      eval_every=2,
      log_every=1,
      eval_fn=lambda m: dict(
          loss=float(training.next_token_loss(m, jnp.asarray(_ids(4, seed=9))))
      ),
      **kwargs,
  )


def test_resume_from_a_checkpoint_continues_identically(tmp_path):
  straight = _adapted()
  expected = _train(straight, 6)
  ckpt = str(tmp_path / 'ckpt')
  _train(_adapted(), 4, checkpoint_dir=ckpt, checkpoint_every=2)
  resumed = _adapted()  # a fresh process would build this
  history = _train(resumed, 6, checkpoint_dir=ckpt, checkpoint_every=2)
  assert [r['step'] for r in history['train']] == list(range(1, 7))
  assert [r['step'] for r in history['eval']] == [0, 2, 4, 6]
  for key in ('train', 'eval'):
    for got, want in zip(history[key], expected[key]):
      assert {k: v for k, v in got.items() if k != 'seconds'} == {
          k: v for k, v in want.items() if k != 'seconds'
      }
  for (path, got), (_, want) in zip(
      nnx.to_flat_state(nnx.state(resumed)),
      nnx.to_flat_state(nnx.state(straight)),
  ):
    np.testing.assert_array_equal(got[...], want[...], err_msg=str(path))


def test_make_tx_schedule_and_errors():
  tx = training.make_tx(
      learning_rate=1.0, steps=10, warmup_steps=2, clip_norm=1e9
  )
  params = dict(w=jnp.zeros(()))
  state = tx.init(params)
  grads = dict(w=jnp.ones(()))
  steps = []
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    steps.append(float(-updates['w']))
  # Adam's first updates are ±lr (up to its eps): 0, 0.5, 1 in the warm-up.
  np.testing.assert_allclose(steps, [0.0, 0.5, 1.0], rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='warmup_steps < steps'):
    training.make_tx(learning_rate=1.0, steps=5, warmup_steps=5)
  with pytest.raises(ValueError, match='no FactoredLinear'):
    training.factor_filter(toy_model.Toy())


def test_batch_at_cycles():
  seqs = np.arange(5)[:, None] * np.ones((1, 3), np.int32)
  np.testing.assert_array_equal(training.batch_at(seqs, 1, 3)[:, 0], [3, 4, 0])


def _launch(*args):
  return subprocess.run(
      [sys.executable, 'launch.py', *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=900,
  )


def _finished_run(name, method, lr, seed, val):
  """A finished run as results.json records it (eval rows at 0, 2, 4)."""
  return dict(
      run=name,
      method=method,
      split='own',
      mu=0.0,
      mu_rule='energy',
      examples=4,
      learning_rate=lr,
      seed=seed,
      stage='grid',
      trainable=1,
      median_mu=0.0,
      eval=[
          dict(step=s, ppl_sotu=p, ppl_wikipedia=p)
          for s, p in ((0, 9.0), (2, 8.0), (4, 7.0))
      ],
      val=dict(ppl_sotu=val, ppl_wikipedia=val),
      train=[dict(step=s, loss=1.0, seconds=0.1) for s in range(1, 5)],
  )


def test_finetune_adapters_quick(tmp_path):
  # One launch: a finished run already in results.json is kept and skipped
  # (a rerun's resume), the grid and seeds at 4 examples, then an
  # example-sweep point (2 examples) at the rates chosen at 4, no grid.
  kept = _finished_run('lora', 'lora', 1e-3, 0, val=1e12)  # never chosen
  results.write_json(
      str(tmp_path / 'results.json'), dict(runs=[kept], inits={})
  )
  proc = _launch(
      '--config=experiments/configs/finetune_adapters.py:quick',
      f'--workdir={tmp_path}',
      '--config.sweep.examples=(2,)',
      "--config.sweep.only=('coala_energy_balanced',)",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  assert out['runs'][0] == kept
  labels = ['lora', 'coala_energy_balanced', 'coala_kpa_balanced']
  assert list(dict.fromkeys(r['run'] for r in out['runs'])) == labels
  main = [r for r in out['runs'] if r['examples'] == 4]
  by_label = {n: [r for r in main if r['run'] == n] for n in labels}
  chosen = {}
  for name, runs in by_label.items():
    # The grid (1e-3, 3e-3) on seed 0, then seed 1 at the chosen rate,
    # chosen on the validation set; lora's 1e-3 run is the kept one.
    grid = {r['learning_rate']: r for r in runs if r['stage'] == 'grid'}
    assert len(runs) == 3 and sorted(grid) == [1e-3, 3e-3]
    assert all(r['seed'] == 0 for r in grid.values())
    chosen[name] = min(grid, key=lambda lr: grid[lr]['val']['ppl_sotu'])
    (other,) = [r for r in runs if r['stage'] == 'seeds']
    assert (other['seed'], other['learning_rate']) == (1, chosen[name])
    for r in runs:
      assert [e['step'] for e in r['eval']] == [0, 2, 4]
      assert r['eval'][-1]['ppl_sotu'] < r['eval'][0]['ppl_sotu']
  assert chosen['lora'] == 3e-3
  mu = by_label['coala_energy_balanced'][0]
  assert (mu['method'], mu['split'], mu['mu_rule']) == (
      'coala',
      'balanced',
      'energy',
  )
  assert mu['mu'] == 1.0 and mu['median_mu'] > 0
  assert by_label['lora'][1]['median_mu'] == 0
  # 4 examples of 8 tokens: every layer's X is short of data (32 < 576).
  (flags,) = out['inits']['4']['by_width'].values()
  assert flags['short'] == flags['layers'] == 4
  assert out['inits']['4']['tokens'] == 32
  assert out['inits']['2']['tokens'] == 16
  # The sweep point: both seeds at the rate chosen at 4 examples.
  sweep = [r for r in out['runs'] if r['examples'] == 2]
  assert [(r['run'], r['seed'], r['stage']) for r in sweep] == [
      ('coala_energy_balanced', 0, 'seeds'),
      ('coala_energy_balanced', 1, 'seeds'),
  ]
  assert {r['learning_rate'] for r in sweep} == {
      chosen['coala_energy_balanced']
  }
  assert out['runs'][-len(sweep) :] == sweep  # after the main count
  summary = (tmp_path / 'summary.md').read_text()
  assert '| coala_kpa_balanced |' in summary and 'target' in summary
  assert '## Init examples sweep' in summary
  assert not os.listdir(tmp_path / 'checkpoints')  # removed when done
  for png in ('finetune_curves.png', 'examples_sweep.png'):
    assert (tmp_path / png).stat().st_size > 0


def test_heal_quick(tmp_path):
  proc = _launch(
      '--config=experiments/configs/heal.py:quick', f'--workdir={tmp_path}'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  grid = [r for r in out['runs'] if r['stage'] == 'grid']
  assert [(r['run'], r['learning_rate'], r['seed']) for r in grid] == [
      ('coala', 1e-3, 0),
      ('coala', 2e-3, 0),
      ('coala_balanced', 1e-3, 0),
      ('coala_balanced', 2e-3, 0),
  ]
  for name in ('coala', 'coala_balanced'):  # seed 1 at the chosen rate
    mine = [r for r in grid if r['run'] == name]
    chosen = min(mine, key=lambda r: r['val'])['learning_rate']
    (seeded,) = [
        r for r in out['runs'] if r['run'] == name and r['stage'] == 'seeds'
    ]
    assert (seeded['seed'], seeded['learning_rate']) == (1, chosen)
  assert [r['split'] for r in grid] == ['own', 'own', 'balanced', 'balanced']
  first = [r['eval'][0]['ppl_wikipedia'] for r in grid]
  assert first[0] == pytest.approx(first[2], rel=1e-4)  # same products
  for r in out['runs']:
    assert r['eval'][-1]['ppl_wikipedia'] < r['eval'][0]['ppl_wikipedia']
    assert 0.55 < r['kept_ratio'] <= 0.6
  assert '± ' in (tmp_path / 'summary.md').read_text()
  assert (tmp_path / 'heal_curves.png').stat().st_size > 0
