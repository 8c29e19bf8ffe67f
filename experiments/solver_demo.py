"""Error vs rank of every method on one synthetic X (see its config)."""
import os

from absl import logging
import jax.numpy as jnp
import matplotlib
import numpy as np

from ctxlr import baselines
from ctxlr import reference
from ctxlr import registry
from ctxlr import results
from ctxlr import stats as stats_lib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top


def score_methods(x: np.ndarray, kernel: np.ndarray, methods, ranks,
                  **row_fields) -> list[dict]:
  """Solves with every method at every rank; one row per (method, rank).

  Args:
    x: X, float32[n, d_in] (the data every method sees).
    kernel: K, float32[d_in, d_out].
    methods: names in `registry.names()`.
    ranks: ranks to solve at.
    **row_fields: copied into every row (e.g. cond, shape).

  Returns:
    Rows with the float64 weighted error, the float64 optimum, their ratio, the
    excess normalised by ||XK||_F and the method's SolveInfo.
  """
  stats = stats_lib.stats_from_x(jnp.asarray(x))
  opt = reference.optimal_errors(x, kernel)
  rows = []
  for method in methods:
    for rank in ranks:
      factors, info = registry.solve(method, jnp.asarray(kernel), stats,
                                      rank=rank)
      err = reference.weighted_error(x, kernel, factors.a, factors.b)
      rows.append(dict(
          row_fields, method=method, rank=rank, weighted_err=err,
          opt=float(opt[rank]), rel_err=err / opt[0],
          rel_opt=float(opt[rank] / opt[0]),
          err_over_opt=err / opt[rank] if opt[rank] > 0 else float('inf'),
          excess=(err - opt[rank]) / opt[0], **info._asdict()))
  return rows


def run(config, workdir: str) -> None:
  rng = np.random.default_rng(config.seed)
  x = reference.activations(rng, config.n, config.d_in,
                            cond=config.cond).astype(np.float32)
  kernel = rng.standard_normal((config.d_in, config.d_out)).astype(np.float32)
  p = min(config.d_in, config.d_out)
  ranks = sorted({max(1, round(f * p)) for f in config.rank_fractions})
  rows = score_methods(x, kernel, config.methods, ranks, cond=config.cond)
  results.write_json(os.path.join(workdir, 'results.json'), rows)
  summary = summarize(rows)
  results.write_text(os.path.join(workdir, 'summary.md'), summary)
  plot(workdir)
  logging.info('Results in %s:\n%s', workdir, summary)
  print(summary)


def summarize(rows: list[dict]) -> str:
  """Markdown: error/opt and excess per method and rank."""
  columns = ['method', 'rank', 'rel_opt', 'rel_err', 'err_over_opt', 'excess',
             'retries', 'eps', 'failed', 'nonfinite']
  formats = dict(rel_opt='.3e', rel_err='.3e', err_over_opt='.4g',
                 excess='.2e', eps='.1e')
  return ('Relative error ||X(K-K\')||/||XK|| in float64 of float32 factors; '
          'excess = (err - opt)/||XK||.\n\n'
          + results.markdown_table(rows, columns, formats))


def plot(workdir: str) -> None:
  """Relative error vs rank per method, from results.json alone."""
  rows = results.read_json(os.path.join(workdir, 'results.json'))
  fig, ax = plt.subplots(figsize=(6, 4))
  opt = sorted({(r['rank'], r['rel_opt']) for r in rows})
  ax.plot([r for r, _ in opt], [max(o, 1e-12) for _, o in opt], 'k--',
          label='float64 optimum')
  for method in dict.fromkeys(r['method'] for r in rows):
    mine = [r for r in rows if r['method'] == method]
    ax.plot([r['rank'] for r in mine],
            [r['rel_err'] if np.isfinite(r['rel_err']) else np.nan
             for r in mine], 'o-', label=method, alpha=0.8)
  ax.set_yscale('log')
  ax.set_xlabel('rank')
  ax.set_ylabel("||X(K - K')||_F / ||XK||_F")
  ax.set_title(f"cond(X) = {rows[0]['cond']:.0e}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'error_vs_rank.png'), dpi=120)
  plt.close(fig)
