"""K_μ → K_* with rate μ, the bound, and the float32 floor (see its config).

For every setting and seed: K_* = `k_star` (float64), K_μ = the
library solve `ctx_factors(K, regularize_r(R, μ))` in float64 and in float32
(on the data rounded to float32), and K_0 (μ = 0). All errors are measured in
float64 against the exact data. results.json holds `curves` (one row per
setting, seed, dtype and μ; μ = 0 is the plain solver) and `summary` (one row
per setting and seed); the figures are drawn from it alone. The problems are
`reference.make_problem`.
"""

import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ctxlr import reference
from ctxlr import results
from ctxlr.linalg import kstar
from ctxlr.linalg import qr
from ctxlr.linalg import solvers
from experiments import common


def _dense(f: solvers.Factors) -> np.ndarray:
  return np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)


def fit_slope(mus, dists) -> float:
  """Least-squares slope of log10(dist) against log10(μ)."""
  return float(np.polyfit(np.log10(mus), np.log10(dists), 1)[0])


def measure(
    x: np.ndarray, kernel: np.ndarray, rank: int, mus, dtypes
) -> tuple[list[dict], dict]:
  """Curves (one row per dtype and μ, μ = 0 included) and the K_* facts.

  Call under `jax.enable_x64(True)`.
  """
  r64 = qr.qr_r(jnp.asarray(x))
  st = kstar.solution_structure(kernel, r64, rank=rank)
  k_star = _dense(kstar.k_star(kernel, r64, rank=rank))
  norm_star, norm_k = np.linalg.norm(k_star), np.linalg.norm(kernel)
  opt = reference.optimal_errors(x, kernel)
  norm_xk = opt[0]

  def errors(k_prime):
    return dict(
        rel_dist=float(np.linalg.norm(k_prime - k_star) / norm_star),
        rel_plain=float(np.linalg.norm(kernel - k_prime) / norm_k),
        rel_data=float(np.linalg.norm(x @ (kernel - k_prime)) / norm_xk),
    )

  rows = []
  for dtype in dtypes:
    k_d = jnp.asarray(kernel.astype(dtype))
    r_d = qr.qr_r(jnp.asarray(x.astype(dtype)))
    for mu in (0.0, *mus):
      r_mu = qr.regularize_r(r_d, mu) if mu else r_d
      k_mu = _dense(solvers.ctx_factors(k_d, r_mu, rank=rank))
      row = dict(dtype=dtype, mu=mu, **errors(k_mu))
      if mu:
        row['bound_rel'] = kstar.error_bound(st, mu) / norm_star
      rows.append(row)
  opt_r = opt[rank] if rank < len(opt) else 0.0  # rank(XK) <= n < r
  facts = dict(
      case=st.case,
      data_rank=st.data_rank,
      num_above=st.num_above,
      num_tied=st.num_tied,
      gap_const=kstar.gap_bound_constant(st),
      norm_star=float(norm_star),
      opt_rel=float(opt_r / norm_xk),
      **{f'star_{k}': v for k, v in errors(k_star).items()},
  )
  return rows, facts


