"""Perplexity, time and memory against calibration size, from one stream.

The recommended pipeline (the main job's: coala, 'fisher' ranks) at one kept
ratio, its statistics calibrated on 8,192 … 262,144 tokens of one
calibration mixture. The stream is read once: the batches between two sizes
are calibrated as one chunk and folded into the running R (`R ← qr([R;
R_chunk])`, exact: the R of all rows so far), so every size is a prefix of
the next and the largest one costs what it would alone. Per chunk: seconds
per token and the peak RSS of the process while it calibrates, next to the
float32 size the stacked layer inputs of all tokens so far would take (the
memory the Gram-free streaming never needs). The loss sensitivities are
measured once, on the first `sensitivity_tokens` tokens, so that every size
differs in its statistics only.

Each finished size's statistics are kept in workdir/cache, each finished row
in results.json; a rerun continues the stream from the last kept size.
"""

import os
import time
from typing import Any

from flax import nnx
import jax
import matplotlib
import numpy as np

from ctxlr import calibration
from ctxlr import data
from ctxlr import pipeline
from ctxlr import registry
from ctxlr import results
from ctxlr import stats as stats_lib
from ctxlr import surgery
from ctxlr.linalg import qr
from experiments import common

matplotlib.use('Agg')


def validate(config) -> None:
  """Raises ValueError naming the first bad config field."""
  common.check_model_spec(config.model)
  common.check_data_spec(config.eval, 'eval')
  spec = config.calib
  common.check_data_spec(spec, 'calib')
  common.check_ints(config.num_tokens, 'num_tokens', minimum=spec.seq_len)
  sizes = list(config.num_tokens)
  if sizes != sorted(set(sizes)):
    common.fail('num_tokens', 'increasing sizes', tuple(sizes))
  step = spec.seq_len * spec.batch_size
  for i, n in enumerate(sizes):
    if n % step:
      common.fail(
          f'num_tokens[{i}]',
          f'a multiple of calib.seq_len × calib.batch_size = {step}',
          n,
      )
  common.check_int(
      config.sensitivity_tokens, 'sensitivity_tokens', minimum=spec.seq_len
  )
  common.check_ratio(config.ratio)
  common.check_variants(config.runs)
  common.check_layers(config.include, config.exclude)


def _sequences(tokenizer, spec, num_tokens: int) -> np.ndarray:
  n = num_tokens // spec.seq_len
  weights = common.calib_mixture(spec)
  if weights is None:
    return common.token_sequences(
        spec.corpus, 'calib', tokenizer, dict(spec, num_tokens=num_tokens)
    )
  return data.mixture_sequences(
      weights, 'calib', tokenizer, seq_len=spec.seq_len, num_sequences=n
  )


def merge(
    running: dict[str, stats_lib.LayerStats] | None,
    chunk: dict[str, stats_lib.LayerStats],
) -> dict[str, stats_lib.LayerStats]:
  """The statistics of the rows of `running` and `chunk` together: R of the
  stacked R's (exact in exact arithmetic), counts added. Layers sharing one
  LayerStats object in `chunk` share one in the result."""
  if running is None:
    return dict(chunk)
  out, done = {}, {}
  for name, s in chunk.items():
    if id(s) not in done:
      before = running[name]
      done[id(s)] = stats_lib.LayerStats(
          r=qr.fold_r(before.r, s.r),
          gram=None,
          abs_sum=None,
          count=before.count + s.count,
      )
    out[name] = done[id(s)]
  return out


