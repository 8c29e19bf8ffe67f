"""Error vs rank of every method on one synthetic X (see its config).

results.json: one row per (method, rank) (`scoring.score`); summary.md and
error_vs_rank.png are drawn from it alone.
"""

import numpy as np

from ctxlr import results
from experiments import common
from experiments import scoring


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  scoring.check_synthetic(config)
  common.check_number(config.cond, 'cond', minimum=1)
  common.check_numbers(
      config.rank_fractions, 'rank_fractions', positive=True, maximum=1
  )


def run(config, workdir: str) -> None:
  """Scores every method at every rank fraction on one X of cond(X) = cond.

  Writes results.json, summary.md and error_vs_rank.png; no resume (a run
  takes seconds).
  """
  validate(config)
  x, kernel = scoring.synthetic_problem(
      config.seed, config.n, config.d_in, config.d_out, config.cond
  )
  p = min(config.d_in, config.d_out)
  ranks = sorted({max(1, round(f * p)) for f in config.rank_fractions})
  rows = scoring.score_x(
      x, kernel, config.methods, ranks, prefix=False, cond=config.cond
  )
  common.finish(workdir, summarize(rows), plot, out=rows)


def summarize(rows: list[dict]) -> str:
  """Markdown: error/opt and excess per method and rank."""
  columns = [
      'method',
      'rank',
      'rel_opt',
      'rel_err',
      'err_over_opt',
      'excess',
      'retries',
      'eps',
      'failed',
      'nonfinite',
  ]
  formats = dict(
      rel_opt='.3e', rel_err='.3e', err_over_opt='.4g', excess='.2e', eps='.1e'
  )
  return (
      "Relative error ||X(K-K')||/||XK|| in float64 of float32 factors; "
      'excess = (err - opt)/||XK||.\n\n'
      + results.markdown_table(rows, columns, formats)
  )


def plot(workdir: str) -> None:
  """error_vs_rank.png from results.json alone: relative error vs rank per
  method, the float64 optimum dashed, the legend outside."""
  rows = common.read_results(workdir, None)
  fig, axes = common.subplots(1, 1, figsize=(6, 4))
  ax = axes[0, 0]
  opt = sorted({(r['rank'], r['rel_opt']) for r in rows})
  ax.plot(
      [r for r, _ in opt],
      [max(o, 1e-12) for _, o in opt],
      'k--',
      label='float64 optimum',
  )
  for i, method in enumerate(dict.fromkeys(r['method'] for r in rows)):
    mine = [r for r in rows if r['method'] == method]
    ax.plot(
        [r['rank'] for r in mine],
        [r['rel_err'] if np.isfinite(r['rel_err']) else np.nan for r in mine],
        '-',
        marker=common.MARKERS[i % 10],
        mfc='none',
        label=method,
        alpha=0.8,
    )
  ax.set_yscale('log')
  ax.set_xlabel('rank')
  ax.set_ylabel("||X(K - K')||_F / ||XK||_F")
  ax.set_title(f"cond(X) = {rows[0]['cond']:.0e}")
  common.legend_outside(fig, axes)
  common.save_figure(fig, workdir, 'error_vs_rank.png')
