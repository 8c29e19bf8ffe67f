"""Writing results so that a killed run never leaves a half-written file."""

import json
import os
from typing import Any

import numpy as np


def json_default(obj: Any) -> Any:
  """JSON encoding of NumPy/JAX scalars and arrays."""
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, '__array__'):
    return np.asarray(obj).tolist()
  if isinstance(obj, (tuple, set)):
    return list(obj)
  raise TypeError(f'Cannot encode {type(obj).__name__} as JSON.')


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (a `.tmp` file, then `os.replace`)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fd = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
  try:  # the rename itself survives a crash too
    os.fsync(fd)
  finally:
    os.close(fd)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically; NaN/Inf are written as such."""
  write_text(path, json.dumps(obj, indent=2, default=json_default) + '\n')


def read_json(path: str) -> Any:
  """The JSON in `path`.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: naming the file, if it is not valid JSON (truncated or
      damaged: `write_json` never leaves a partial file).
  """
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return json.loads(data.decode('utf-8'))
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(
        f'{path} is not valid JSON ({e}; {len(data)} bytes): '
        'truncated or damaged.'
    ) from None


def markdown_table(
    rows: list[dict[str, Any]],
    columns: list[str],
    formats: dict[str, str] | None = None,
) -> str:
  """A GitHub Markdown table of `rows` (dicts) restricted to `columns`."""
  formats = formats or {}

  def cell(row, col):
    value = row.get(col, '')
    fmt = formats.get(col)
    if fmt and isinstance(value, (int, float, np.generic)):
      return format(value, fmt)
    return str(value)

  lines = [
      '| ' + ' | '.join(columns) + ' |',
      '|' + '|'.join('---' for _ in columns) + '|',
  ]
  lines += ['| ' + ' | '.join(cell(r, c) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'
