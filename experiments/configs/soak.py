r"""Soak test: the quick main job SIGKILLed at random moments, then resumed.

  python launch.py --config=experiments/configs/soak.py --workdir=results/soak
  python launch.py --config=experiments/configs/soak.py:quick   # 2 kills

Each kill lands at a random time of a run, or at the first file event after
it; every chain of killed runs is then left to finish and its results are
compared with an uninterrupted reference run (experiments/soak.py).
"""

import ml_collections


def get_config(arg=None):
  """The soak benchmark: the quick main job under random SIGKILLs.

  'quick' is a CI-sized run. Writes results.json, summary.md and the figure
  to the workdir; a rerun starts the soak over.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'soak'
  config.job = 'experiments/configs/compress.py:quick'  # what is killed
  config.job_overrides = ()  # extra flags, e.g. ('--config.ratio=0.6',)
  config.kills = 50  # SIGKILLs in all
  config.max_kills_per_chain = 3  # kills before a chain is left to finish
  config.event_fraction = 0.5  # kills at the first file event after t
  config.seed = 0
  config.poll_seconds = 0.005  # how often the job's files are looked at
  config.run_timeout = 900.0  # seconds; a run past it is a failure
  if arg == 'quick':
    config.kills = 2
    config.max_kills_per_chain = 2
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
