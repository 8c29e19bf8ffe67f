"""Every method at every rank, scored against the float64 optimum.

A library shared by solver_demo, cond_sweep_table and stability. What every
method sees: the statistics of one float32 X (`stats_lib.stats_from_x`:
float32 R by one QR, float32 Gram XᵀX, Σ|x|), exactly what calibration
folds batch by batch, up to float32 rounding. The float64 reference:
W = R₆₄, the R of a float64 QR of that float32 X (`reference.r_factor`), so
`||X M||_F = ||W M||_F` for every M to float64 rounding, with W d × d
instead of n × d. Each method's factors are cast to float64 and scored by
`||W (K − a b)||_F` against `opt[r] = sqrt(Σ_{i>r} σ_i(W K)²)`
(`reference.optimal_errors`), for the kernel the method was given.

Per row: `err`, `opt`, `norm_xk` = ||XK||_F, `rel_err = err / ||XK||`,
`rel_opt`, `err_over_opt` (inf where the optimum is 0 and err > 0: r >=
rank(XK); NaN for non-finite factors), `excess = (err − opt) / ||XK||` and
the method's `SolveInfo` (retries, eps, failed, nonfinite).
"""

from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np

from ctxlr import reference
from ctxlr import registry
from ctxlr import results
from ctxlr import stats as stats_lib
from experiments import common

# Methods whose rank-r factors are the leading r columns of `a` and rows of
# `b` at a larger rank (truncation is their last step): one solve at the
# largest rank serves every rank (tests/test_stability.py checks this
# against a solve per rank). Any other method, e.g. asvd's randomized SVD or
# k_star's tie resolution, is solved at each rank: leaving a method out of
# this list costs time, never correctness.
PREFIX_METHODS = (
    'coala',
    'svd',
    'svd_llm',
    'svd_llm_eps',
    'svd_llm_v2',
    'corda',
)


def _f64(m: Any) -> np.ndarray:
  return np.asarray(m).astype(np.float64)


def errors_at_ranks(
    w: np.ndarray,
    kernel: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    ranks: list[int],
) -> np.ndarray:
  """`||W (K − a[:, :r] b[:r])||_F` for each r of ascending `ranks`, float64.

  The residual `W K − (W a) b` is updated block by block of rank, so all
  ranks cost one product with `a` and one with `b`.
  """
  resid = w @ kernel  # f64[m, d_out]
  wa = w @ a  # f64[m, p]
  out, prev = [], 0
  for r in ranks:
    resid -= wa[:, prev:r] @ b[prev:r]
    prev = r
    out.append(float(np.linalg.norm(resid)))
  return np.asarray(out)


def solve_and_score(
    method: str,
    kernel: Any,
    stats: stats_lib.LayerStats,
    w: np.ndarray,
    ranks: list[int],
    *,
    prefix: bool = True,
) -> list[tuple[float, Any]]:
  """(float64 error, SolveInfo) of `method` at each of ascending `ranks`.

  `kernel` is what the method is given (float32, or bf16); it is scored
  against that kernel. With `prefix`, a method of `PREFIX_METHODS` is solved
  once, at the largest rank (the same factors up to float32 rounding);
  otherwise every method is solved at every rank.
  """
  k = jnp.asarray(kernel)
  k64 = _f64(k)
  if prefix and method in PREFIX_METHODS:
    factors, info = registry.solve(method, k, stats, rank=max(ranks))
    a, b = _f64(factors.a), _f64(factors.b)
    errs = errors_at_ranks(w, k64, a, b, ranks)
    infos = [
        info._replace(
            nonfinite=not (
                np.isfinite(a[:, :r]).all() and np.isfinite(b[:r]).all()
            )
        )
        for r in ranks
    ]
    return list(zip(errs, infos))
  out = []
  for r in ranks:
    factors, info = registry.solve(method, k, stats, rank=r)
    err = errors_at_ranks(w, k64, _f64(factors.a), _f64(factors.b), [r])[0]
    out.append((err, info))
  return out


