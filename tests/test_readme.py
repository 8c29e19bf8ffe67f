"""Every ```python block of the README and the experiment docs runs as written.

Each block runs in a fresh namespace and must print its result. The files:
README.md, docs/experiments.md and docs/results/*/README.md.
"""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
DOCS = [README, os.path.join(ROOT, 'docs', 'experiments.md')] + sorted(
    glob.glob(os.path.join(ROOT, 'docs', 'results', '*', 'README.md'))
)


def _blocks(path):
  with open(path) as f:
    text = f.read()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def _all_blocks():
  return [
      pytest.param(code, id=f'{os.path.relpath(path, ROOT)}:{index}')
      for path in DOCS
      if os.path.exists(path)
      for index, code in enumerate(_blocks(path))
  ]


def test_readme_has_python_examples():
  assert len(_blocks(README)) >= 2


@pytest.mark.parametrize('code', _all_blocks())
def test_doc_block_runs(code, request, capsys):
  name = request.node.callspec.id
  exec(compile(code, f'{name} python block', 'exec'), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip(), 'each example prints its result'
