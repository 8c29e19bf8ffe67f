r"""Speed of the per-layer solve and of the streaming statistics, as ratios.

Config and commands: experiments/configs/bench_solvers.py. Three parts, each
in a fresh child process (`python -m experiments.bench_solvers PART
CONFIG_JSON OUT_JSON`), on CPU pinned to one core before JAX starts, with one
LAPACK thread, so that XLA's matmuls, LAPACK's QR/SVD/Cholesky and SciPy get
the same single core:

* solve: `registry.solve(method, K, stats, rank)` as the pipeline calls it
  (argument checks, float64 steps, transfers included), from statistics
  already computed (R for coala, the float32 Gram for the others) to
  factors, at the uniform-ratio rank. X is Gaussian (`rows_per_d · d_in`
  rows), so no method retries: the normal path is timed.
* profile: the same solves cut into their kernels (coala: `R K`, the SVD;
  svd_llm: the float64 Cholesky + inverse, the float32 scaled SVD).
* stream: one block of b rows into the statistics: the fold
  `R ← qr_r([R; X_b])` (`qr.fold_r_unchecked`, what calibration runs) against
  `G ← G + X_bᵀX_b` (float32, precision HIGHEST); beside them the same JAX
  QR on the block alone (the fold if redoing the triangle cost nothing),
  LAPACK's structured triangle-plus-block QR `stpqrt` through SciPy (it
  never touches the zeros of R), and SciPy's `sgeqrf` of the same stacked
  matrix (LAPACK without JAX, optimal workspace).

Timings: `timing.time_calls` (a warm-up call that also compiles, then
rounds calling every function once, round-robin, so that load changes on a
shared machine hit all alike); medians are the reported figure, minima are
kept beside them. Ratios are always of two timings from the same round-robin.
The module stays light at import (the children import it before JAX starts):
JAX, the library and experiments.common are imported inside the functions.
"""

import functools
import os

from absl import logging
import numpy as np
import tqdm

from ctxlr import results
from experiments import child
from experiments import timing

PARTS = ('solve', 'profile', 'stream')
PLATFORMS = ('cpu', 'gpu', 'tpu')
_HIGHEST = 'highest'


def _pin(cfg: dict) -> int | None:
  """On CPU, pins this process to one core (before JAX starts)."""
  return timing.pin_to_one_core() if cfg['platform'] == 'cpu' else None


def _problem(cfg: dict, d_in: int, d_out: int):
  """(K, LayerStats, rank) of a Gaussian X of `rows_per_d · d_in` rows."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctxlr import stats as stats_lib  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import solvers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng([cfg['seed'], d_in, d_out])
  x = rng.standard_normal((cfg['rows_per_d'] * d_in, d_in), np.float32)
  kernel = jnp.asarray(rng.standard_normal((d_in, d_out), np.float32))
  stats = jax.block_until_ready(stats_lib.stats_from_x(jnp.asarray(x)))
  return kernel, stats, solvers.rank_for_ratio(d_in, d_out, cfg['ratio'])


def _solve(method: str, kernel, stats, *, rank: int, infos=None):
  """`registry.solve`'s factors; its SolveInfo goes into `infos[method]`."""
  from ctxlr import registry  # pylint: disable=g-import-not-at-top

  factors, info = registry.solve(method, kernel, stats, rank=rank)
  if infos is not None:
    infos[method] = info
  return factors


def solve_part(cfg: dict) -> list[dict]:
  """Seconds per solve of each method and its ratio to the baseline."""
  core = _pin(cfg)
  rows = []
  for d_in, d_out in tqdm.tqdm(cfg['shapes'], desc='solve', unit='shape'):
    kernel, stats, rank = _problem(cfg, d_in, d_out)
    infos = {}
    calls = {
        m: (
            functools.partial(_solve, m, rank=rank, infos=infos),
            (kernel, stats),
        )
        for m in cfg['methods']
    }
    t = timing.time_calls(
        calls, repeats=cfg['repeats'], min_seconds=cfg['min_seconds']
    )
    base = t[cfg['baseline']]
    for m in cfg['methods']:
      rows.append(
          dict(
              d_in=d_in,
              d_out=d_out,
              rank=rank,
              method=m,
              core=core,
              median_s=t[m]['median'],
              min_s=t[m]['min'],
              calls=t[m]['calls'],
              cpu_s=t[m]['cpu'],
              ratio=t[m]['median'] / base['median'],
              ratio_min=t[m]['min'] / base['min'],
              retries=infos[m].retries,
              failed=infos[m].failed,
          )
      )
      logging.info('solve %s: %s', (d_in, d_out), rows[-1])
  return rows