def score(
    w: np.ndarray,
    kernel: Any,
    stats: stats_lib.LayerStats,
    methods: Iterable[str],
    ranks: Iterable[int],
    *,
    storage: Any = jnp.float32,
    prefix: bool = True,
    **fields,
) -> list[dict]:
  """One row per (method, rank): error vs the float64 optimum, SolveInfo.

  Args:
    w: float64[m, d_in] with `WᵀW = XᵀX` (the float64 R of X).
    kernel: K, float[d_in, d_out].
    stats: the LayerStats of the float32 X that the methods see.
    methods: names in `registry.names()`.
    ranks: ranks to score.
    storage: the dtype K is stored in for the methods (float32, or e.g.
      bfloat16 to measure the cost of bf16 weights); the optimum is that of
      the stored kernel.
    prefix: one solve per method at the largest rank where that gives the
      same factors (`solve_and_score`); False: a solve at every rank.
    **fields: copied into every row.
  """
  ranks = sorted(set(int(r) for r in ranks))
  k = jnp.asarray(kernel, storage)
  opt = reference.optimal_errors(w, _f64(k))
  rows = []
  for method in methods:
    for rank, (err, info) in zip(
        ranks, solve_and_score(method, k, stats, w, ranks, prefix=prefix)
    ):
      o = float(opt[rank])
      ratio = (
          float('nan')
          if not np.isfinite(err)
          else err / o
          if o > 0
          else float('inf')
          if err > 0
          else 1.0
      )
      rows.append(
          dict(
              fields,
              method=method,
              rank=rank,
              err=err,
              opt=o,
              norm_xk=float(opt[0]),
              rel_err=err / opt[0],
              rel_opt=o / opt[0],
              err_over_opt=ratio,
              excess=(err - o) / opt[0],
              **info._asdict(),
          )
      )
  return rows


def synthetic_problem(
    seed: int, n: int, d_in: int, d_out: int, cond: float
) -> tuple[np.ndarray, np.ndarray]:
  """(X float32[n, d_in], K float32[d_in, d_out]): X with log-spaced
  singular values 1 … 1/cond (`reference.activations`, built in float64,
  then cast), K Gaussian."""
  rng = np.random.default_rng(seed)
  x = reference.activations(rng, n, d_in, cond=cond).astype(np.float32)
  return x, rng.standard_normal((d_in, d_out)).astype(np.float32)


def check_synthetic(config) -> None:
  """The fields of a synthetic problem: seed, n, d_in, d_out, methods
  (registered, not float64 references: `stats_from_x` of a float32 X is
  float32)."""
  common.check_int(config.seed, 'seed', minimum=0)
  for field in ('n', 'd_in', 'd_out'):
    common.check_int(config[field], field)
  common.check_methods(config.methods, float64=False)


def score_x(
    x: np.ndarray,
    kernel: np.ndarray,
    methods: Iterable[str],
    ranks: Iterable[int],
    **kwargs,
) -> list[dict]:
  """`score` of every method on the statistics of one float32 X."""
  return score(
      reference.r_factor(x),
      kernel,
      stats_lib.stats_from_x(jnp.asarray(x)),
      methods,
      ranks,
      **kwargs,
  )


def cell(r: dict) -> str:
  """A table cell: `err/opt (excess)` and flags R retried, F failed,
  N non-finite; '—' where the optimum is 0, 'NaN' for non-finite factors."""
  ratio = r['err_over_opt']
  text = (
      'NaN'
      if not np.isfinite(r['err'])
      else '—'
      if not np.isfinite(ratio)
      else f'{ratio:.4g}'
  )
  excess = '' if not np.isfinite(r['err']) else f" ({r['excess']:.1e})"
  flags = ''.join(
      f
      for f, on in (
          ('R', r['retries']),
          ('F', r['failed']),
          ('N', r['nonfinite']),
      )
      if on
  )
  return text + excess + (' ' + flags if flags else '')


def method_table(
    rows: list[dict],
    keys: list[str],
    extra: tuple[str, ...] = (),
    formats: dict[str, str] | None = None,
) -> str:
  """Markdown: one line per distinct `keys` value, one `cell` column per
  method; `extra` fields are copied from the first row of each line."""
  methods = list(dict.fromkeys(r['method'] for r in rows))
  lines = {}
  for r in rows:
    line = lines.setdefault(
        tuple(r[k] for k in keys), {k: r[k] for k in keys + list(extra)}
    )
    line[r['method']] = cell(r)
  return results.markdown_table(
      list(lines.values()), keys + list(extra) + methods, formats
  )


CELL_LEGEND = (
    'Cells: err/opt (excess = (err − opt)/||XK||_F), errors in '
    'float64 of the methods\' factors; "—": the optimum is 0 (r >= '
    'rank(XK)), see the excess; "NaN": non-finite factors. Flags: '
    'R retried, F failed, N non-finite.'
)