def summarize_one(rows: list[dict], facts: dict, fit_max_mu: float) -> dict:
  """Slopes, looseness, float32 floor and the μ = 0 comparison."""
  by = lambda dt: [r for r in rows if r['dtype'] == dt and r['mu'] > 0]
  f64 = by('float64')
  fit = [
      r
      for r in f64
      if r['mu'] <= fit_max_mu
      and r['rel_dist'] > 0
      and np.isfinite(r['bound_rel'])
  ]  # where the theorem applies
  out = dict(facts)
  out['slope'] = (
      fit_slope([r['mu'] for r in fit], [r['rel_dist'] for r in fit])
      if len(fit) >= 2
      else None
  )
  out['slope_all'] = fit_slope(
      [r['mu'] for r in f64], [r['rel_dist'] for r in f64]
  )
  loose = [
      r['bound_rel'] / r['rel_dist'] for r in f64 if np.isfinite(r['bound_rel'])
  ]
  out['looseness_min'] = float(min(loose)) if loose else math.inf
  out['looseness_max'] = float(max(loose)) if loose else math.inf
  out['bound_holds'] = all(r['rel_dist'] <= r['bound_rel'] for r in f64)
  out['bound_from_mu'] = max(
      [r['mu'] for r in f64 if np.isfinite(r['bound_rel'])], default=0.0
  )
  small = min(f64, key=lambda r: r['mu'])
  out['looseness_asym'] = small['bound_rel'] / small['rel_dist']
  out['measured_const'] = small['rel_dist'] * facts['norm_star'] / small['mu']
  if facts['case'] == 'gap':
    out['gap_looseness'] = (
        facts['gap_const'] * small['mu'] / facts['norm_star']
    ) / small['rel_dist']
  mu0 = {r['dtype']: r for r in rows if r['mu'] == 0}
  out['mu0_rel_dist'] = mu0['float64']['rel_dist']
  out['mu0_rel_plain'] = mu0['float64']['rel_plain']
  out['mu0_rel_data'] = mu0['float64']['rel_data']
  out['tikhonov_holds'] = all(
      r['rel_plain'] <= out['star_rel_plain'] * (1 + 1e-12) for r in f64
  )
  f32 = by('float32')
  if f32:
    floor = min(f32, key=lambda r: r['rel_dist'])
    out['f32_floor'], out['f32_floor_mu'] = floor['rel_dist'], floor['mu']
    worse = [
        a['mu']
        for a, b in zip(f32, f64)
        if a['rel_dist'] > 2 * max(b['rel_dist'], 1e-300)
    ]
    out['f32_takeover_mu'] = max(worse, default=None)  # None: never
    tail = [r for r in f32 if r['mu'] <= floor['mu'] / 3]
    out['f32_tail_slope'] = (
        fit_slope([r['mu'] for r in tail], [r['rel_dist'] for r in tail])
        if len(tail) >= 3
        else None
    )
  return out


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  common.check_int(config.seed, 'seed', minimum=0)
  common.check_int(config.num_seeds, 'num_seeds')
  common.check_numbers(config.mus, 'mus', positive=True)
  common.check_number(config.fit_max_mu, 'fit_max_mu', positive=True)
  common.check_names(config.dtypes, 'dtypes', choices=('float64', 'float32'))
  if 'float64' not in config.dtypes:
    common.fail(
        'dtypes',
        "a tuple that includes 'float64' (the rate is " 'measured there)',
        config.dtypes,
    )
  names = list(config.settings_order)
  if sorted(names) != sorted(config.settings.keys()):
    common.fail(
        'settings_order',
        f'the settings ' f'{sorted(config.settings.keys())}, once each',
        names,
    )
  for name in names:
    s, where = config.settings[name], f'settings.{name}'
    for field in ('d_in', 'd_out', 'n', 'rank'):
      common.check_int(s[field], f'{where}.{field}')
    common.check_int(s.rank, f'{where}.rank')
    if s.rank > min(s.d_in, s.d_out):
      common.fail(
          f'{where}.rank',
          f'<= min(d_in, d_out) = ' f'{min(s.d_in, s.d_out)}',
          s.rank,
      )
    common.check_number(s.cond, f'{where}.cond', minimum=1)
    if s.x_rank is not None:
      common.check_int(s.x_rank, f'{where}.x_rank')
    if s.tie is not None:
      common.check_ints(s.tie, f'{where}.tie')


