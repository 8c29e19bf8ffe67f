"""Pipeline throughput against its floors, as ratios measured in one run.

Parts (config: experiments/configs/bench_pipeline.py), each in a fresh
child process (`python -m experiments.bench_pipeline PART CONFIG OUT`):

* throughput: tokens/s of (a) the plain jitted forward pass at the
  evaluation batch shape, (b) `evaluation.perplexity`, (c) calibration with
  R only, (d) with the Gram only (what SVD-LLM accumulates), (e) with both;
  whole passes timed round-robin (`timing.time_calls`), compile time apart;
  then (f) calibration with R folded densely (`qr.fold_r_dense`, what
  accelerators and an install without the LAPACK extension run).
* solve: the solve of every layer (`pipeline.factorize_layers`, coala)
  against the same SVDs of `R K` run back to back in LAPACK (SciPy).
* fold: one fold of a calibration block into R (LAPACK ?tpqrt as the XLA
  FFI call calibration runs on CPU, the same through SciPy on host arrays,
  the JAX recursion of `linalg/tpqrt.py`, the dense QR of `[X_b; R]`)
  against the Gram update, per distinct input width, one pinned core.
* scaling: seconds and peak RSS of calibration (R only) at growing token
  counts, one child each, next to the size the stacked activations would take.
* processes: weak scaling of data-parallel calibration, 1 process on 1 core
  against 2 processes × 1 device on 2 cores (`jax.distributed`, gloo), twice
  the tokens.

Writes results.json (a rerun skips finished parts), summary.md and
bench_pipeline.png, redrawn from results.json by `plot`. `compare_with`
names another run's workdir (the same parts on other BLAS kernels, say):
its results are kept under `compared` and its headline ratios are set beside
this run's.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import time

from absl import logging
import numpy as np

from ctxlr import results
from experiments import child
from experiments import timing

PARTS = ('throughput', 'solve', 'fold', 'scaling', 'processes')
THROUGHPUT = (  # the calls of the throughput part
    'forward',
    'perplexity',
    'calib_r',
    'calib_gram',
    'calib_both',
    'calib_r_dense',
)
_MODULE = 'experiments.bench_pipeline'


def _setup(cfg: dict, num_tokens: int | None = None):
  """(model, layers, calibration batches, eval sequences) in this process."""
  from ctxlr import data  # pylint: disable=g-import-not-at-top
  from ctxlr import models  # pylint: disable=g-import-not-at-top
  from ctxlr import surgery  # pylint: disable=g-import-not-at-top

  model, tok = models.load_llama(None)
  if cfg['num_layers']:
    from flax import nnx  # pylint: disable=g-import-not-at-top

    model.layers = nnx.List(list(model.layers)[: cfg['num_layers']])
  layers = list(surgery.select_linears(model, tuple(cfg['include']), ()))
  seq_len, batch = cfg['seq_len'], cfg['batch_size']
  n = max(batch, (num_tokens or cfg['calib_tokens']) // seq_len)
  calib = data.sequences(
      'wikipedia', 'calib', tok, seq_len=seq_len, num_sequences=n
  )
  batches = list(data.batches(calib, batch))
  evals = None
  if num_tokens is None:  # the evaluation set: as many tokens as calib's
    evals = data.sequences(
        'wikipedia', 'eval', tok, seq_len=seq_len, num_sequences=n
    )
  return model, layers, batches, evals


def throughput(cfg: dict) -> dict:
  """Tokens/s of forward, perplexity and the three calibrations."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ctxlr import calibration  # pylint: disable=g-import-not-at-top
  from ctxlr import evaluation  # pylint: disable=g-import-not-at-top
  from ctxlr import stats as stats_lib  # pylint: disable=g-import-not-at-top

  model, layers, batches, evals = _setup(cfg)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
  eval_batches = [
      evals[i : i + cfg['batch_size']]
      for i in range(0, len(evals), cfg['batch_size'])
  ]

  def run_forward():
    # One batch in flight while the previous one finishes, as evaluation
    # keeps; each batch's logits (49,152 per token) are dropped once done
    # rather than held for the whole pass.
    prev = None
    for b in eval_batches:
      out = forward(state, b)
      if prev is not None:
        prev.block_until_ready()
      prev = out
    return prev

  def run_perplexity():
    return evaluation.perplexity(
        model, evals, batch_size=cfg['batch_size'], progress=False
    ).perplexity

  def calibrate(want):
    return lambda: calibration.layer_stats(model, batches, layers, want=want)

  calls = dict(
      forward=run_forward,
      perplexity=run_perplexity,
      calib_r=calibrate(stats_lib.Want()),
      calib_gram=calibrate(stats_lib.Want(r=False, gram=True)),
      calib_both=calibrate(stats_lib.Want(gram=True)),
  )
  if cfg.get('calls'):  # a rerun of some of them
    calls = {k: v for k, v in calls.items() if k in cfg['calls']}
  compile_s = {}
  for name, fn in calls.items():  # first call: compile + run
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s[name] = time.perf_counter() - start
  timed = timing.time_calls(
      {k: (f, ()) for k, f in calls.items()},
      repeats=cfg['repeats'],
      min_seconds=0.0,
      warmup=False,  # the first calls above
  )
  # The dense fold in place of the library's (calibration's step is
  # compiled once per model: swapped in after the caches are cleared),
  # timed on its own after the round-robin above.
  from ctxlr.linalg import qr  # pylint: disable=g-import-not-at-top

  if cfg.get('calls') and 'calib_r_dense' not in cfg['calls']:
    return _rates(timed, compile_s, evals, batches)
  jax.clear_caches()
  library, qr.fold_r_unchecked = qr.fold_r_unchecked, qr.fold_r_dense
  try:
    dense = calibrate(stats_lib.Want())
    start = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(dense()))
    compile_s['calib_r_dense'] = time.perf_counter() - start
    timed.update(
        timing.time_calls(
            dict(calib_r_dense=(dense, ())),
            repeats=cfg['repeats'],
            min_seconds=0.0,
            warmup=False,
        )
    )
  finally:
    qr.fold_r_unchecked = library
    jax.clear_caches()
  return _rates(timed, compile_s, evals, batches)


