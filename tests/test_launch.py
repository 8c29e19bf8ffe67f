"""launch.py: option errors are one line, at once, before anything loads."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args):
  t = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, 'launch.py', *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  return proc, time.perf_counter() - t


@pytest.mark.parametrize(
    'args, message',
    [
        (
            ('--config.ratoi=0.5',),
            'launch.py: the config has no field \'ratoi\'. Did you mean "ratio"',
        ),
        (('--config.ratio=abc',), "could not convert string to float: 'abc'"),
        (('--config.ratio=1.5',), r'invalid config: ratio must be in (0, 1]'),
        (
            ('--config.method=svd_llm', '--config.auto_mu=0.01'),
            "invalid config: auto_mu: 'svd_llm' has no ridge term",
        ),
        (
            ('--config.experiment=nope',),
            'invalid config: config.experiment: expected one of [',
        ),
    ],
)
def test_bad_option_is_one_line_before_any_work(tmp_path, args, message):
  proc, _ = _launch(
      '--config=experiments/configs/compress.py:quick',
      f'--workdir={tmp_path}/run',
      *args,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'run')  # nothing written


def test_config_file_errors_are_one_line(tmp_path):
  proc, _ = _launch('--config=experiments/configs/compress.py:quik')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert "Unknown config arg 'quik'" in proc.stderr
  proc, _ = _launch('--config=experiments/configs/nope.py')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert 'No such file' in proc.stderr
  config = tmp_path / 'c.py'
  config.write_text(
      'import ml_collections\n\ndef get_config():\n'
      '  return ml_collections.ConfigDict(dict(x=1))\n'
  )
  proc, _ = _launch(f'--config={config}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert 'no field "experiment"' in proc.stderr
