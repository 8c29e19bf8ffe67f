"""Streaming and multi-device TSQR: fold cost, strong scaling, memory.

Three measurements (config: experiments/configs/bench_tsqr.py):

* fold: time of one fold `R ← qr_r([R; X_b])` for b = d … 16d rows, as a
  ratio to `G ← G + X_bᵀX_b` (the Gram route, float32, precision HIGHEST) on
  the same block in the same run; with docs/method.md §3's flop ratio beside it.
* scaling: `tsqr` of one fixed X over 1, 2, 4, 8 forced host devices (a
  child process started with XLA_FLAGS=--xla_force_host_platform_device_count),
  parallel efficiency T_1 / (D · T_D), both combines.
* memory: peak RSS of a fresh child process streaming n rows of width d
  through `accumulate_r` from a generator, for each n.

The children are this module run as a script (`python -m
experiments.bench_tsqr PART CONFIG_JSON OUT_JSON`). Figures are drawn from
results.json alone (`plot`). The module stays light at import (the children
import it before their measurements, the memory one counting its own peak
RSS): JAX and experiments.common are imported inside the functions.
"""

import functools
import os
import resource
import time

from absl import logging
import numpy as np

from ctxlr import results
from experiments import child
from experiments import timing

PARTS = ('fold', 'scaling', 'memory')


def fold_cost(cfg: dict) -> list[dict]:
  """Fold vs Gram update, per block size b = multiple · d, on one core.

  The process is pinned to one core first (before JAX starts its thread
  pools), so that XLA's matmul and LAPACK's QR get the same resources.
  """
  core = timing.pin_to_one_core()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import qr  # pylint: disable=g-import-not-at-top

  d = cfg['d']
  rng = np.random.default_rng(cfg['seed'])
  r = qr.qr_r(rng.standard_normal((2 * d, d)).astype(np.float32))
  gram = jnp.zeros((d, d), jnp.float32)
  update = jax.jit(
      lambda g, x: g + jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
  )
  rows = []
  for multiple in cfg['multiples']:
    b = multiple * d
    x = jnp.asarray(rng.standard_normal((b, d)).astype(np.float32))
    t = timing.time_calls(
        dict(fold=(qr.fold_r_unchecked, (r, x)), gram=(update, (gram, x))),
        repeats=cfg['repeats'],
        min_seconds=cfg['min_seconds'],
    )
    t_fold, t_gram = t['fold']['min'], t['gram']['min']
    rows.append(
        dict(
            d=d,
            b=b,
            b_over_d=multiple,
            core=core,
            fold_s=t_fold,
            gram_s=t_gram,
            ratio=t_fold / t_gram,
            ratio_of_medians=t['fold']['median'] / t['gram']['median'],
            fold_cpu_s=t['fold']['cpu'],
            gram_cpu_s=t['gram']['cpu'],
            cpu_ratio=t['fold']['cpu'] / t['gram']['cpu'],
            flop_ratio=timing.fold_flop_ratio(b, d),
            fold_rows_per_s=b / t_fold,
        )
    )
    logging.info(
        'fold d=%d b=%d: %.4fs, gram %.4fs, ratio %.2f',
        d,
        b,
        t_fold,
        t_gram,
        t_fold / t_gram,
    )
  return rows


