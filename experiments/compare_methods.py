"""Perplexity of every method at several kept ratios (one calibration)."""
import os

from absl import logging
import jax.numpy as jnp
import matplotlib

from ctxlr import calibration
from ctxlr import results
from ctxlr import surgery
from experiments import common

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top


def one_shot_stats(model, batches, include, exclude, dtype=jnp.float32):
  """Every statistic of every selected layer, from one pass.

  `dtype` float64 needs 64-bit JAX; layers sharing an input share one object.
  """
  shapes = surgery.select_linears(model, include, exclude)
  group_stats, group_of = calibration.calibrate(
      model, batches, shapes, want=calibration.Want(gram=True, abs_sum=True),
      dtype=dtype)
  return {n: group_stats[group_of[n]] for n in shapes}


def summary_row(run: str, ratio: float, report: dict, ppl: dict) -> dict:
  method, allocation = run.split(':')
  layers = [l for l in report['layers'].values() if l['rank'] is not None]
  return dict(
      method=method, allocation=allocation, ratio=ratio,
      kept_ratio=report['kept_ratio'], model_ratio=report['model_ratio'],
      solve_seconds=report['seconds']['solve'],
      **{f'ppl_{c}': v['perplexity'] for c, v in ppl.items()},
      failed_layers=sum(bool(l['failed']) for l in layers),
      retried_layers=sum(l['retries'] > 0 for l in layers),
      nonfinite_layers=sum(bool(l['nonfinite']) for l in layers),
      max_rel_err=max((l['rel_err'] for l in layers), default=0.))


def run(config, workdir: str) -> None:
  path = os.path.join(workdir, 'results.json')
  out, model, tokenizer = common.resume_sweep(workdir, config)
  done = {(r['method'], r['allocation'], r['ratio']) for r in out['rows']}
  stats = one_shot_stats(model, common.calibration_batches(
      tokenizer, config.calib), config.include, config.exclude)
  for ratio in config.ratios:
    for run_name in config.runs:
      method, allocation = run_name.split(':')
      if (method, allocation, ratio) in done:
        continue
      compressed, report = common.compress_copy(
          model, stats, method=method, ratio=ratio, allocation=allocation)
      ppl = common.evaluate(compressed, tokenizer, config.eval,
                            f'{run_name}@{ratio}')
      out['rows'].append(summary_row(run_name, ratio, report, ppl))
      results.write_json(path, out)          # each finished row is kept
      logging.info('%s', out['rows'][-1])
  common.finish(workdir, summarize(out), plot)


def summarize(out: dict) -> str:
  corpora = list(out['dense'])
  columns = (['method', 'allocation', 'ratio', 'kept_ratio'] +
             [f'ppl_{c}' for c in corpora] +
             ['failed_layers', 'retried_layers', 'nonfinite_layers'])
  formats = {f'ppl_{c}': '.2f' for c in corpora}
  formats['kept_ratio'] = '.3f'
  dense = ', '.join(f'{c} {p:.2f}' for c, p in out['dense'].items())
  rows = sorted(out['rows'], key=lambda r: (-r['ratio'], r['method'],
                                            r['allocation']))
  return (f'Dense perplexity: {dense}.\n\n' +
          results.markdown_table(rows, columns, formats))


def plot(workdir: str) -> None:
  """Perplexity vs kept ratio per method and corpus, from results.json."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  corpora = list(out['dense'])
  fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4),
                           squeeze=False)
  runs = dict.fromkeys((r['method'], r['allocation']) for r in out['rows'])
  for ax, corpus in zip(axes[0], corpora):
    for method, allocation in runs:
      rows = sorted((r for r in out['rows'] if r['method'] == method and
                     r['allocation'] == allocation), key=lambda r: r['ratio'])
      ax.plot([r['kept_ratio'] for r in rows],
              [r[f'ppl_{corpus}'] for r in rows], 'o-', ms=3,
              label=f'{method} ({allocation})')
    ax.axhline(out['dense'][corpus], color='k', ls='--', label='dense')
    ax.set_yscale('log')
    ax.set_xlabel('kept parameter ratio (projections)')
    ax.set_ylabel('perplexity')
    ax.set_title(f'held-out {corpus}')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'perplexity_vs_ratio.png'), dpi=120)
  plt.close(fig)