def profile_part(cfg: dict) -> list[dict]:
  """The solves of coala and svd_llm cut into their kernels."""
  # pylint: disable=protected-access  (the private jitted kernels are timed)
  _pin(cfg)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctxlr import baselines  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import solvers  # pylint: disable=g-import-not-at-top

  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision=_HIGHEST))
  svd = jax.jit(lambda m: jnp.linalg.svd(m, full_matrices=False))

  def whitening(gram):
    with jax.enable_x64(True):
      return jax.block_until_ready(baselines._svd_llm_whitening(gram))

  rows = []
  for d_in, d_out in tqdm.tqdm(cfg['shapes'], desc='profile', unit='shape'):
    kernel, stats, rank = _problem(cfg, d_in, d_out)
    s, s_inv = whitening(stats.gram)[:2]
    pieces = {
        ('coala', 'whole solve'): (
            functools.partial(_solve, 'coala', rank=rank),
            (kernel, stats),
        ),
        ('coala', 'jitted core: R K, SVD, K V'): (
            functools.partial(solvers._ctx_full, rank=rank),
            (kernel, stats.r),
        ),
        ('coala', 'R K (float32 matmul)'): (matmul, (stats.r, kernel)),
        ('coala', 'SVD of R K'): (svd, (matmul(stats.r, kernel),)),
        ('svd_llm', 'whole solve'): (
            functools.partial(_solve, 'svd_llm', rank=rank),
            (kernel, stats),
        ),
        ('svd_llm', 'float64 Cholesky + inverse'): (whitening, (stats.gram,)),
        ('svd_llm', 'float32 W S, SVD, S⁻¹ products'): (
            baselines._scaled_svd_full,
            (kernel, s, s_inv),
        ),
        ('svd_llm', 'SVD of W S'): (svd, (matmul(kernel.T, s),)),
    }
    t = timing.time_calls(
        pieces, repeats=cfg['repeats'], min_seconds=cfg['min_seconds']
    )
    for (method, piece), v in t.items():
      whole = t[method, 'whole solve']['median']
      rows.append(
          dict(
              d_in=d_in,
              d_out=d_out,
              rank=rank,
              method=method,
              piece=piece,
              median_s=v['median'],
              min_s=v['min'],
              share=v['median'] / whole,
          )
      )
    logging.info('profile %s done', (d_in, d_out))
  return rows


