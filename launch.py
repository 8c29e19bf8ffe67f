r"""Runs one experiment from a config file.

  python launch.py --config=experiments/configs/solver_demo.py
  python launch.py --config=experiments/configs/solver_demo.py:quick \
      --config.rank_fractions='(0.5, 0.9)' --workdir=/tmp/demo

The config's `experiment` field names a module `experiments/<experiment>.py`
whose `run(config, workdir)` does the work. Every run writes its resolved
config to `<workdir>/config.json`; the experiment writes its results there too.
The default workdir is `results/<config file name>[_<arg>]/`.
"""
import importlib
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (ml_collections).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Directory for config.json, results and plots. '
    'Default: results/<config name>[_<arg>]/.')
flags.mark_flags_as_required(['config'])


def default_workdir(config_arg: str) -> str:
  """`results/<file stem>[_<arg>]` for `--config=path.py[:arg]`."""
  path, _, arg = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('results', f'{name}_{arg}' if arg else name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ctxlr import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()   # multi-host: from CTXLR_* env; no-op otherwise
  import jax  # pylint: disable=g-import-not-at-top  (after flags are parsed)
  from ctxlr import results  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config']))
  os.makedirs(workdir, exist_ok=True)
  logging.info('JAX devices: %s', jax.devices())
  logging.info('Workdir: %s', workdir)
  logging.info('Config:\n%s', config)
  results.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  experiment = importlib.import_module(f'experiments.{config.experiment}')
  experiment.run(config, workdir)


if __name__ == '__main__':
  app.run(main)