def _rates(timed, compile_s, evals, batches) -> dict:
  """Tokens/s of each timed call (compile apart)."""
  eval_tokens = int(evals.size)
  calib_tokens = sum(int(b.size) for b in batches)
  out = {}
  for name, t in timed.items():
    tokens = eval_tokens if name in ('forward', 'perplexity') else calib_tokens
    out[name] = dict(
        t,
        tokens=tokens,
        tokens_per_s=tokens / t['median'],
        first_call_s=compile_s[name],
    )
  return out


def _stpqrt(r, block):
  """LAPACK stpqrt of `[r; block]` on host arrays (SciPy); R, diag >= 0."""
  from scipy.linalg import lapack  # pylint: disable=g-import-not-at-top

  a, b = np.array(r, order='F'), np.array(block, order='F')
  out, _, _, info = lapack.stpqrt(
      0, min(64, a.shape[0]), a, b, overwrite_a=1, overwrite_b=1
  )
  assert info == 0, info
  out = np.triu(out)
  return out * np.where(np.diagonal(out) < 0, -1, 1).astype(out.dtype)[:, None]


def solve(cfg: dict) -> dict:
  """factorize_layers (coala) against back-to-back LAPACK SVDs of R K."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  from ctxlr import allocation  # pylint: disable=g-import-not-at-top
  from ctxlr import calibration  # pylint: disable=g-import-not-at-top
  from ctxlr import pipeline  # pylint: disable=g-import-not-at-top
  from ctxlr import surgery  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import solvers  # pylint: disable=g-import-not-at-top

  model, layers, batches, _ = _setup(cfg)
  stats = calibration.layer_stats(model, batches, layers)
  kernels = {n: surgery.get_module(model, n).kernel[...] for n in layers}
  shapes = {n: tuple(k.shape) for n, k in kernels.items()}
  ranks = allocation.uniform_ranks(shapes, cfg['ratio'])
  todo = {n: r for n, r in ranks.items() if r is not None}
  rk = {
      n: np.asarray(stats[n].r, np.float32) @ np.asarray(kernels[n])
      for n in todo
  }

  def ours():
    return pipeline.factorize_layers(kernels, stats, ranks, method='coala')

  def lapack():
    for m in rk.values():
      scipy.linalg.svd(m, full_matrices=False, lapack_driver='gesdd')

  # Where the solve's time goes beyond the SVDs: the solver's jitted core
  # (R K, its SVD, K V at the rank's padded width), of it the product R K
  # alone, and the error check (`relative_error`: R K again, R a, (R a) b),
  # each over every layer.
  factors = ours()
  product = jax.jit(lambda r, k: jnp.matmul(r, k, precision='highest'))

  def core():
    return [
        solvers._ctx_full(kernels[n], stats[n].r, r) for n, r in todo.items()
    ]

  def rk_product():
    return [product(stats[n].r, kernels[n]) for n in todo]

  def error():
    return [
        pipeline.relative_error(
            kernels[n], stats[n].r, factors[n]['a'], factors[n]['b']
        )
        for n in todo
    ]

  t = timing.time_calls(
      dict(
          ours=(ours, ()),
          lapack=(lapack, ()),
          core=(core, ()),
          rk_product=(rk_product, ()),
          error=(error, ()),
      ),
      repeats=cfg['repeats'],
      min_seconds=0.0,
  )
  med = {k: v['median'] for k, v in t.items()}
  return dict(
      layers=len(todo),
      timing=t,
      median=med,
      ratio=med['ours'] / med['lapack'],
  )


def fold(cfg: dict) -> list[dict]:
  """The folds vs the Gram update at the calibration block, one core:
  LAPACK ?tpqrt as an XLA FFI call (what calibration runs on CPU), the
  same through SciPy on host arrays, the JAX recursion of `tpqrt.fold`, and
  the dense QR of the stacked rows (accelerators)."""
  core = timing.pin_to_one_core()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import lapack_fold  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import qr  # pylint: disable=g-import-not-at-top
  from ctxlr.linalg import tpqrt  # pylint: disable=g-import-not-at-top

  hi = jax.lax.Precision.HIGHEST
  gram_update = jax.jit(lambda g, x: g + jnp.matmul(x.T, x, precision=hi))
  dense = qr.fold_r_dense
  b = cfg['seq_len'] * cfg['batch_size']
  rows = []
  rng = np.random.default_rng(0)
  for d in cfg['fold_widths']:
    r = qr.qr_r(rng.standard_normal((2 * d, d)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((b, d)).astype(np.float32))
    g = jnp.zeros((d, d), jnp.float32)
    r_np, x_np = np.asarray(r), np.asarray(x)
    t = timing.time_calls(
        dict(
            ffi=(jax.jit(lapack_fold.fold), (r, x)),
            lapack=(_stpqrt, (r_np, x_np)),
            structured=(tpqrt.fold, (r, x)),
            dense=(dense, (r, x)),
            gram=(gram_update, (g, x)),
        ),
        repeats=cfg['repeats'],
        min_seconds=0.5,
    )
    rows.append(
        dict(
            d=d,
            b=b,
            core=core,
            **{k: v['median'] for k, v in t.items()},
            ffi_over_gram=t['ffi']['median'] / t['gram']['median'],
            lapack_over_gram=t['lapack']['median'] / t['gram']['median'],
            structured_over_gram=t['structured']['median']
            / t['gram']['median'],
            dense_over_gram=t['dense']['median'] / t['gram']['median'],
        )
    )
  return rows


def calibrate_tokens(cfg: dict) -> dict:
  """Seconds (after a compiling one-batch call) and peak RSS of one R-only
  calibration of cfg['tokens']."""
  from ctxlr import calibration  # pylint: disable=g-import-not-at-top

  model, layers, batches, _ = _setup(cfg, cfg['tokens'])
  start = time.perf_counter()
  calibration.layer_stats(model, batches[:1], layers)  # compile
  compile_s = time.perf_counter() - start
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  stats = calibration.layer_stats(model, batches, layers)
  seconds = time.perf_counter() - start
  widths = {id(s): s.r.shape[0] for s in stats.values()}
  tokens = sum(int(b.size) for b in batches)
  return dict(
      tokens=tokens,
      seconds=seconds,
      seconds_per_token=seconds / tokens,
      first_batch_s=compile_s,  # compile + one batch, before the timing
      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      rss_before_mib=rss_before / 1024,
      stacked_activations_mib=tokens * sum(widths.values()) * 4 / 2**20,
  )


def process_part(cfg: dict) -> dict:
  """One process of the weak-scaling run (or the single-process baseline)."""
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cores[cfg['process_id'] % len(cores)]})  # 1 core
  from ctxlr import distributed  # pylint: disable=g-import-not-at-top

  if cfg['num_processes'] > 1:
    distributed.initialize(
        f"127.0.0.1:{cfg['port']}",
        cfg['num_processes'],
        cfg['process_id'],
        timeout_s=120,
    )
  import jax  # pylint: disable=g-import-not-at-top
  from ctxlr import calibration  # pylint: disable=g-import-not-at-top

  tokens = cfg['calib_tokens'] * cfg['num_processes']  # weak scaling
  model, layers, batches, _ = _setup(
      dict(cfg, batch_size=cfg['batch_size'] * cfg['num_processes']), tokens
  )
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  calibration.layer_stats(model, batches[:1], layers, mesh=mesh)  # compile
  start = time.perf_counter()
  calibration.layer_stats(model, batches, layers, mesh=mesh)
  return dict(
      seconds=time.perf_counter() - start,
      tokens=sum(int(b.size) for b in batches),
      devices=jax.device_count(),
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _processes(cfg: dict, workdir: str) -> dict:
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1')
  one = child.run(
      _MODULE,
      'process',
      dict(cfg, num_processes=1, process_id=0),
      workdir,
      env=env,
      timeout_s=cfg['timeout_s'],
  )
  port, outs, procs = _free_port(), [], []
  for pid in range(2):
    out = os.path.join(workdir, f'.process_{pid}.json')
    outs.append(out)
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                _MODULE,
                'process',
                json.dumps(
                    dict(cfg, num_processes=2, process_id=pid, port=port)
                ),
                out,
            ],
            env=dict(env, PYTHONPATH=child.ROOT),
            cwd=child.ROOT,
        )
    )
  for p in procs:
    if p.wait(timeout=cfg['timeout_s']) != 0:
      raise RuntimeError(f'weak-scaling process exited with {p.returncode}')
  two = [results.read_json(o) for o in outs]
  for o in outs:
    os.remove(o)
  slowest = max(t['seconds'] for t in two)
  return dict(one=one, two=two, efficiency=one['seconds'] / slowest)


def run(config, workdir: str) -> None:
  """Runs the configured parts (finished ones are kept in results.json).

  Each part runs in a fresh child process with OPENBLAS_NUM_THREADS=1;
  writes results.json, summary.md and bench_pipeline.png.
  """
  cfg = config.to_dict()
  path = os.path.join(workdir, 'results.json')
  out = results.read_json(path) if os.path.exists(path) else {}
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1')
  for part in config.parts:
    missing = [c for c in THROUGHPUT if c not in out.get('throughput', {})]
    if part in out and (part != 'throughput' or not missing):
      continue
    logging.warning('bench_pipeline: %s', part)
    # What the part ran on: cores it may use, and the load when it began
    # (a throughput part rerun for some calls: keyed by them).
    key = part
    if part == 'throughput' and part in out:
      key = f'throughput ({", ".join(missing)})'
    out.setdefault('cores', {})[key] = len(os.sched_getaffinity(0))
    out.setdefault('load', {})[key] = os.getloadavg()[0]
    out.setdefault('blas', {})[key] = _blas_kernels()
    if part == 'scaling':  # one child per size, each kept when done
      rows = out.pop('scaling_done', [])
      for n in config.scaling_tokens:
        if any(r['tokens_asked'] == n for r in rows):
          continue
        rows.append(
            dict(
                child.run(
                    _MODULE,
                    'calibrate_tokens',
                    dict(cfg, tokens=n),
                    workdir,
                    env=env,
                    timeout_s=cfg['timeout_s'],
                ),
                tokens_asked=n,
            )
        )
        out['scaling_done'] = rows
        results.write_json(path, out)
      out.pop('scaling_done', None)
      out[part] = rows
    elif part == 'processes':
      out[part] = _processes(cfg, workdir)
    elif part == 'throughput':  # all calls, or the missing ones
      out[part] = dict(
          out.get(part, {}),
          **child.run(
              _MODULE,
              part,
              dict(cfg, calls=missing),
              workdir,
              env=env,
              timeout_s=cfg['timeout_s'],
          ),
      )
    else:
      out[part] = child.run(
          _MODULE, part, cfg, workdir, env=env, timeout_s=cfg['timeout_s']
      )
    results.write_json(path, out)
  if cfg.get('compare_with'):
    other = results.read_json(os.path.join(cfg['compare_with'], 'results.json'))
    other.pop('compared', None)
    out['compared'] = other
    results.write_json(path, out)
  results.write_text(os.path.join(workdir, 'summary.md'), summarize(out))
  plot(workdir)
  print(summarize(out))


def validate(config) -> None:
  """Option errors before any work."""
  unknown = set(config.parts) - set(PARTS)
  if unknown:
    raise ValueError(
        f'parts: expected a subset of {PARTS}; got ' f'{sorted(unknown)}.'
    )
  for field in ('seq_len', 'batch_size', 'calib_tokens', 'repeats'):
    if not isinstance(config[field], int) or config[field] < 1:
      raise ValueError(
          f'{field}: expected a positive integer; got ' f'{config[field]!r}.'
      )
  if not 0 < config.ratio <= 1:
    raise ValueError(
        f'ratio: expected a number in (0, 1]; got ' f'{config.ratio!r}.'
    )
  compare = config.get('compare_with', '')
  if compare and not os.path.isfile(os.path.join(compare, 'results.json')):
    raise ValueError(
        'compare_with: expected a workdir holding results.json; got '
        f'{compare!r}.'
    )


def _blas_kernels() -> str:
  """The BLAS builds LAPACK runs on here and the kernels each picked.

  OpenBLAS chooses its kernels for the processor at load time (or as
  OPENBLAS_CORETYPE says); the fold and the SVDs run on them, XLA's matrix
  products do not, so the ratios depend on it.
  """
  import scipy.linalg  # pylint: disable=g-import-not-at-top,unused-import
  import threadpoolctl  # pylint: disable=g-import-not-at-top

  return ', '.join(
      f"{i['internal_api']} {i['version']} {i.get('architecture', '?')}"
      for i in threadpoolctl.threadpool_info()
      if i['user_api'] == 'blas'
  )


def _spread(rows: list[dict], key: str) -> float:
  values = [r[key] for r in rows]
  return max(values) / min(values) - 1


def _headlines(out: dict) -> dict[str, float]:
  """The ratios a target is set on, of the parts a run has."""
  h = {}
  t = out.get('throughput', {})
  if 'forward' in t and 'perplexity' in t:
    h['evaluation / forward, tokens/s (>= 0.9)'] = (
        t['perplexity']['tokens_per_s'] / t['forward']['tokens_per_s']
    )
  if 'calib_r' in t and 'calib_gram' in t:
    h['calibration R / Gram-only, time (<= 1.3)'] = (
        t['calib_gram']['tokens_per_s'] / t['calib_r']['tokens_per_s']
    )
  for row in out.get('fold', []):
    h[f"fold / Gram update, d = {row['d']} (<= 1.5)"] = row['ffi_over_gram']
  if 'solve' in out:
    h['solve / LAPACK SVDs (<= 1.2)'] = out['solve']['ratio']
  return h


def summarize(out: dict) -> str:
  """summary.md: every ratio against its target."""
  lines = [
      '| part | cores it could use | load average (1 min) at its start '
      '| BLAS kernels (threadpoolctl) |',
      '|---|---|---|---|',
  ]
  lines += [
      f"| {part} | {cores} | {out.get('load', {}).get(part, float('nan')):.1f}"
      f" | {out.get('blas', {}).get(part, 'not recorded')} |"
      for part, cores in out.get('cores', {}).items()
  ]
  lines.append('')
  if 'throughput' in out:
    t = out['throughput']
    fwd, gram = t['forward']['tokens_per_s'], t['calib_gram']['tokens_per_s']
    rows = [
        dict(
            run=k,
            tokens_per_s=v['tokens_per_s'],
            vs_forward=v['tokens_per_s'] / fwd,
            time_vs_gram=gram / v['tokens_per_s'],
            first_call_s=v['first_call_s'],
        )
        for k, v in t.items()
    ]
    lines += [
        '## Throughput (medians of whole passes, compile apart)',
        '',
        results.markdown_table(
            rows,
            [
                'run',
                'tokens_per_s',
                'vs_forward',
                'time_vs_gram',
                'first_call_s',
            ],
            dict(
                tokens_per_s='.0f',
                vs_forward='.2f',
                time_vs_gram='.2f',
                first_call_s='.1f',
            ),
        ),
        f'Targets: evaluation >= 0.9x the forward '
        f"(measured {t['perplexity']['tokens_per_s'] / fwd:.2f}x); "
        f'calibration with R <= 1.3x the time of the Gram-only one '
        f"(measured {gram / t['calib_r']['tokens_per_s']:.2f}x"
        + (
            f"; {gram / t['calib_r_dense']['tokens_per_s']:.2f}x with "
            'the dense fold'
            if 'calib_r_dense' in t
            else ''
        )
        + '). calib_r: the library (on CPU the LAPACK ?tpqrt fold); '
        'calib_r_dense: the dense fold, what accelerators run.',
        '',
    ]
    before = out.get('throughput_before')
    if before:
      lines += [
          f"{before.get('change', 'Before')}: "
          f"forward {before['forward']['tokens_per_s']:.0f} tokens/s, "
          f"perplexity {before['perplexity']['tokens_per_s']:.0f} "
          f"({before['perplexity']['tokens_per_s'] / before['forward']['tokens_per_s']:.2f}x).",
          '',
      ]
  if 'fold' in out:
    lines += [
        '## One fold at the calibration block (one pinned core)',
        '',
        results.markdown_table(
            out['fold'],
            [
                'd',
                'b',
                'ffi',
                'lapack',
                'structured',
                'dense',
                'gram',
                'ffi_over_gram',
                'lapack_over_gram',
                'structured_over_gram',
                'dense_over_gram',
            ],
            dict(
                ffi='.4f',
                ffi_over_gram='.2f',
                lapack='.4f',
                structured='.4f',
                dense='.4f',
                gram='.4f',
                lapack_over_gram='.2f',
                structured_over_gram='.2f',
                dense_over_gram='.2f',
            ),
        ),
        'Seconds per call. ffi: `lapack_fold.fold`, LAPACK stpqrt called '
        'by XLA (what calibration runs on CPU); lapack: the same stpqrt '
        'through SciPy on host arrays; structured: `tpqrt.fold` (the '
        'algorithm in JAX); dense: `qr.fold_r_dense` (geqrf of the stacked '
        'rows, what accelerators run); gram: `G + X_bᵀX_b` (XLA). Target: '
        'the fold <= 1.5x the Gram update.',
        '',
    ]
  if 'solve' in out:
    s = out['solve']
    lines += [
        f"## Solve of {s['layers']} layers",
        '',
        f"coala (factorize_layers) {s['median']['ours']:.1f} s, the "
        f'same SVDs of R K back to back in LAPACK '
        f"{s['median']['lapack']:.1f} s: {s['ratio']:.2f}x (target "
        '<= 1.2x).'
        + (
            f" Of it: the solver's jitted core (R K, its SVD, K V) "
            f"{s['median']['core']:.1f} s"
            + (
                f" (the products R K alone {s['median']['rk_product']:.1f} s)"
                if 'rk_product' in s['median']
                else ''
            )
            + ', the error check (R K, R a, '
            f"(R a) b) {s['median']['error']:.1f} s."
            if 'core' in s['median']
            else ''
        ),
        '',
    ]
  if 'scaling' in out:
    lines += [
        '## Calibration cost vs tokens (R only)',
        '',
        results.markdown_table(
            out['scaling'],
            [
                'tokens',
                'seconds',
                'seconds_per_token',
                'peak_rss_mib',
                'stacked_activations_mib',
            ],
            dict(
                seconds='.1f',
                seconds_per_token='.2e',
                peak_rss_mib='.0f',
                stacked_activations_mib='.0f',
            ),
        ),
        'Targets: seconds per token within ±10%, peak RSS flat (±10%): '
        f'measured spreads {_spread(out["scaling"], "seconds_per_token"):+.1%}'
        f' and {_spread(out["scaling"], "peak_rss_mib"):+.1%} (largest over '
        'smallest, minus 1). Seconds exclude a first one-batch call that '
        'compiles.',
        '',
    ]
  if 'processes' in out:
    p = out['processes']
    lines += [
        '## Weak scaling, 2 processes × 1 device (gloo)',
        '',
        f"1 process: {p['one']['seconds']:.1f} s for "
        f"{p['one']['tokens']} tokens; 2 processes: "
        f"{max(t['seconds'] for t in p['two']):.1f} s for "
        f"{p['two'][0]['tokens']} tokens; efficiency "
        f"{p['efficiency']:.2f} (target >= 0.8).",
        '',
    ]
  if 'compared' in out:
    other = out['compared']
    mine, theirs = _headlines(out), _headlines(other)
    kernels = sorted(set(other.get('blas', {}).values()))
    lines += [
        '## The same measures in the compared run',
        '',
        'Its BLAS kernels: ' + ('; '.join(kernels) or 'not recorded') + '.',
        '',
        results.markdown_table(
            [
                dict(measure=k, this_run=v, compared=theirs[k])
                for k, v in mine.items()
                if k in theirs
            ],
            ['measure', 'this_run', 'compared'],
            dict(this_run='.2f', compared='.2f'),
        ),
        '',
    ]
  return '\n'.join(lines)


def plot(workdir: str) -> None:
  """bench_pipeline.png from results.json: throughput, fold, scaling."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  out = results.read_json(os.path.join(workdir, 'results.json'))
  panels = [p for p in ('throughput', 'fold', 'scaling') if p in out]
  if not panels:
    return
  fig, axes = plt.subplots(
      1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False
  )
  for ax, part in zip(axes[0], panels):
    if part == 'throughput':
      names = list(out[part])
      ax.barh(names, [out[part][n]['tokens_per_s'] for n in names])
      ax.set_xlabel('tokens / s')
      ax.set_title('throughput (default model)')
    elif part == 'fold':
      runs = [('', out[part])]
      if 'fold' in out.get('compared', {}):
        runs.append((' (compared run)', out['compared']['fold']))
      keys = ['ffi', 'lapack', 'structured', 'dense']
      width = 0.8 / (len(keys) * len(runs))
      for i, (label, rows) in enumerate(runs):
        for j, k in enumerate(keys):
          ax.bar(
              np.arange(len(rows)) + (i * len(keys) + j) * width - 0.4,
              [r[f'{k}_over_gram'] for r in rows],
              width,
              align='edge',
              label=k + label,
              color=f'C{j}',
              alpha=1.0 if not i else 0.45,
          )
      ax.axhline(1.5, color='k', ls=':', lw=1, label='target')
      ax.set_xticks(range(len(out[part])))
      ax.set_xticklabels([f"d = {r['d']}" for r in out[part]])
      ax.set_ylabel('time / Gram update')
      top = max(
          r[f'{k}_over_gram'] for _, rows in runs for r in rows for k in keys
      )
      ax.set_ylim(0, 1.6 * top)  # room for the legend above the bars
      ax.legend(fontsize=7, ncol=2, loc='upper left')
      ax.set_title(f"one fold of b = {out[part][0]['b']} rows")
    else:
      rows = out[part]
      tokens = [r['tokens'] for r in rows]
      ax.plot(
          tokens,
          [1e3 * r['seconds_per_token'] for r in rows],
          'o-',
          label='ms / token',
      )
      ax2 = ax.twinx()
      ax2.plot(
          tokens,
          [r['peak_rss_mib'] for r in rows],
          's--',
          color='C1',
          label='peak RSS (MiB)',
      )
      ax.set_xscale('log')
      ax.set_ylim(bottom=0)
      ax2.set_ylim(bottom=0)
      ax.set_xlabel('calibration tokens')
      ax.set_ylabel('ms / token')
      ax2.set_ylabel('peak RSS (MiB)')
      lines = ax.get_lines() + ax2.get_lines()
      ax.legend(lines, [l.get_label() for l in lines], loc='lower right')
      ax.set_title('calibration (R only) vs tokens')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'bench_pipeline.png'), dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  child.serve(
      dict(
          throughput=throughput,
          solve=solve,
          fold=fold,
          calibrate_tokens=calibrate_tokens,
          process=process_part,
      )
  )