def run(config, workdir: str) -> None:
  """Measures every setting of `config.settings_order` for every seed.

  Writes results.json (curves and per-seed summary), summary.md,
  convergence.png and errors.png; no resume (a few minutes).
  """
  validate(config)
  curves, summary = [], []
  names = list(config.settings_order)
  with jax.enable_x64(True):
    for name in names:
      setting = dict(config.settings[name])
      tie = tuple(setting['tie']) if setting['tie'] else None
      for seed in range(config.seed, config.seed + config.num_seeds):
        rng = np.random.default_rng(seed)
        x, kernel = reference.make_problem(rng, **dict(setting, tie=tie))
        rows, facts = measure(
            x, kernel, setting['rank'], config.mus, config.dtypes
        )
        head = dict(
            setting=name,
            seed=seed,
            d_in=setting['d_in'],
            d_out=setting['d_out'],
            n=setting['n'],
            rank=setting['rank'],
        )
        curves += [dict(head, **r) for r in rows]
        summary.append(
            dict(head, **summarize_one(rows, facts, config.fit_max_mu))
        )
        logging.info('%s seed %d: %s', name, seed, summary[-1])
  common.finish(
      workdir,
      summarize(summary),
      plot,
      out=dict(curves=curves, summary=summary),
  )


def _median(rows, key):
  vals = [r[key] for r in rows if r.get(key) is not None]
  return float(np.median(vals)) if vals else math.nan


def summarize(summary: list[dict]) -> str:
  """Markdown: per setting, medians over seeds (min–max where it matters)."""
  table = []
  for name in dict.fromkeys(r['setting'] for r in summary):
    mine = [r for r in summary if r['setting'] == name]
    first = mine[0]
    loose = [r['looseness_min'] for r in mine] + [
        r['looseness_max'] for r in mine
    ]
    slopes = [r['slope'] for r in mine if r['slope'] is not None] or [
        float('nan')
    ]
    table.append(
        dict(
            setting=name,
            case=first['case'],
            shape=f"{first['d_in']}x{first['d_out']} n={first['n']} "
            f"r={first['rank']} k={first['data_rank']}",
            seeds=len(mine),
            slope=f'{min(slopes):.4f}–{max(slopes):.4f}',
            slope_all=_median(mine, 'slope_all'),
            looseness=f'{min(loose):.3g}–{max(loose):.3g}',
            looseness_asym=_median(mine, 'looseness_asym'),
            gap_looseness=_median(mine, 'gap_looseness'),
            bound_holds=all(r['bound_holds'] for r in mine),
            f32_floor=_median(mine, 'f32_floor'),
            f32_floor_mu=_median(mine, 'f32_floor_mu'),
            f32_tail_slope=_median(mine, 'f32_tail_slope'),
            f32_takeover_mu=max(
                (
                    r['f32_takeover_mu']
                    for r in mine
                    if r.get('f32_takeover_mu')
                ),
                default='never',
            ),
            mu0_dist=_median(mine, 'mu0_rel_dist'),
            plain_mu0=_median(mine, 'mu0_rel_plain'),
            plain_star=_median(mine, 'star_rel_plain'),
            data_mu0=_median(mine, 'mu0_rel_data'),
            data_star=_median(mine, 'star_rel_data'),
        )
    )
  rate = [
      'setting',
      'case',
      'shape',
      'seeds',
      'slope',
      'slope_all',
      'looseness',
      'looseness_asym',
      'gap_looseness',
      'bound_holds',
  ]
  f32 = [
      'setting',
      'f32_floor',
      'f32_floor_mu',
      'f32_tail_slope',
      'f32_takeover_mu',
      'mu0_dist',
      'plain_mu0',
      'plain_star',
      'data_mu0',
      'data_star',
  ]
  formats = dict(
      slope_all='.4f',
      gap_looseness='.3g',
      looseness_asym='.3g',
      f32_tail_slope='.2f',
      f32_floor='.2e',
      f32_floor_mu='.0e',
      f32_takeover_mu='.0e',
      mu0_dist='.3f',
      plain_mu0='.4f',
      plain_star='.4f',
      data_mu0='.2e',
      data_star='.2e',
  )
  return (
      '## Rate: ||K_mu - K_*||_F / ||K_*||_F against mu (float64)\n\n'
      'slope: fitted over mu <= fit_max_mu where the bound applies (min–max '
      'over seeds); slope_all: over all mu (median); looseness: bound / '
      'measured wherever the bound applies (min–max), _asym: at the '
      'smallest mu (median); gap_looseness: the Davis–Kahan constant '
      '(docs/method.md §5) alone (median).\n\n'
      + results.markdown_table(table, rate, formats)
      + '\n## Float32, and the mu = 0 solver next to K_*\n\n'
      'f32_floor: the smallest float32 distance (median) and its mu; '
      'f32_tail_slope: slope of the float32 curve below that mu; '
      'f32_takeover_mu: largest mu where float32 is 2x worse than float64 '
      '(any seed); mu0_dist: relative distance of the mu = 0 solution to '
      "K_*; plain = ||K - K'||/||K||, data = ||X(K - K')||/||XK|| for the "
      'mu = 0 solution and for K_* (medians).\n\n'
      + results.markdown_table(table, f32, formats)
  )