def run(config, workdir: str) -> None:
  """Streams the largest size once, keeping every size's statistics, then
  compresses and evaluates the model at each size for every run. Writes
  results.json, summary.md and calibration_curve.png; resumes."""
  validate(config)
  runs = common.check_variants(config.runs)
  for name, variant in runs.items():
    if registry.get(variant['method']).want != stats_lib.Want():
      common.fail(
          f'runs.{name}.method', 'a method that reads R only', variant['method']
      )
  path = os.path.join(workdir, 'results.json')
  out, dense, tokenizer = common.resume_sweep(workdir, config)
  out.setdefault('chunks', [])
  cache = os.path.join(workdir, 'cache')
  os.makedirs(cache, exist_ok=True)
  names = list(surgery.select_linears(dense, config.include, config.exclude))
  sizes = list(config.num_tokens)
  spec = config.calib
  seqs = _sequences(tokenizer, spec, sizes[-1])
  per_batch = spec.seq_len * spec.batch_size
  batches = list(data.batches(seqs, spec.batch_size))

  def snapshot(n):
    return os.path.join(cache, f'{n}.npz')

  kept = [n for n in sizes if os.path.exists(snapshot(n))]
  start = kept[-1] if kept else 0
  running = common.load_stats(snapshot(start)) if start else None
  if start:
    print(f'Resumed the stream at {start:,} tokens.', flush=True)
  for n in (n for n in sizes if n > start):
    chunk = batches[start // per_batch : n // per_batch]
    t = time.perf_counter()
    common.reset_peak_rss()
    part = calibration.layer_stats(
        dense, chunk, names, desc=f'calibrate {start:,}…{n:,}'
    )
    running = merge(running, part)
    jax.block_until_ready([s.r for s in running.values()])
    seconds = time.perf_counter() - t
    out['chunks'].append(
        dict(
            start=start,
            stop=n,
            seconds=seconds,
            seconds_per_token=seconds / (n - start),
            peak_rss_bytes=common.peak_rss(),
            stacked_activation_bytes=common.stacked_bytes(dense, names, n),
            statistics_bytes=common.stats_bytes(running),
        )
    )
    common.save_stats(snapshot(n), running)
    results.write_json(path, out)
    start = n
  del running
  energy = None
  if any(v['allocation'] in pipeline.NEEDS_SENSITIVITY for v in runs.values()):
    first = batches[: max(1, config.sensitivity_tokens // per_batch)]
    energy = common.cached_sensitivity(
        dense,
        first,
        names,
        os.path.join(cache, 'sensitivity.json'),
        dict(tokens=int(sum(np.asarray(b).size for b in first))),
    )
  done = {(r['run'], r['num_tokens']) for r in out['rows']}
  for n in sizes:
    todo = [name for name in runs if (name, n) not in done]
    if not todo:
      continue
    stats = common.load_stats(snapshot(n))
    for name in todo:
      model = nnx.clone(dense)
      t = time.perf_counter()
      report = pipeline.compress_from_stats(
          model,
          stats,
          ratio=config.ratio,
          sensitivity=energy,
          **common.compress_options(runs[name]),
      )
      solve = time.perf_counter() - t
      ppl = common.evaluate(model, tokenizer, config.eval, f'{name} at {n:,}')
      row = common.sweep_row(name, runs[name], config.ratio, report, ppl)
      out['rows'].append(dict(row, num_tokens=n, solve_seconds=solve))
      results.write_json(path, out)
    del stats
  common.finish(workdir, summarize(out), plot)


def _gib(value: Any) -> str:
  return 'n/a' if value is None else f'{value / 2**30:.2f}'


def summarize(out: dict) -> str:
  """Markdown: perplexity per size and run, then time and memory per chunk."""
  corpora = list(out['dense'])
  lines = [
      'Dense perplexity: '
      + ', '.join(f'{c} {out["dense"][c]:.2f}' for c in corpora)
      + '.',
      '',
      '| run | tokens | kept | '
      + ' | '.join(f'{c} | × dense' for c in corpora)
      + ' |',
      '|---|---|---|' + '---|---|' * len(corpora),
  ]
  for r in sorted(out['rows'], key=lambda r: (r['run'], r['num_tokens'])):
    cells = ' | '.join(
        f"{common.fmt_ppl(r[f'ppl_{c}'])} | "
        f"{r[f'ppl_{c}'] / out['dense'][c]:.2f}"
        for c in corpora
    )
    lines.append(
        f"| {r['run']} | {r['num_tokens']:,} | {r['kept_ratio']:.4f} | "
        f'{cells} |'
    )
  lines += [
      '',
      'Calibration per chunk of the stream (peak RSS of the process while '
      'the chunk calibrates; the float32 size of all layer inputs so far, '
      'stacked; the statistics kept):',
      '',
      '| tokens | seconds | ms / token | peak RSS (GiB) | stacked inputs '
      '(GiB) | statistics (GiB) |',
      '|---|---|---|---|---|---|',
  ]
  for c in out['chunks']:
    lines.append(
        f"| {c['start']:,} … {c['stop']:,} | {c['seconds']:.1f} | "
        f"{1e3 * c['seconds_per_token']:.2f} | {_gib(c['peak_rss_bytes'])} | "
        f"{_gib(c['stacked_activation_bytes'])} | "
        f"{_gib(c['statistics_bytes'])} |"
    )
  return '\n'.join(lines) + '\n'


def plot(workdir: str) -> None:
  """calibration_curve.png from results.json: perplexity / dense against
  tokens per held-out set, and peak RSS against the stacked inputs."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  corpora = list(out['dense'])
  fig, axes = common.subplots(
      1, len(corpora) + 1, figsize=(5 * len(corpora) + 5, 4)
  )
  for ax, corpus in zip(axes[0], corpora):
    for name in dict.fromkeys(r['run'] for r in out['rows']):
      rows = sorted(
          (r for r in out['rows'] if r['run'] == name),
          key=lambda r: r['num_tokens'],
      )
      ax.plot(
          [r['num_tokens'] for r in rows],
          [r[f'ppl_{corpus}'] / out['dense'][corpus] for r in rows],
          marker='o',
          label=name,
      )
    ax.set_xscale('log', base=2)
    ax.set_xlabel('calibration tokens')
    ax.set_ylabel('perplexity / dense')
    ax.set_title(f'held-out {corpus}')
    ax.grid(alpha=0.3)
    ax.legend()
  ax = axes[0][-1]
  chunks = out['chunks']
  stops = [c['stop'] for c in chunks]
  ax.plot(
      stops,
      [(c['peak_rss_bytes'] or 0) / 2**30 for c in chunks],
      marker='o',
      label='peak RSS while calibrating',
  )
  ax.plot(
      stops,
      [c['stacked_activation_bytes'] / 2**30 for c in chunks],
      marker='s',
      label='stacked layer inputs (float32)',
  )
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('calibration tokens')
  ax.set_ylabel('GiB')
  ax.set_title('memory')
  ax.grid(alpha=0.3)
  ax.legend()
  common.save_figure(fig, workdir, 'calibration_curve.png')