def scaling(cfg: dict) -> list[dict]:
  """Strong scaling of `tsqr` (child process with forced devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import tsqr  # pylint: disable=g-import-not-at-top

  x = (
      np.random.default_rng(cfg['seed'])
      .standard_normal((cfg['rows'], cfg['d']))
      .astype(np.float32)
  )
  calls = {}
  for combine in cfg['combines']:
    for size in cfg['devices']:
      mesh = jax.make_mesh((size,), ('rows',), devices=jax.devices()[:size])
      xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P('rows', None)))
      calls[combine, size] = (tsqr._tsqr_fn(mesh, 'rows', combine), (xs,))
  load = os.getloadavg()[0]
  times = timing.time_calls(
      calls, repeats=cfg['repeats'], min_seconds=cfg['min_seconds']
  )
  rows = []
  for (combine, size), t in times.items():
    base = times[combine, min(cfg['devices'])]['min'] * min(cfg['devices'])
    rows.append(
        dict(
            combine=combine,
            devices=size,
            rows=cfg['rows'],
            d=cfg['d'],
            seconds=t['min'],
            median_seconds=t['median'],
            cpu_seconds=t['cpu'],
            busy_cores=t['cpu'] / t['mean'],
            load_avg_1min=load,
            speedup=base / t['min'],
            efficiency=base / (size * t['min']),
        )
    )
    logging.info('tsqr %s on %d devices: %.4fs', combine, size, t['min'])
  return rows


def memory(cfg: dict) -> dict:
  """Peak RSS of streaming cfg['rows'] rows (run in a fresh process)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import streaming  # pylint: disable=g-import-not-at-top

  d, n, gen = cfg['d'], cfg['rows'], cfg['gen_block']
  block_size = cfg['block_size'] or None
  rng = np.random.default_rng(cfg['seed'])

  def blocks(total):
    for start in range(0, total, gen):
      yield rng.standard_normal((min(gen, total - start), d), np.float32)

  def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

  streaming.accumulate_r(blocks(gen), block_size=block_size)  # compile
  warm_peak = peak_bytes()
  start = time.perf_counter()
  r = streaming.accumulate_r(blocks(n), block_size=block_size)
  seconds = time.perf_counter() - start
  assert bool(jnp.all(jnp.isfinite(r)))
  return dict(
      rows=n,
      d=d,
      block_size=block_size or streaming.default_block_size(d),
      gen_block=gen,
      peak_rss_mb=peak_bytes() / 2**20,
      warm_peak_rss_mb=warm_peak / 2**20,
      seconds=seconds,
      x_mb=n * d * 4 / 2**20,
  )


def _child(
    part: str,
    cfg: dict,
    devices: int,
    blas_threads: int,
    timeout_s: int,
    mmap_threshold: int = 0,
) -> object:
  """Runs one part in a fresh Python process; returns its JSON result."""
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
  )
  env.pop('JAX_NUM_CPU_DEVICES', None)
  env.pop('MALLOC_MMAP_THRESHOLD_', None)
  if mmap_threshold:  # glibc: blocks >= this are mmapped, freed at once
    env['MALLOC_MMAP_THRESHOLD_'] = str(mmap_threshold)
  return child.run(
      'experiments.bench_tsqr',
      part,
      cfg,
      cfg['workdir'],
      env=env,
      timeout_s=timeout_s,
      blas_threads=blas_threads,
  )


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  from ctxlr.linalg import tsqr  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top

  common.check_parts(config.parts, PARTS)
  common.check_int(config.seed, 'seed', minimum=0)
  common.check_int(config.repeats, 'repeats')
  common.check_number(config.min_seconds, 'min_seconds', minimum=0)
  common.check_number(config.timeout_s, 'timeout_s', positive=True)
  common.check_int(config.blas_threads, 'blas_threads', minimum=0)
  common.check_int(config.fold.d, 'fold.d')
  common.check_ints(config.fold.multiples, 'fold.multiples')
  common.check_int(config.scaling.rows, 'scaling.rows')
  common.check_int(config.scaling.d, 'scaling.d')
  common.check_ints(config.scaling.devices, 'scaling.devices')
  common.check_names(
      config.scaling.combines, 'scaling.combines', choices=tsqr.COMBINES
  )
  common.check_int(config.memory.d, 'memory.d')
  common.check_ints(config.memory.rows, 'memory.rows')
  common.check_int(config.memory.gen_block, 'memory.gen_block')
  common.check_int(config.memory.block_size, 'memory.block_size', minimum=0)
  common.check_ints(
      config.memory.mmap_thresholds, 'memory.mmap_thresholds', minimum=0
  )


