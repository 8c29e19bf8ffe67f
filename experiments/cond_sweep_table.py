r"""Error/optimum of the Gram baselines vs ctxlr as cond(X) grows.

  python -m experiments.cond_sweep_table [--out=DIR] [--quick]

X is 2048 × 256 with log-spaced singular values 1 … 1/cond (built in
float64 from a controlled SVD, then cast to float32), K is 256 × 256
Gaussian (float32). Every method sees the same float32 X (through
`stats_from_x`); errors are evaluated in float64 NumPy as
`||X(K − a b)||_F` on that float32 X with a, b cast to float64, against the
float64 optimum `sqrt(Σ_{i>r} σ_i(XK)²)` (`ctxlr.reference`). Prints a
Markdown table; with `--out`, also writes `results.json` and `table.md`.
"""
import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

from ctxlr import baselines
from ctxlr import reference
from ctxlr import registry
from ctxlr import results
from ctxlr import stats as stats_lib

CONDS = (1e4, 1e6, 1e8)
RANKS = (32, 128, 200, 240, 256)
METHODS = ('coala', 'svd_llm', 'svd_llm_eps', 'svd_llm_v2', 'corda')
SHAPE = (2048, 256, 256)   # n, d_in, d_out


def sweep(conds=CONDS, ranks=RANKS, methods=METHODS, shape=SHAPE,
          seed: int = 0) -> list[dict]:
  """One row per (cond, method, rank): error, optimum, ratio, SolveInfo."""
  n, d_in, d_out = shape
  rows = []
  for cond in conds:
    rng = np.random.default_rng(seed)
    x = reference.activations(rng, n, d_in, cond=cond).astype(np.float32)
    kernel = rng.standard_normal((d_in, d_out)).astype(np.float32)
    stats = stats_lib.stats_from_x(jnp.asarray(x))
    opt = reference.optimal_errors(x, kernel)       # opt[0] = ||XK||_F
    for method in methods:
      for rank in ranks:
        start = time.perf_counter()
        factors, info = registry.solve(method, jnp.asarray(kernel), stats,
                                        rank=rank)
        seconds = time.perf_counter() - start
        err = reference.weighted_error(x, kernel, factors.a, factors.b)
        rows.append(dict(
            cond=cond, method=method, rank=rank, weighted_err=err,
            opt=float(opt[rank]),
            err_over_opt=err / opt[rank] if opt[rank] > 0 else float('inf'),
            excess=(err - opt[rank]) / opt[0], seconds=seconds,
            **info._asdict()))
  return rows


def table(rows: list[dict]) -> str:
  """Markdown: one line per (cond, rank), `err/opt (excess)` per method."""
  methods = list(dict.fromkeys(r['method'] for r in rows))
  keys = list(dict.fromkeys((r['cond'], r['rank']) for r in rows))
  cells = {(r['cond'], r['rank'], r['method']): r for r in rows}
  out = []
  for cond, rank in keys:
    line = {'cond(X)': f'{cond:.0e}', 'rank': rank}
    for m in methods:
      r = cells[(cond, rank, m)]
      ratio = ('—' if not np.isfinite(r['err_over_opt'])
               else f"{r['err_over_opt']:.4g}")
      flags = ''.join(['R' if r['retries'] else '', 'F' if r['failed'] else '',
                       'N' if r['nonfinite'] else ''])
      line[m] = f"{ratio} ({r['excess']:.1e}){' ' + flags if flags else ''}"
    out.append(line)
  return results.markdown_table(out, ['cond(X)', 'rank'] + methods)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=None, help='directory for results')
  parser.add_argument('--quick', action='store_true',
                      help='n, d = 512, 64 and ranks (8, 32, 60, 64)')
  args = parser.parse_args(argv)
  if args.quick:
    rows = sweep(ranks=(8, 32, 60, 64), shape=(512, 64, 64))
  else:
    rows = sweep()
  text = table(rows)
  text += ('\nCells: err/opt (excess = (err − opt)/||XK||_F); "—": opt = 0 '
           '(full rank). Flags: R retried, F failed, N non-finite.\n')
  print(text)
  if args.out:
    results.write_json(os.path.join(args.out, 'results.json'), rows)
    results.write_text(os.path.join(args.out, 'table.md'), text)
  return rows


if __name__ == '__main__':
  main()
