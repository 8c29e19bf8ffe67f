"""Every ```python block in README.md runs as written (fresh namespace each)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'README.md')


def _blocks():
  with open(README) as f:
    text = f.read()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_readme_has_python_examples():
  assert len(_blocks()) >= 2


@pytest.mark.parametrize('index', range(len(_blocks())))
def test_readme_block_runs(index, capsys):
  code = _blocks()[index]
  exec(compile(code, f'README.md python block {index}', 'exec'), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip(), 'each example prints its result'
