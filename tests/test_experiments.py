"""The experiments run through launch.py as a user runs them (quick sizes),
their configs' validation and the method variants of experiments/common.py."""

import glob
import importlib
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctxlr import results
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, 'experiments', 'configs', '*.py'))
    if not p.endswith('__init__.py')
)


def _launch(*args, timeout=600):
  proc = subprocess.run(
      [sys.executable, 'launch.py', *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  return proc


def test_solver_demo_with_override(tmp_path):
  proc = _launch(
      '--config=experiments/configs/solver_demo.py:quick',
      f'--workdir={tmp_path}',
      '--config.cond=1e3',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert results.read_json(str(tmp_path / 'config.json'))['cond'] == 1e3
  rows = results.read_json(str(tmp_path / 'results.json'))
  ctx = [r for r in rows if r['method'] == 'coala']
  assert ctx and all(r['excess'] < 2e-6 for r in ctx)
  assert (tmp_path / 'error_vs_rank.png').stat().st_size > 0
  assert '| coala |' in (tmp_path / 'summary.md').read_text()


def test_locked_config_rejects_typos(tmp_path):
  proc = _launch(
      '--config=experiments/configs/solver_demo.py:quick',
      f'--workdir={tmp_path}',
      '--config.cnd=1e3',
  )
  assert proc.returncode != 0 and 'cond' in proc.stderr


def test_compress_quick_end_to_end(tmp_path):
  proc = _launch(
      '--config=experiments/configs/compress.py:quick', f'--workdir={tmp_path}'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  assert set(out['dense']) == set(out['compressed']) == {'wikipedia', 'sotu'}
  assert 0.75 < out['kept_ratio'] <= 0.8
  assert out['allocation'] == 'fisher'  # the recommended pipeline
  assert out['calib_mixture'] == {'wikipedia': 1.0, 'sotu': 1.0}
  layers = out['layers']
  factored = [l for l in layers.values() if l['rank'] is not None]
  assert len(layers) == 7 and factored  # fisher may keep some dense
  assert all(0 < l['rel_err'] < 1 for l in factored)
  for name in (
      'summary.md',
      'layer_errors.png',
      'factors.safetensors',
      'model/checkpoint.json',
      'dense.json',
  ):
    assert (tmp_path / name).exists(), name
  assert not (tmp_path / 'progress').exists()  # removed after success
  assert out['wall_seconds'] > 0 and out['disk_bytes'] > 0
  again = _launch(  # the same job again, now with the healing stage
      '--config=experiments/configs/compress.py:quick',
      f'--workdir={tmp_path}',
      '--config.save=False',
      '--config.heal.enabled=True',
      '--config.heal.steps=3',
      '--config.heal.seq_len=32',
      '--config.heal.num_tokens=1024',
      '--config.heal.eval_every_seconds=1e-3',
  )
  assert again.returncode == 0, again.stderr[-3000:]
  rerun = results.read_json(str(tmp_path / 'results.json'))
  assert rerun['dense_eval_reused'] and rerun['dense'] == out['dense']
  for corpus, row in out['compressed'].items():  # same data, same result
    assert rerun['compressed'][corpus]['perplexity'] == row['perplexity']
  assert rerun['heal']['steps'] == 3 and len(rerun['heal']['eval']) >= 1
  assert set(rerun['healed']) == {'wikipedia', 'sotu'}
  assert rerun['seconds']['heal'] > 0
  assert (tmp_path / 'heal_curve.png').stat().st_size > 0
  assert 'healed_to_dense' in (tmp_path / 'summary.md').read_text()


def test_compare_methods_quick_and_resume(tmp_path):
  args = (
      '--config=experiments/configs/compare_methods.py:quick',
      f'--workdir={tmp_path}',
  )
  proc = _launch(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  rows = {r['run']: r for r in out['rows']}
  assert set(rows) == {'recommended', 'svd_llm'}
  assert [r['method'] for r in out['rows']] == ['coala', 'svd_llm']
  assert rows['recommended']['allocation'] == 'fisher'
  assert rows['svd_llm']['mode'] == 'sequential'
  assert rows['recommended']['ppl_wikipedia'] > out['dense']['wikipedia']
  # fisher allocation (the layers' loss gradients, cached) meets the budget
  assert abs(rows['recommended']['kept_ratio'] - 0.8) < 0.01
  assert (tmp_path / 'sensitivity.json').exists()
  assert (tmp_path / 'perplexity_vs_ratio.png').exists()
  again = _launch(*args)  # finished rows are not redone
  assert again.returncode == 0, again.stderr[-3000:]
  assert results.read_json(str(tmp_path / 'results.json')) == out


def test_calibration_curve_quick_and_resume(tmp_path):
  args = (
      '--config=experiments/configs/calibration_curve.py:quick',
      f'--workdir={tmp_path}',
  )
  proc = _launch(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  assert [(r['run'], r['num_tokens']) for r in out['rows']] == [
      ('recommended', 128),
      ('recommended', 256),
  ]
  assert [(c['start'], c['stop']) for c in out['chunks']] == [
      (0, 128),
      (128, 256),
  ]
  assert all(c['peak_rss_bytes'] > 0 for c in out['chunks'])
  assert (tmp_path / 'calibration_curve.png').stat().st_size > 0
  again = _launch(*args)  # every size kept: nothing recalibrated
  assert again.returncode == 0, again.stderr[-3000:]
  assert results.read_json(str(tmp_path / 'results.json')) == out


def test_calibration_curve_merge_is_the_r_of_all_rows():
  from ctxlr import stats as stats_lib  # pylint: disable=g-import-not-at-top
  from experiments import calibration_curve  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x1, x2 = rng.standard_normal((40, 6)), 1e3 * rng.standard_normal((9, 6))
  part = lambda x: stats_lib.stats_from_x(jnp.asarray(x, jnp.float32))
  one, two = part(x1), part(x2)
  merged = calibration_curve.merge(dict(a=one, b=one), dict(a=two, b=two))
  assert merged['a'] is merged['b'] and merged['a'].count == 49
  want = np.linalg.qr(np.vstack([x1, x2]), mode='r')
  want *= np.sign(np.diag(want))[:, None]  # R up to row signs
  np.testing.assert_allclose(merged['a'].r, want, rtol=2e-5, atol=2e-5 * 1e3)


def test_ablation_quick(tmp_path):
  proc = _launch(
      '--config=experiments/configs/ablation.py:quick', f'--workdir={tmp_path}'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  labels = {r['label'] for r in out['rows']}
  assert {'coala', 'fisher', 'power_1'} <= labels
  memory = out['calibration_memory']['tiny']
  assert memory['peak_rss_bytes'] > memory['statistics_bytes'] > 0
  assert out['heal']['eval'] and (tmp_path / 'ablation.png').exists()


def test_calibration_sweep_quick(tmp_path):
  proc = _launch(
      '--config=experiments/configs/calibration_sweep.py:quick',
      f'--workdir={tmp_path}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = results.read_json(str(tmp_path / 'results.json'))['rows']
  # K_* (float64 statistics) only where the data are short (<= 32 tokens).
  assert {(r['run'], r['num_tokens']) for r in rows} == {
      (run, n)
      for run in ('coala', 'coala_mu_0p01', 'svd_llm_eps')
      for n in (32, 128)
  } | {('k_star', 32)}
  ridge = [r for r in rows if r['run'] == 'coala_mu_0p01']
  assert {(r['method'], r['mu']) for r in ridge} == {('coala', 0.01)}
  short = [r for r in rows if r['num_tokens'] == 32]
  assert all(r['insufficient_layers'] > 0 for r in short)
  assert {r['stats_dtype'] for r in short} == {'float64'}
  star = next(r for r in short if r['run'] == 'k_star')
  assert np.isfinite(star['ppl_wikipedia']) and star['nonfinite_layers'] == 0
  assert (tmp_path / 'perplexity_vs_tokens.png').exists()


def test_cond_sweep_table_quick(tmp_path):
  proc = _launch(
      '--config=experiments/configs/cond_sweep_table.py:quick',
      f'--workdir={tmp_path}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = results.read_json(str(tmp_path / 'results.json'))
  assert {(r['cond'], r['rank']) for r in rows} == {
      (c, k) for c in (1e4, 1e6, 1e8) for k in (8, 32, 60, 64)
  }
  coala = [r for r in rows if r['method'] == 'coala']
  assert coala and all(r['excess'] < 1e-5 for r in coala)
  hard = {r['method']: r for r in rows if (r['cond'], r['rank']) == (1e8, 32)}
  assert hard['coala']['excess'] < hard['svd_llm']['excess']
  table = (tmp_path / 'summary.md').read_text()
  assert '| 1e+08 | 32 |' in table and '| coala |' in table


def _modules(name):
  config_module = importlib.import_module(f'experiments.configs.{name}')
  return config_module, importlib.import_module(
      f'experiments.{config_module.get_config().experiment}'
  )


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_validates(name):
  """Each config file and its quick variant pass its experiment's validate()."""
  config_module, experiment = _modules(name)
  for arg in (None, 'quick'):
    experiment.validate(config_module.get_config(arg))


@pytest.mark.parametrize('name', CONFIGS)
def test_every_run_and_get_config_says_what_it_does(name):
  """A docstring of 3+ lines: what it computes, writes, how it resumes."""
  config_module, experiment = _modules(name)
  for fn in (experiment.run, config_module.get_config):
    assert (
        fn.__doc__ and len(fn.__doc__.strip().splitlines()) >= 3
    ), f'{fn.__module__}.{fn.__name__}'


def _runs(**runs):
  return ml_collections.ConfigDict(runs, sort_keys=False)


def test_variants_fill_defaults_and_keep_order():
  runs = common.check_variants(
      _runs(
          z=dict(method='svd_llm'),
          a=dict(method='coala', allocation='global'),
          m=dict(method='coala', mu=1e-4, mu_rule='error_ratio'),
      )
  )
  assert list(runs) == ['z', 'a', 'm']
  assert runs['z'] == dict(
      method='svd_llm',
      allocation='uniform',
      mu=0.0,
      mu_rule='energy',
      auto_mu=0.0,
  )
  assert runs['a']['allocation'] == 'global'
  assert common.compress_options(runs['m']) == dict(
      method='coala',
      allocation='uniform',
      mu=1e-4,
      mu_rule='error_ratio',
      auto_mu=0.0,
  )
  split = common.check_variants(
      _runs(b=dict(method='lora')),
      keys=('method', 'split'),
      methods=('lora', 'pissa'),
  )
  assert split == dict(b=dict(method='lora', split='own'))


@pytest.mark.parametrize(
    'runs,message',
    [
        (
            dict(a=dict(method='coala', alloc='global')),
            r'runs\.a\.alloc: expected one of the keys',
        ),
        (dict(a=dict(method='nope')), r'runs\.a\.method: expected one of \['),
        (
            dict(a=dict(method='svd_llm', mu=1e-4)),
            r"runs\.a\.mu: expected 0: 'svd_llm' has no ridge term",
        ),
        (
            dict(a=dict(method='svd', auto_mu=1e-4)),
            r'runs\.a\.auto_mu: expected 0',
        ),
        (
            dict(a=dict(method='coala', mu=-1.0)),
            r'runs\.a\.mu: expected a finite',
        ),
        (
            dict(a=dict(method='coala', allocation='globl')),
            r"runs\.a\.allocation: expected one of \('uniform', 'global',",
        ),
        (
            dict(a=dict(allocation='global')),
            r'runs\.a\.method: expected a method',
        ),
        ({'a-b': dict(method='coala')}, r'runs\.a-b: expected a label that is'),
        ({}, r'runs: expected a non-empty dict'),
    ],
)
def test_bad_variants_name_the_field(runs, message):
  with pytest.raises(ValueError, match=message):
    common.check_variants(
        _runs(**runs) if runs else ml_collections.ConfigDict()
    )


def test_split_is_refused_where_not_allowed():
  with pytest.raises(ValueError, match=r'runs\.a\.split: expected one of the'):
    common.check_variants(_runs(a=dict(method='coala', split='balanced')))


def test_bad_option_is_one_line_before_any_loading(tmp_path):
  start = time.perf_counter()
  proc = _launch(
      '--config=experiments/configs/calibration_sweep.py:quick',
      f'--workdir={tmp_path}',
      '--config.runs.coala_mu_0p01.method=svd_llm',
  )
  seconds = time.perf_counter() - start
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  assert "runs.coala_mu_0p01.mu: expected 0: 'svd_llm' has no ridge" in (
      lines[0]
  )
  assert not os.path.exists(tmp_path / 'results.json')
  assert seconds < 30, seconds  # no model load, no dense evaluation


def test_compare_methods_plot_marks_off_scale_runs(tmp_path):
  """A run 1000x worse is drawn at the edge, not on the axis it squashes."""
  rows = [
      dict(
          run=name,
          method=name,
          allocation='uniform',
          ratio=r,
          kept_ratio=r,
          ppl_wikipedia=ppl * (1 + r),
      )
      for name, ppl in (('good', 20.0), ('close', 22.0), ('bad', 2e4))
      for r in (0.6, 0.8)
  ]
  results.write_json(
      str(tmp_path / 'results.json'),
      dict(dense=dict(wikipedia=10.0), rows=rows),
  )
  from experiments import compare_methods  # pylint: disable=g-import-not-at-top
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  notes = {}
  fig, axes = common.subplots(1, 1)
  notes = common.relative_panel(
      axes[0, 0],
      {
          name: [
              (r['kept_ratio'], r['ppl_wikipedia'] / 10.0)
              for r in rows
              if r['run'] == name
          ]
          for name in ('good', 'close', 'bad')
      },
  )
  low, high = axes[0, 0].get_ylim()
  plt.close(fig)
  assert set(notes) == {'bad'} and '×' in notes['bad']
  assert low <= 2 * 1.6 and 2.2 * 1.8 <= high < 100  # fitted to the close
  compare_methods.plot(str(tmp_path))
  assert (tmp_path / 'perplexity_vs_ratio.png').stat().st_size > 0


def test_bench_pipeline_quick(tmp_path):
  proc = _launch(
      '--config=experiments/configs/bench_pipeline.py:quick',
      "--config.parts=('throughput', 'fold')",
      f'--workdir={tmp_path}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  assert set(out['throughput']) == {
      'forward',
      'perplexity',
      'calib_r',
      'calib_gram',
      'calib_both',
      'calib_r_dense',
  }
  assert all(v['tokens_per_s'] > 0 for v in out['throughput'].values())
  fold = out['fold'][0]
  assert (
      min(fold[k] for k in ('ffi', 'lapack', 'structured', 'dense', 'gram')) > 0
  )
  assert set(out['cores']) == set(out['load']) == {'throughput', 'fold'}
  assert '| throughput |' in (tmp_path / 'summary.md').read_text()
  summary = (tmp_path / 'summary.md').read_text()
  assert 'evaluation >= 0.9x the forward (measured' in summary
  assert (tmp_path / 'bench_pipeline.png').stat().st_size > 0
  # A second run set beside the first: its fold ratio next to the first's.
  proc = _launch(
      '--config=experiments/configs/bench_pipeline.py:quick',
      "--config.parts=('fold',)",
      f'--config.compare_with={tmp_path}',
      f'--workdir={tmp_path / "second"}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  second = results.read_json(str(tmp_path / 'second' / 'results.json'))
  assert second['compared']['fold'] == out['fold']
  summary = (tmp_path / 'second' / 'summary.md').read_text()
  assert '## The same measures in the compared run' in summary
  row = f"| fold / Gram update, d = {fold['d']} (<= 1.5) |"
  assert (
      f"{row} {second['fold'][0]['ffi_over_gram']:.2f} | "
      f"{fold['ffi_over_gram']:.2f} |" in summary
  ), summary
