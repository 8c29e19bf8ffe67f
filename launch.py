r"""Runs one experiment from a config file.

  python launch.py --config=experiments/configs/compress.py
  python launch.py --config=experiments/configs/compress.py:quick \
      --config.ratio=0.6 --config.method=svd_llm --workdir=/tmp/run

The config's `experiment` field names a module `experiments/<experiment>.py`
whose `run(config, workdir)` does the work. Before anything is loaded the
whole config is checked (`validate(config)` of that module, if it has one):
a bad option stops the run at once with one line naming the field. Every
run writes its resolved config to `<workdir>/config.json`; the experiment
writes its results there too. The default workdir is
`results/<config file name>[_<arg>]/`. Library logs are quiet (WARNING)
unless `--verbosity=0` (INFO) or higher is given.
"""

import importlib
import logging as pylogging
import os
import pkgutil
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (ml_collections).', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir',
    None,
    'Directory for config.json, results and plots. '
    'Default: results/<config name>[_<arg>]/.',
)
flags.mark_flags_as_required(['config'])

_EXPERIMENTS_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'experiments'
)


class ConfigError(Exception):
  """A config or flag error: reported as one line, without a traceback."""


def default_workdir(config_arg: str) -> str:
  """`results/<file stem>[_<arg>]` for `--config=path.py[:arg]`."""
  path, _, arg = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('results', f'{name}_{arg}' if arg else name)


def experiment_names() -> list[str]:
  """The modules of experiments/ that define `run(config, workdir)`."""
  names = []
  for info in pkgutil.iter_modules([_EXPERIMENTS_DIR]):
    if info.ispkg:
      continue
    with open(os.path.join(_EXPERIMENTS_DIR, info.name + '.py')) as f:
      if re.search(r'^def run\(config', f.read(), re.M):
        names.append(info.name)
  return sorted(names)


def load_experiment(config):
  """The module `experiments.<config.experiment>`, checked to exist."""
  if 'experiment' not in config:
    raise ConfigError(
        f'the config has no field "experiment"; it must name '
        f'one of {experiment_names()}.'
    )
  name = config.experiment
  if name not in experiment_names():
    raise ConfigError(
        f'config.experiment: expected one of '
        f'{experiment_names()}; got {name!r}.'
    )
  return importlib.import_module(f'experiments.{name}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config errors as one line and no traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raised: its traceback is inside the message; the
    # flag and the exception's own last line are what the user needs.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _exit(lines[0] if len(lines) < 3 else f'{lines[0]} {lines[-1]}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these from `--config.<field>=` overrides.
    message = str(e.args[0] if e.args else e)
    message = message.replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    if isinstance(e, AttributeError):
      field = re.search(r"'([^']+)'", message)
      hint = re.search(r'Did you mean.*', message)
      message = (
          f'the config has no field '
          f'{field.group(1) if field else message!r}.'
          + (f' {hint.group(0).rstrip(chr(39))}' if hint else '')
      )
    _exit(message)


def _exit(message: str) -> None:
  print(f'launch.py: {message}', file=sys.stderr)
  sys.exit(2)


def _quiet_libraries() -> None:
  """Library logs at WARNING unless the user asked for a verbosity."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  level = logging.get_absl_logger().getEffectiveLevel()
  for name in ('', 'jax', 'orbax', 'absl'):  # '' is the root logger
    pylogging.getLogger(name).setLevel(level)


def main(argv):
  if len(argv) > 1:
    _exit(f'unexpected arguments: {argv[1:]}')
  _quiet_libraries()
  config = _CONFIG.value
  try:
    experiment = load_experiment(config)
    if hasattr(experiment, 'validate'):
      experiment.validate(config)
  except OSError as e:  # the config file could not be loaded
    _exit(' '.join(str(e).split()))
  except (ConfigError, ValueError) as e:
    _exit(f'invalid config: {e}')
  from ctxlr import distributed  # pylint: disable=g-import-not-at-top

  distributed.initialize()  # multi-host: from CTXLR_* env; no-op otherwise
  import jax  # pylint: disable=g-import-not-at-top  (after flags are parsed)
  from ctxlr import results  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config'])
  )
  os.makedirs(workdir, exist_ok=True)
  logging.info('JAX devices: %s', jax.devices())
  logging.info('Workdir: %s', workdir)
  logging.info('Config:\n%s', config)
  results.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  experiment.run(config, workdir)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