def stream_part(cfg: dict) -> list[dict]:
  """Per-token cost of one block into R (fold) vs into the Gram."""
  core = _pin(cfg)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from scipy.linalg import lapack  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import qr  # pylint: disable=g-import-not-at-top

  gram_update = jax.jit(lambda g, x: g + jnp.matmul(x.T, x, precision=_HIGHEST))

  def tpqrt(a, b):  # [A; B] → R with A upper triangular: LAPACK stpqrt
    out = lapack.stpqrt(0, min(cfg['tpqrt_nb'], a.shape[0]), a, b)
    assert out[-1] == 0, out[-1]
    return out[0]

  def geqrf(c):  # with the optimal (blocked) workspace, as JAX asks
    lwork = int(lapack.sgeqrf_lwork(*c.shape)[0])
    return lapack.sgeqrf(c, lwork=lwork)[0]

  rows = []
  for d in tqdm.tqdm(cfg['d'], desc='stream', unit='width'):
    rng = np.random.default_rng([cfg['seed'], d])
    r = qr.qr_r(rng.standard_normal((2 * d, d), np.float32))
    r_np = np.asfortranarray(np.asarray(r))
    gram = jnp.zeros((d, d), jnp.float32)
    for b in cfg['block_rows']:
      x_np = np.asfortranarray(rng.standard_normal((b, d), np.float32))
      x = jnp.asarray(x_np)
      stacked = np.asfortranarray(np.vstack([r_np, x_np]))
      calls = dict(
          fold=(qr.fold_r_unchecked, (r, x)),
          gram=(gram_update, (gram, x)),
          qr_block=(qr.qr_r_unchecked, (x,)),
          tpqrt=(tpqrt, (r_np, x_np)),
          sgeqrf=(geqrf, (stacked,)),
      )
      t = timing.time_calls(
          calls, repeats=cfg['repeats'], min_seconds=cfg['min_seconds']
      )
      row = dict(
          d=d,
          b=b,
          b_over_d=b / d,
          core=core,
          flop_ratio=timing.fold_flop_ratio(b, d),
      )
      for name, v in t.items():
        row[f'{name}_s'] = v['median']
        row[f'{name}_min_s'] = v['min']
        row[f'{name}_us_per_token'] = v['median'] / b * 1e6
        row[f'{name}_over_gram'] = v['median'] / t['gram']['median']
      rows.append(row)
      logging.info(
          'stream d=%d b=%d: fold/gram %.2f', d, b, row['fold_over_gram']
      )
  return rows


def model_projection(stream: list[dict], cfg: dict) -> list[dict]:
  """Seconds to stream `model_tokens` through every distinct model input.

  Derived from the measured per-token costs: Σ_inputs tokens · t(d, b) / b,
  per block size b (only widths that were measured).
  """
  out = []
  for b in dict.fromkeys(r['b'] for r in stream):
    per = {r['d']: r for r in stream if r['b'] == b}
    if not all(w in per for w, _ in cfg['model_inputs']):
      continue
    row = dict(b=b, tokens=cfg['model_tokens'])
    for name in ('fold', 'gram', 'tpqrt', 'qr_block'):
      row[f'{name}_s'] = sum(
          cfg['model_tokens'] * count * per[w][f'{name}_s'] / b
          for w, count in cfg['model_inputs']
      )
    row['fold_over_gram'] = row['fold_s'] / row['gram_s']
    row['tpqrt_over_gram'] = row['tpqrt_s'] / row['gram_s']
    out.append(row)
  return out


def _child(part: str, cfg: dict, workdir: str) -> object:
  """Runs one part in a fresh Python process; returns its JSON result."""
  env = dict(os.environ)
  if cfg['platform'] == 'cpu':
    env['JAX_PLATFORMS'] = 'cpu'
  return child.run(
      'experiments.bench_solvers',
      part,
      cfg,
      workdir,
      env=env,
      timeout_s=cfg['timeout_s'],
      blas_threads=cfg['blas_threads'],
  )


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  from experiments import common  # pylint: disable=g-import-not-at-top

  common.check_parts(config.parts, PARTS)
  common.check_int(config.seed, 'seed', minimum=0)
  common.check_choice(config.platform, PLATFORMS, 'platform')
  common.check_int(config.repeats, 'repeats')
  common.check_number(config.min_seconds, 'min_seconds', minimum=0)
  common.check_number(config.timeout_s, 'timeout_s', positive=True)
  common.check_int(config.blas_threads, 'blas_threads', minimum=0)
  solve = config.solve
  for path, shapes in (
      ('solve.shapes', solve.shapes),
      ('profile.shapes', config.profile.shapes),
  ):
    if not shapes or not all(
        isinstance(s, (tuple, list)) and len(s) == 2 for s in shapes
    ):
      common.fail(path, 'a non-empty tuple of (d_in, d_out) pairs', shapes)
    for i, shape in enumerate(shapes):
      common.check_ints(shape, f'{path}[{i}]')
  common.check_methods(solve.methods, 'solve.methods', float64=False)
  common.check_choice(solve.baseline, tuple(solve.methods), 'solve.baseline')
  common.check_ratio(solve.ratio, 'solve.ratio')
  common.check_int(solve.rows_per_d, 'solve.rows_per_d')
  stream = config.stream
  common.check_ints(stream.d, 'stream.d')
  common.check_ints(stream.block_rows, 'stream.block_rows')
  common.check_int(stream.tpqrt_nb, 'stream.tpqrt_nb')
  common.check_int(stream.model_tokens, 'stream.model_tokens')
  for i, pair in enumerate(stream.model_inputs):
    common.check_ints(pair, f'stream.model_inputs[{i}]')


