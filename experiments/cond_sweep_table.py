"""Error/optimum of the Gram methods vs coala as cond(X) grows (a table).

Config and commands: experiments/configs/cond_sweep_table.py. results.json:
one row per (cond, method, rank) (`scoring.score`); summary.md is the table,
one line per (cond, rank), `err/opt (excess)` per method.
"""

from experiments import common
from experiments import scoring


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  scoring.check_synthetic(config)
  common.check_numbers(config.conds, 'conds', minimum=1)
  common.check_ints(
      config.ranks, 'ranks', maximum=min(config.d_in, config.d_out)
  )


def run(config, workdir: str) -> None:
  """Scores every method at every rank on one X per cond(X) (same seed).

  Writes results.json and summary.md; no resume (the full table takes
  seconds).
  """
  validate(config)
  rows = []
  for cond in config.conds:
    x, kernel = scoring.synthetic_problem(
        config.seed, config.n, config.d_in, config.d_out, cond
    )
    rows += scoring.score_x(
        x, kernel, config.methods, config.ranks, prefix=False, cond=cond
    )
  common.finish(workdir, summarize(rows), None, out=rows)


def summarize(rows: list[dict]) -> str:
  """Markdown: one line per (cond, rank), `err/opt (excess)` per method."""
  return (
      scoring.method_table(rows, ['cond', 'rank'], formats=dict(cond='.0e'))
      + '\n'
      + scoring.CELL_LEGEND
      + '\n'
  )