def plot(workdir: str) -> None:
  """convergence.png and errors.png from results.json alone (the first
  seed of every setting; one legend, outside the panels)."""
  res = common.read_results(workdir, None)
  curves, summary = res['curves'], res['summary']
  names = list(dict.fromkeys(r['setting'] for r in summary))
  seed0 = {r['setting']: r for r in summary if r['seed'] == summary[0]['seed']}
  pick = lambda name, dt: [
      r
      for r in curves
      if r['setting'] == name
      and r['seed'] == seed0[name]['seed']
      and r['dtype'] == dt
      and r['mu'] > 0
  ]
  cols = len(names)
  fig, axes = common.subplots(1, cols, figsize=(3.3 * cols, 3.4))
  for ax, name in zip(axes[0], names):
    s = seed0[name]
    for dt, style in (('float64', 'o-'), ('float32', 's--')):
      rows = pick(name, dt)
      if rows:
        ax.plot(
            [r['mu'] for r in rows],
            [r['rel_dist'] for r in rows],
            style,
            ms=3,
            label=dt,
        )
    rows = [r for r in pick(name, 'float64') if np.isfinite(r['bound_rel'])]
    ax.plot(
        [r['mu'] for r in rows],
        [r['bound_rel'] for r in rows],
        'k:',
        label='bound C(μ)μ',
    )
    ax.axhline(s['mu0_rel_dist'], color='r', lw=0.8, label='μ = 0 solver')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('μ')
    ax.set_title(f"{name} ({s['case']})\nslope {s['slope']:.3f}", fontsize=8)
  axes[0][0].set_ylabel('||K_μ − K_*||_F / ||K_*||_F')
  common.legend_outside(fig, axes)
  common.save_figure(fig, workdir, 'convergence.png')

  fig, axes = common.subplots(2, cols, figsize=(3.3 * cols, 5.6))
  for j, name in enumerate(names):
    s, rows = seed0[name], pick(name, 'float64')
    mus = [r['mu'] for r in rows]
    for i, (key, label) in enumerate(
        (('plain', "||K − K'||/||K||"), ('data', "||X(K − K')||/||XK||"))
    ):
      ax = axes[i][j]
      ax.plot(
          mus,
          [max(r[f'rel_{key}'], 1e-17) for r in rows],
          'o-',
          ms=3,
          label='K_μ',
      )
      ax.axhline(
          max(s[f'mu0_rel_{key}'], 1e-17),
          color='r',
          lw=0.8,
          label='μ = 0 solver',
      )
      ax.axhline(
          max(s[f'star_rel_{key}'], 1e-17), color='k', ls=':', label='K_*'
      )
      ax.set_xscale('log')
      ax.set_yscale('log')
      ax.set_xlabel('μ')
      if j == 0:
        ax.set_ylabel(label)
      if i == 0:
        ax.set_title(f"{name} ({s['case']})", fontsize=8)
  common.legend_outside(fig, axes)
  common.save_figure(fig, workdir, 'errors.png')
