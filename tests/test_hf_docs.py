"""docs/checkpoints.md runs as written: its Python and its command.

The command block's MODEL / CORPUS / WORKDIR lines are pointed at the tiny
Qwen2 fixture, a generated .jsonl corpus and a temporary directory; the
rest runs unchanged.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ctxlr import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'docs', 'checkpoints.md')


def _blocks(language):
  with open(DOC) as f:
    return re.findall(rf'```{language}\n(.*?)```', f.read(), flags=re.S)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('CTXLR_CACHE', str(tmp_path / 'cache'))
  monkeypatch.chdir(ROOT)


def test_doc_has_examples():
  assert len(_blocks('python')) >= 3 and len(_blocks('bash')) == 1


@pytest.mark.parametrize('index', range(len(_blocks('python'))))
def test_python_block_runs(index, capsys):
  code = _blocks('python')[index]
  exec(compile(code, f'checkpoints.md python block {index}', 'exec'), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip(), 'each example prints its result'


def _write_corpus(directory) -> None:
  """A .jsonl corpus of 1,500 short documents in `directory`."""
  rng = np.random.default_rng(0)
  words = (
      'the river rose and the bridge held while a market grew near '
      'old forest roads in winter'
  ).split()
  directory.mkdir()
  with open(directory / 'part1.jsonl', 'w') as f:
    for i in range(1500):
      f.write(
          json.dumps({'text': ' '.join(rng.choice(words, 40)) + f' ({i}).'})
          + '\n'
      )


def _run_bash(script: str) -> None:
  """Runs `script` from the repository root; `python` is this interpreter."""
  env = dict(
      os.environ,
      PATH=os.path.dirname(sys.executable)
      + os.pathsep
      + os.environ.get('PATH', ''),
  )
  proc = subprocess.run(
      ['bash', '-euo', 'pipefail', '-c', script],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_command_block_runs(tmp_path):
  texts = tmp_path / 'texts'
  _write_corpus(texts)
  work = tmp_path / 'work'
  script = _blocks('bash')[0]
  values = dict(
      MODEL='tests/fixtures/hf/qwen2',
      CORPUS=f"'files:{texts}/*.jsonl'",
      WORKDIR=str(work),
  )
  for name, value in values.items():
    script, n = re.subn(rf'^{name}=.*$', f'{name}={value}', script, flags=re.M)
    assert n == 1, name
  _run_bash(script)
  out = results.read_json(str(work / 'results.json'))
  corpus = f'files:{texts}/*.jsonl'
  assert set(out['dense']) == {corpus, 'wikipedia'}
  assert out['calib_tokens'] == 8192
  assert out['dense'][corpus]['tokens'] > 4000  # 8 windows of 512
  assert len(out['layers']) == 14 and 0.7 < out['kept_ratio'] <= 0.8


def test_readme_command_runs(tmp_path):
  """The README's "Compress your own checkpoint" command, on the fixture."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    section = f.read().split('## Compress your own checkpoint', 1)[1]
  script = re.findall(r'```bash\n(.*?)```', section, flags=re.S)[0]
  texts = tmp_path / 'my_text'
  _write_corpus(texts)
  script = script.replace('/path/to/Qwen2.5-0.5B', 'tests/fixtures/hf/qwen2')
  script = script.replace('/path/to/my_text', str(texts))
  script = script.replace('compress.py \\', 'compress.py:quick \\', 1)
  script = script.rstrip() + f' --workdir={tmp_path / "work"}'
  _run_bash(script)
  out = results.read_json(str(tmp_path / 'work' / 'results.json'))
  assert set(out['dense']) == {f'files:{texts}/*.jsonl', 'wikipedia'}