def run(config, workdir: str) -> None:
  """Runs each part of `config.parts` in a fresh child process; writes
  results.json, summary.md and bench_solvers.png. A rerun redoes the parts
  in `config.parts` and keeps the others in results.json if the machine
  description is the same, so one part can be remeasured.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top

  validate(config)
  shared = dict(
      seed=config.seed,
      platform=config.platform,
      repeats=config.repeats,
      min_seconds=config.min_seconds,
      timeout_s=config.timeout_s,
      blas_threads=config.blas_threads,
  )
  solve_cfg = dict(config.solve.to_dict(), **shared)
  cfgs = dict(
      solve=solve_cfg,
      profile=dict(solve_cfg, shapes=config.profile.to_dict()['shapes']),
      stream=dict(config.stream.to_dict(), **shared),
  )
  out = common.read_results(workdir, {})
  machine = dict(
      cpu_count=os.cpu_count(),
      cpus_usable=len(os.sched_getaffinity(0)),
      platform=config.platform,
      devices=str(jax.devices()),
      jax=jax.__version__,
      blas_threads=config.blas_threads,
      repeats=config.repeats,
  )
  if out.get('machine') != machine:  # another machine: start afresh
    out = dict(machine=machine)
  out['baseline'] = config.solve.baseline
  out.setdefault('load', {})
  for part in PARTS:  # parts not asked for are kept
    if part in config.parts:
      start = os.getloadavg()[0]
      out[part] = _child(part, cfgs[part], workdir)
      out['load'][part] = [start, os.getloadavg()[0]]
  if 'stream' in config.parts:
    out['model_stream'] = model_projection(out['stream'], cfgs['stream'])
  common.finish(workdir, summarize(out), plot, out=out)


def _table(rows: list[dict], keys: list[str], values: list[str]) -> str:
  """Markdown of `keys` then `values` columns, values to 3 digits."""
  return results.markdown_table(rows, keys + values, {k: '.3g' for k in values})


def summarize(out: dict) -> str:
  """Markdown tables of the parts present in `out`."""
  m = out['machine']
  loads = ', '.join(
      f'{p} {a:.1f} → {b:.1f}' for p, (a, b) in out['load'].items()
  )
  text = [
      f"Machine: {m['platform']}, {m['cpus_usable']} usable CPU cores "
      f'(1-min load average at the start → end of each part: {loads}), '
      f"jax {m['jax']}; each part in a child process pinned to one core "
      '(CPU), LAPACK threads: '
      f"{m['blas_threads'] or 'default'}. Times: medians of >= "
      f"{m['repeats']} calls after a warm-up, round-robin.\n"
  ]
  if 'solve' in out:
    base = out['baseline']
    lines = {}
    for r in out['solve']:
      line = lines.setdefault(
          (r['d_in'], r['d_out']),
          dict(d_in=r['d_in'], d_out=r['d_out'], rank=r['rank']),
      )
      line[f"{r['method']}_s"] = r['median_s']
      line[f"{r['method']}/{base}"] = r['ratio']
      line[f"{r['method']}/{base} (min)"] = r['ratio_min']
    methods = list(dict.fromkeys(r['method'] for r in out['solve']))
    cols = (
        ['d_in', 'd_out', 'rank']
        + [f'{x}_s' for x in methods]
        + [f'{x}/{base}' for x in methods if x != base]
        + [f'{x}/{base} (min)' for x in methods if x != base]
    )
    text += [
        f'### Whole per-layer solve (statistics → factors), ratio to '
        f'{base} in the same run\n',
        results.markdown_table(
            list(lines.values()), cols, {c: '.3g' for c in cols[3:]}
        ),
        '\nTarget: coala/svd_llm <= 1.5.\n',
    ]
  if 'profile' in out:
    text += [
        '### Where the solve time goes (medians, share of the whole '
        'solve)\n',
        results.markdown_table(
            out['profile'],
            ['d_in', 'd_out', 'method', 'piece', 'median_s', 'share'],
            dict(median_s='.4g', share='.2f'),
        ),
    ]
  if 'stream' in out:
    text += [
        '### Streaming statistics: one block of b rows\n',
        _table(
            out['stream'],
            ['d', 'b'],
            [
                'gram_us_per_token',
                'fold_us_per_token',
                'fold_over_gram',
                'tpqrt_over_gram',
                'qr_block_over_gram',
                'sgeqrf_over_gram',
                'flop_ratio',
            ],
        ),
        '\nfold: `qr.fold_r_unchecked` (JAX, geqrf of the stacked [R; X_b]); '
        'gram: XᵀX added in float32; tpqrt: LAPACK stpqrt (SciPy), '
        'triangle + block without touching the zeros of R; qr_block: '
        'the same JAX geqrf on X_b alone (the fold if the triangle cost '
        'nothing); sgeqrf: SciPy LAPACK geqrf of the stacked matrix '
        '(optimal workspace); flop_ratio: docs/method.md §3 count. '
        'Target: fold/gram <= 2.\n',
    ]
  if out.get('model_stream'):
    text += [
        "### Projected: the default model's distinct inputs, from the "
        'per-token costs above\n',
        _table(
            out['model_stream'],
            ['b', 'tokens'],
            [
                'gram_s',
                'fold_s',
                'tpqrt_s',
                'qr_block_s',
                'fold_over_gram',
                'tpqrt_over_gram',
            ],
        ),
    ]
  return '\n'.join(text)


def plot(workdir: str) -> None:
  """bench_solvers.png from results.json alone: ratios, one panel a part."""
  from experiments import common  # pylint: disable=g-import-not-at-top

  out = common.read_results(workdir, None)
  panels = [p for p in ('solve', 'stream') if p in out]
  if not panels:
    return
  fig, axes = common.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
  for ax, part in zip(axes[0], panels):
    if part == 'solve':
      shapes = list(
          dict.fromkeys((r['d_in'], r['d_out']) for r in out['solve'])
      )
      methods = [
          m
          for m in dict.fromkeys(r['method'] for r in out['solve'])
          if m != out['baseline']
      ]
      for i, method in enumerate(methods):
        ratio = {
            (r['d_in'], r['d_out']): r['ratio']
            for r in out['solve']
            if r['method'] == method
        }
        ax.bar(
            np.arange(len(shapes)) + 0.8 * (i - 0.5) / len(methods),
            [ratio[s] for s in shapes],
            0.8 / len(methods),
            label=method,
        )
      ax.axhline(1, color='k', lw=0.8)
      ax.axhline(1.5, color='r', lw=0.8, ls='--', label='target 1.5')
      ax.set_xticks(
          range(len(shapes)), [f'{a}×{b}' for a, b in shapes], fontsize=7
      )
      ax.set(
          ylabel=f"solve time / {out['baseline']} (median)",
          xlabel='(d_in, d_out)',
          title='Per-layer solve',
      )
    else:
      labels = [f"d={r['d']}\nb={r['b']}" for r in out['stream']]
      for i, name in enumerate(('fold', 'tpqrt', 'qr_block')):
        ax.bar(
            np.arange(len(labels)) + 0.8 * (i - 1) / 3,
            [r[f'{name}_over_gram'] for r in out['stream']],
            0.8 / 3,
            label=name,
        )
      ax.axhline(1, color='k', lw=0.8)
      ax.axhline(2, color='r', lw=0.8, ls='--', label='target 2')
      ax.set_xticks(range(len(labels)), labels, fontsize=7)
      ax.set(
          ylabel='time per token / Gram update (median)',
          title='Streaming statistics',
      )
    ax.legend(fontsize=7)
  common.save_figure(fig, workdir, 'bench_solvers.png')


if __name__ == '__main__':
  child.serve(dict(solve=solve_part, profile=profile_part, stream=stream_part))