def run(config, workdir: str) -> None:
  """Runs each part of `config.parts` in a fresh child process.

  Writes results.json (the machine, then one entry per part), summary.md
  and bench_tsqr.png; no resume (a rerun measures again: timings belong to
  one run on one machine).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top

  validate(config)
  shared = dict(
      repeats=config.repeats,
      min_seconds=config.min_seconds,
      workdir=workdir,
      seed=config.seed,
  )
  launch = functools.partial(
      _child, blas_threads=config.blas_threads, timeout_s=config.timeout_s
  )
  out = dict(
      machine=dict(
          cpu_count=os.cpu_count(),
          cpus_usable=len(os.sched_getaffinity(0)),
          load_avg_1min=os.getloadavg()[0],
          platform=jax.devices()[0].platform,
          jax=jax.__version__,
          blas_threads=config.blas_threads,
      )
  )
  if 'fold' in config.parts:
    out['fold'] = launch('fold', dict(config.fold.to_dict(), **shared), 1)
  if 'scaling' in config.parts:
    out['scaling'] = launch(
        'scaling',
        dict(config.scaling.to_dict(), **shared),
        max(config.scaling.devices),
    )
  if 'memory' in config.parts:
    mem_cfg = config.memory.to_dict()
    thresholds = mem_cfg.pop('mmap_thresholds')
    out['memory'] = [
        dict(
            launch(
                'memory', dict(mem_cfg, rows=n, **shared), 1, mmap_threshold=t
            ),
            mmap_threshold=t,
        )
        for t in thresholds
        for n in config.memory.rows
    ]
    out['memory_spread'] = {}
    for t in thresholds:
      peaks = [
          m['peak_rss_mb'] for m in out['memory'] if m['mmap_threshold'] == t
      ]
      out['memory_spread'][str(t)] = max(peaks) / min(peaks) - 1
  common.finish(workdir, summarize(out), plot, out=out)


def summarize(out: dict) -> str:
  """Markdown tables of the measurements present in `out`."""
  m = out['machine']
  text = [
      f"Machine: {m['cpus_usable']} usable CPU cores (load average "
      f"{m['load_avg_1min']:.1f} at the start), jax {m['jax']}, "
      f"LAPACK threads: {m['blas_threads'] or 'default'}.\n"
  ]
  if 'fold' in out:
    text += [
        f"### Fold cost vs block size (d = {out['fold'][0]['d']})\n",
        results.markdown_table(
            out['fold'],
            [
                'b_over_d',
                'b',
                'fold_s',
                'gram_s',
                'ratio',
                'cpu_ratio',
                'flop_ratio',
            ],
            dict(
                fold_s='.4g',
                gram_s='.4g',
                ratio='.2f',
                cpu_ratio='.2f',
                flop_ratio='.2f',
            ),
        ),
        '\nOne core (process pinned). ratio: wall time of one fold over one '
        'Gram update XᵀX of the same block (minima); cpu_ratio: the same in '
        'CPU time per call; flop_ratio: docs/method.md §3 flop count of the '
        'fold over 2bd².\n',
    ]
  if 'scaling' in out:
    sc = out['scaling']
    text += [
        f"### Strong scaling of tsqr ({sc[0]['rows']} × {sc[0]['d']}, "
        'forced host devices)\n',
        results.markdown_table(
            sc,
            [
                'combine',
                'devices',
                'seconds',
                'speedup',
                'efficiency',
                'cpu_seconds',
                'busy_cores',
            ],
            dict(
                seconds='.4g',
                speedup='.2f',
                efficiency='.2f',
                cpu_seconds='.4g',
                busy_cores='.2f',
            ),
        ),
        '\nefficiency = T_1 / (D · T_D) on wall-clock minima; cpu_seconds: '
        'CPU time per call over all threads; busy_cores = CPU time / mean '
        'wall time: the cores the run actually got.\n',
    ]
  if 'memory' in out:
    mem = out['memory']
    rows = [r['rows'] for r in mem]
    text += [
        f"### Peak RSS streaming rows of d = {mem[0]['d']}\n",
        results.markdown_table(
            mem,
            [
                'mmap_threshold',
                'rows',
                'block_size',
                'peak_rss_mb',
                'warm_peak_rss_mb',
                'x_mb',
                'seconds',
            ],
            dict(
                peak_rss_mb='.0f',
                warm_peak_rss_mb='.0f',
                x_mb='.0f',
                seconds='.1f',
            ),
        ),
        '\nmmap_threshold 0: glibc defaults; else MALLOC_MMAP_THRESHOLD_ '
        '(bytes): larger blocks go back to the OS when freed, so RSS follows '
        "live memory rather than the allocator's cache. warm_peak_rss_mb: "
        'peak after JAX start-up and one compiled fold.\n',
    ]
    for t, spread in out['memory_spread'].items():
      text.append(
          f'Peak RSS spread (max/min − 1), mmap_threshold {t}: '
          f'{spread:.1%} while the rows grow '
          f'{max(rows) / min(rows):.0f}×.\n'
      )
  return '\n'.join(text)


def _plot_fold(ax, out: dict) -> None:
  fold = out['fold']
  ax.plot(
      [f['b_over_d'] for f in fold],
      [f['ratio'] for f in fold],
      'o-',
      label='measured time ratio',
  )
  ax.plot(
      [f['b_over_d'] for f in fold],
      [f['flop_ratio'] for f in fold],
      's--',
      label='flop ratio (docs/method.md §3)',
  )
  ax.set(
      xscale='log',
      xlabel='block rows b / d',
      ylabel='fold / Gram update',
      title=f"Fold cost, d = {fold[0]['d']}",
  )
  ax.axhline(1, color='gray', lw=0.5)
  ax.minorticks_off()
  ax.set_xticks(
      [f['b_over_d'] for f in fold], [str(f['b_over_d']) for f in fold]
  )
  ax.legend()


def _plot_scaling(ax, out: dict) -> None:
  for combine in sorted({s['combine'] for s in out['scaling']}):
    sc = [s for s in out['scaling'] if s['combine'] == combine]
    ax.plot(
        [s['devices'] for s in sc],
        [s['efficiency'] for s in sc],
        'o-',
        label=combine,
    )
  devices = sorted({s['devices'] for s in out['scaling']})
  cores = out['machine']['cpus_usable']
  ax.plot(
      devices,
      [min(1, cores / k) for k in devices],
      'k:',
      label=f'bound with {cores} idle cores',
  )
  ax.set(
      xscale='log',
      xlabel='devices',
      ylabel='parallel efficiency',
      title='Strong scaling of tsqr',
      ylim=(0, 1.2),
  )
  ax.minorticks_off()
  ax.set_xticks(devices, [str(k) for k in devices])
  ax.legend()


def _plot_memory(ax, out: dict) -> None:
  for t in sorted({m['mmap_threshold'] for m in out['memory']}):
    mem = [m for m in out['memory'] if m['mmap_threshold'] == t]
    ax.plot(
        [m['rows'] for m in mem],
        [m['peak_rss_mb'] for m in mem],
        'o-',
        label='peak RSS, ' + (f'mmap threshold {t}' if t else 'glibc default'),
    )
  ax.plot(
      [m['rows'] for m in mem],
      [m['x_mb'] for m in mem],
      's--',
      label='size of X itself',
  )
  ax.set(
      xscale='log',
      yscale='log',
      xlabel='rows streamed',
      ylabel='MiB',
      title=f"Memory, d = {mem[0]['d']}",
  )
  ax.legend()


def plot(workdir: str) -> None:
  """bench_tsqr.png from results.json alone: one panel per part present."""
  from experiments import common  # pylint: disable=g-import-not-at-top

  out = common.read_results(workdir, None)
  drawers = [
      (part, fn)
      for part, fn in (
          ('fold', _plot_fold),
          ('scaling', _plot_scaling),
          ('memory', _plot_memory),
      )
      if part in out
  ]
  if not drawers:
    return
  fig, axes = common.subplots(1, len(drawers), figsize=(4.7 * len(drawers), 4))
  for ax, (_, fn) in zip(axes[0], drawers):
    fn(ax, out)
  common.save_figure(fig, workdir, 'bench_tsqr.png')


if __name__ == '__main__':
  child.serve(dict(fold=fold_cost, scaling=scaling, memory=memory))
