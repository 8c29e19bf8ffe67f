"""Faults: the main job SIGKILLed at file events, and bad input of every kind
the library used to fail on obscurely or accept silently."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import adapters
from ctxlr import calibration
from ctxlr import pipeline
from ctxlr import stats as stats_lib
from ctxlr import surgery
from ctxlr import training
from ctxlr.linalg import checks
from ctxlr.linalg import qr
from ctxlr.linalg import solvers
from experiments import soak
from tests import toy_model

JOB = 'experiments/configs/compress.py:quick'
# Uniform ranks: all 7 layers factored, so the kill points below all occur
# (the default 'fisher' keeps some layers dense).
OVERRIDES = ('--config.allocation=uniform',)


def _layers_saved(count):
  def event(now, changed, snap):
    del now, changed
    return (
        sum(
            p.startswith(os.path.join('progress', 'layers', ''))
            and p.endswith('.safetensors')
            for p in snap
        )
        >= count
    )

  return event


def _appeared(pattern):
  def event(now, changed, snap):
    del now, snap
    return any(soak.fnmatch.fnmatchcase(p, pattern) for p in changed)

  return event


# Kill points in the order one job meets them; each killed run resumes the
# last one and goes one step further.
KILL_POINTS = (
    ('the statistics file appears', _appeared('progress/stats.safetensors')),
    ('the 4th of 7 layer files appears', _layers_saved(4)),
    ('orbax writes the new model state', _appeared('model/save-*/state*')),
    ('the factors export appears', _appeared('factors.safetensors')),
)


def test_quick_main_job_killed_at_file_events_resumes_identically(tmp_path):
  """Cases 1 and 2 on the real main job: kill right after each file event.

  Every resume must finish with the reference's results.json (timings and
  resume flags aside) and bit-identical factors, recompute no finished
  run-store file, and never find one that does not verify.
  """
  ref_dir = str(tmp_path / 'reference')
  ref = soak.run_once(
      soak.job_command(JOB, ref_dir, OVERRIDES),
      ref_dir,
      log_path=str(tmp_path / 'reference.log'),
  )
  assert ref['outcome'] == 'finished', (tmp_path / 'reference.log').read_text()[
      -3000:
  ]
  reference = soak.outcome_of(ref_dir)
  work = str(tmp_path / 'killed')
  watch = {}
  logs = []
  for i, (label, event) in enumerate(KILL_POINTS):
    logs.append(tmp_path / f'run{i}.log')
    r = soak.run_once(
        soak.job_command(JOB, work, OVERRIDES),
        work,
        kill=event,
        watch=watch,
        log_path=str(logs[-1]),
    )
    assert r['outcome'] == 'killed', (
        label,
        r['outcome'],
        logs[-1].read_text()[-3000:],
    )
    assert r['returncode'] == -signal.SIGKILL
    assert not r['replaced'], f'{label}: finished work redone {r["replaced"]}'
    watch = soak.finished_work_files(work)
  logs.append(tmp_path / 'final.log')
  r = soak.run_once(
      soak.job_command(JOB, work, OVERRIDES),
      work,
      watch=watch,
      log_path=str(logs[-1]),
  )
  assert r['outcome'] == 'finished', logs[-1].read_text()[-3000:]
  assert not r['replaced']
  assert soak.same_outcome(reference, soak.outcome_of(work)) == []
  text = ''.join(p.read_text() for p in logs)
  assert 'Not finished' not in text and 'Traceback' not in text
  assert sorted(e for e in os.listdir(os.path.join(work, 'model'))) == [
      'checkpoint.json',
      'save-000003',
  ]  # 1 and 2 were killed saves


def test_normalize_and_same_outcome_see_real_differences():
  a = dict(
      results=dict(
          x=1,
          seconds=dict(t=1.0),
          layers=dict(l=dict(rel_err=0.5, resumed=True)),
      ),
      factors=dict(w=np.zeros(3, np.float32)),
  )
  b = dict(
      results=dict(
          x=1,
          seconds=dict(t=2.0),
          layers=dict(l=dict(rel_err=0.5, resumed=False)),
      ),
      factors=dict(w=np.zeros(3, np.float32)),
  )
  assert soak.normalize(a['results']) == soak.normalize(b['results'])
  a['results'], b['results'] = (
      soak.normalize(a['results']),
      soak.normalize(b['results']),
  )
  assert soak.same_outcome(a, b) == []
  c = dict(b, factors=dict(w=np.array([0.0, 0.0, 1e-30], np.float32)))
  assert soak.same_outcome(a, c) == ["factors differ in ['w']"]
  d = dict(b, results=dict(b['results'], x=2))
  assert soak.same_outcome(a, d) == ["results.json differs in ['x']"]


def test_soak_summary_and_figure_from_results(tmp_path):
  kills = [
      dict(
          chain=0,
          mode='time',
          at=1.0,
          killed_at=1.2,
          last_event='progress/layers/a.safetensors',
          phase='solving layers',
          recomputed_bytes=0,
          recomputed_files=[],
          survived=True,
      ),
      dict(
          chain=1,
          mode='event',
          at=2.0,
          killed_at=2.5,
          last_event=None,
          phase=soak.phase_of(None),
          recomputed_bytes=10,
          recomputed_files=['x'],
          survived=False,
      ),
  ]
  out = soak.summarize_counts(
      dict(
          job=JOB,
          overrides=[],
          reference_seconds=3.0,
          reference_events=9,
          kills=kills,
          chains=[
              dict(index=0, identical=True, failures=[], differences=[]),
              dict(
                  index=1,
                  identical=False,
                  failures=['run 1 failed: boom'],
                  differences=[],
              ),
          ],
      )
  )
  assert out['totals']['kills_survived'] == 1
  assert out['totals']['recomputed_bytes'] == 10
  soak.results.write_json(str(tmp_path / 'results.json'), out)
  soak.finish(str(tmp_path))
  summary = (tmp_path / 'summary.md').read_text()
  assert 'Kills survived: **1 / 2**' in summary
  assert 'chain 1: run 1 failed: boom' in summary
  assert (tmp_path / 'soak.png').stat().st_size > 0
  assert soak.phase_of('model/save-000001/state/x') == 'saving the model'
  assert soak.phase_of('model') == 'saving the model'
  assert soak.phase_of('config.json.tmp') == 'started'
  assert soak.phase_of('progress') == 'calibrating'
  assert soak.phase_of('progress (removed)') == 'progress removed'
  assert soak.phase_of('progress/layers/x (removed)') == 'progress removed'
  assert soak.phase_of('progress/manifest.json.tmp (removed)') == 'calibrating'
  assert soak.phase_of('progress/.tmpAbC123') == 'saving statistics'
  assert soak.phase_of('progress/layers/.tmpAbC123 (removed)') == (
      'solving layers'
  )
  assert soak.phase_of('.tmpAbC123') == 'exporting factors'
  assert soak.phase_of('layer_errors.png') == 'finishing'
  assert soak.phase_of('progress/stats.safetensors.tmp') == 'saving statistics'


# Case 6: obscure failures, now one clear ValueError each.


def test_mesh_without_a_data_axis_is_named():
  mesh = jax.make_mesh((1,), ('batch',))
  with pytest.raises(
      ValueError,
      match=r"mesh has axes \('batch',\); "
      r"calibration is data-parallel over axis='data'",
  ):
    pipeline.compress(
        toy_model.Toy(), [jnp.zeros((2, 4), jnp.int32)], ratio=0.5, mesh=mesh
    )


def _train(seqs):
  model = toy_model.Toy()
  adapters.add_adapters(
      model, method='lora', rank=2, include=('layers.0.attn.q_proj',)
  )
  tx = training.make_tx(learning_rate=1e-3, steps=2)
  return training.train(
      model, seqs, wrt=adapters.TRAINABLE, tx=tx, steps=2, batch_size=2
  )


def test_train_on_no_sequences_is_a_clear_error():
  with pytest.raises(
      ValueError, match=r'at least one sequence.*got shape ' r'\(0, 8\)'
  ):
    _train(np.zeros((0, 8), np.int32))


def test_adapter_stats_of_the_wrong_shape_name_the_layer():
  model = toy_model.Toy()
  name = 'layers.0.attn.q_proj'
  stats = {name: stats_lib.stats_from_x(jnp.ones((20, 8)))}  # d_in is 16
  with pytest.raises(
      ValueError,
      match=rf'^{name}: stats.r has shape \(8, 8\); expected 16 columns',
  ):
    adapters.add_adapters(model, stats, method='coala', rank=4, include=(name,))


# Case 7: silently accepted, now refused.


def test_include_as_a_string_is_refused():
  with pytest.raises(ValueError, match='sequences of patterns'):
    surgery.select_linears(toy_model.Toy(), include='up')
  with pytest.raises(ValueError, match='sequences of patterns'):
    pipeline.compress(
        toy_model.Toy(),
        [jnp.zeros((2, 4), jnp.int32)],
        ratio=0.5,
        include='layers.0.mlp.up_proj',
    )


def test_ratio_true_is_refused():
  with pytest.raises(ValueError, match='ratio must be in'):
    pipeline.compress(
        toy_model.Toy(), [jnp.zeros((2, 4), jnp.int32)], ratio=True
    )
  for bad in (True, np.bool_(True), '0.5', 0, 1.5, float('nan'), None):
    with pytest.raises(ValueError, match='ratio must be'):
      checks.check_ratio('ratio', bad)
  checks.check_ratio('ratio', 1)
  checks.check_ratio('ratio', np.float32(0.3))


def test_fold_r_with_nan_in_r_is_refused():
  r = jnp.eye(4).at[1, 2].set(jnp.nan)
  with pytest.raises(ValueError, match=r'r contains 1 NaN or Inf'):
    qr.fold_r(r, jnp.ones((3, 4)))


def test_error_of_each_rank_with_a_2d_sigma_is_refused():
  with pytest.raises(
      ValueError, match=r'sigma must be a vector \(1-D\).*' r'\(2, 3\)'
  ):
    solvers.error_of_each_rank(jnp.ones((2, 3)))
  np.testing.assert_allclose(
      solvers.error_of_each_rank(jnp.array([3.0, 4.0])), [5.0, 4.0, 0.0]
  )


def test_train_on_float_sequences_is_refused():
  with pytest.raises(ValueError, match=r'integer token ids.*float32'):
    _train(np.ones((4, 8), np.float32))
  with pytest.raises(ValueError, match=r'int\[n, L\]; got shape \(8,\)'):
    _train(np.ones((8,), np.int32))


def test_relative_norm_survives_float32_overflow():
  big = jnp.full((4, 4), 1e30, jnp.float32)  # ||big||² > float32 max
  assert np.isnan(float(jnp.linalg.norm(big - big / 2) / jnp.linalg.norm(big)))
  assert checks.relative_norm(big - big / 2, big) == pytest.approx(0.5)
  assert checks.relative_norm(jnp.zeros(3), jnp.zeros(3)) == 0.0
  tiny = jnp.full((4, 4), 1e-30, jnp.float32)  # ||tiny||² underflows
  assert checks.relative_norm(tiny / 4, tiny) == pytest.approx(0.25)


def _overflowing_toy():
  """A toy whose MLP inputs are ~1e20: squares overflow float32."""
  model = toy_model.Toy()
  for block in model.layers:
    for name in ('gate_proj', 'up_proj'):
      layer = getattr(block.mlp, name)
      layer.kernel[...] = layer.kernel[...] * 1e10
  return model


def test_rel_err_of_overflowing_activations_is_finite_or_warned(caplog):
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 12))) for _ in range(3)]
  with caplog.at_level('WARNING'):
    report = pipeline.compress(
        _overflowing_toy(), batches, ratio=0.5, include=('*down_proj',)
    )
  errs = {n: l['rel_err'] for n, l in report['layers'].items()}
  bad = [n for n, e in errs.items() if not np.isfinite(e)]
  assert not bad or all(n in caplog.text for n in bad), errs
  assert np.isfinite(errs['layers.0.mlp.down_proj']), errs
