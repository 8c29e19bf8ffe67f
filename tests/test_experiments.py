"""The experiments run through launch.py as a user runs them (quick sizes)."""
import os
import subprocess
import sys

import numpy as np

from ctxlr import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=600):
  proc = subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  return proc


def test_solver_demo_with_override(tmp_path):
  proc = _launch('--config=experiments/configs/solver_demo.py:quick',
                 f'--workdir={tmp_path}', '--config.cond=1e3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert results.read_json(str(tmp_path / 'config.json'))['cond'] == 1e3
  rows = results.read_json(str(tmp_path / 'results.json'))
  ctx = [r for r in rows if r['method'] == 'coala']
  assert ctx and all(r['excess'] < 2e-6 for r in ctx)
  assert (tmp_path / 'error_vs_rank.png').stat().st_size > 0
  assert '| coala |' in (tmp_path / 'summary.md').read_text()


def test_locked_config_rejects_typos(tmp_path):
  proc = _launch('--config=experiments/configs/solver_demo.py:quick',
                 f'--workdir={tmp_path}', '--config.cnd=1e3')
  assert proc.returncode != 0 and 'cond' in proc.stderr


def test_compress_quick_end_to_end(tmp_path):
  proc = _launch('--config=experiments/configs/compress.py:quick',
                 f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  assert set(out['dense']) == set(out['compressed']) == {'wikipedia', 'sotu'}
  assert 0.75 < out['kept_ratio'] <= 0.8
  layers = out['layers']
  assert len(layers) == 7 and all(0 < l['rel_err'] < 1 for l in
                                  layers.values())
  for name in ('summary.md', 'layer_errors.png', 'factors.safetensors',
               'model/checkpoint.json', 'progress/manifest.json'):
    assert (tmp_path / name).exists(), name


def test_compare_methods_quick_and_resume(tmp_path):
  args = ('--config=experiments/configs/compare_methods.py:quick',
          f'--workdir={tmp_path}')
  proc = _launch(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = results.read_json(str(tmp_path / 'results.json'))
  rows = {r['method']: r for r in out['rows']}
  assert set(rows) == {'coala', 'svd_llm'}
  assert rows['coala']['ppl_wikipedia'] > out['dense']['wikipedia']
  assert (tmp_path / 'perplexity_vs_ratio.png').exists()
  again = _launch(*args)                    # finished rows are not redone
  assert again.returncode == 0, again.stderr[-3000:]
  assert results.read_json(str(tmp_path / 'results.json')) == out


def test_calibration_sweep_quick(tmp_path):
  proc = _launch('--config=experiments/configs/calibration_sweep.py:quick',
                 f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = results.read_json(str(tmp_path / 'results.json'))['rows']
  # K_* (float64 statistics) only where the data are short (<= 32 tokens).
  assert {(r['run'], r['num_tokens']) for r in rows} == {
      (run, n) for run in ('coala', 'coala@0.01', 'svd_llm_eps')
      for n in (32, 128)} | {('k_star', 32)}
  short = [r for r in rows if r['num_tokens'] == 32]
  assert all(r['insufficient_layers'] > 0 for r in short)
  assert {r['stats_dtype'] for r in short} == {'float64'}
  star = next(r for r in short if r['run'] == 'k_star')
  assert np.isfinite(star['ppl_wikipedia']) and star['nonfinite_layers'] == 0
  assert (tmp_path / 'perplexity_vs_tokens.png').exists()
