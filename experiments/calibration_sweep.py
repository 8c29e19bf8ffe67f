"""Perplexity vs calibration size for every method (docs/method.md §4–5)."""
import os

from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
import ml_collections

from ctxlr import results
from ctxlr import stats as stats_lib
from experiments import common
from experiments import compare_methods

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top


def parse_run(run: str) -> tuple[str, float]:
  method, _, mu = run.partition('@')
  return method, float(mu) if mu else 0.


def calib_spec(config, num_tokens: int) -> ml_collections.ConfigDict:
  """`num_tokens` as whole sequences (one shorter one if fewer tokens)."""
  seq_len = min(config.calib.seq_len, num_tokens)
  return ml_collections.ConfigDict(dict(
      corpus=config.calib.corpus, seq_len=seq_len, num_tokens=num_tokens,
      batch_size=config.calib.batch_size))


def sweep_stats(model, batches, config, float64: bool):
  """{layer: float32 LayerStats}, and the float64 ones if `float64` (or None).

  With `float64`, one pass accumulates in float64 (for K_*, whose case split
  must resolve near-ties that float32 R blurs); the float32 methods get those
  statistics rounded once to float32, so all runs still see the same data.
  """
  if not float64:
    return compare_methods.one_shot_stats(model, batches, config.include,
                                          config.exclude), None
  with jax.enable_x64(True):
    stats64 = compare_methods.one_shot_stats(
        model, batches, config.include, config.exclude, dtype=jnp.float64)
    rounded = {}                           # shared inputs stay shared
    stats32 = {n: rounded.setdefault(id(s), stats_lib.as_float32(s))
               for n, s in stats64.items()}
  return stats32, stats64


def run(config, workdir: str) -> None:
  path = os.path.join(workdir, 'results.json')
  out, model, tokenizer = common.resume_sweep(workdir, config)
  done = {(r['run'], r['num_tokens']) for r in out['rows']}
  for num_tokens in config.num_tokens:
    float64 = num_tokens <= config.kstar_max_tokens
    todo = [r for r in config.runs if (r, num_tokens) not in done and
            (float64 or r != 'k_star')]
    if not todo:
      continue
    batches = common.calibration_batches(tokenizer,
                                         calib_spec(config, num_tokens))
    stats, stats64 = sweep_stats(model, batches, config, float64)
    for run_name in todo:
      method, mu = parse_run(run_name)
      if method == 'k_star':               # float64 solve from float64 R
        try:
          with jax.enable_x64(True):
            compressed, report = common.compress_copy(
                model, stats64, method=method, ratio=config.ratio)
        except ValueError as e:            # e.g. K_* not unique: say so
          logging.error('k_star at %d tokens: %s', num_tokens, e)
          out.setdefault('errors', []).append(dict(
              run=run_name, num_tokens=num_tokens, error=str(e)))
          results.write_json(path, out)
          continue
      else:
        compressed, report = common.compress_copy(
            model, stats, method=method, ratio=config.ratio, mu=mu,
            mu_rule=config.mu_rule)
      ppl = common.evaluate(compressed, tokenizer, config.eval,
                            f'{run_name}@{num_tokens} tokens')
      row = compare_methods.summary_row(f'{method}:uniform', config.ratio,
                                        report, ppl)
      row.update(run=run_name, mu0=mu, num_tokens=num_tokens,
                 stats_dtype='float64' if float64 else 'float32',
                 insufficient_layers=sum(
                     bool(l.get('insufficient_data'))
                     for l in report['layers'].values()))
      out['rows'].append(row)
      results.write_json(path, out)
      logging.info('%s', row)
  common.finish(workdir, summarize(out), plot)


def _ppl(value: float) -> str:
  """Perplexity as the README prints it: 4 digits, thousands separated."""
  if value != value:                       # NaN: non-finite factors
    return 'NaN'
  if value >= 1e5:
    return f'{value:.3g}'
  return f'{value:,.0f}' if value >= 1000 else f'{value:.4g}'


_COUNTS = (('failed_layers', 'failed'), ('retried_layers', 'retried'),
           ('nonfinite_layers', 'non-finite'))


def summarize(out: dict) -> str:
  """Per corpus a table run x tokens; then the layers that were short of data
  and, for every run that had any, the layers it failed, retried or left
  non-finite."""
  sizes = sorted({r['num_tokens'] for r in out['rows']})
  runs = list(dict.fromkeys(r['run'] for r in out['rows']))
  cell = {(r['run'], r['num_tokens']): r for r in out['rows']}
  token_cols = [f'{n} tokens' for n in sizes]
  parts = []
  for corpus, dense in out['dense'].items():
    rows = [{'run': run, **{f'{n} tokens': _ppl(cell[run, n][f'ppl_{corpus}'])
                            for n in sizes if (run, n) in cell}}
            for run in runs]
    parts.append(f'Held-out {corpus} perplexity (dense {dense:.2f}):\n\n' +
                 results.markdown_table(rows, ['run'] + token_cols))
  counts = [(run, key, word) for run in runs for key, word in _COUNTS
            if any(r.get(key) for r in out['rows'] if r['run'] == run)]
  rows = [{'tokens': n, 'too few': max(r['insufficient_layers'] for r in
                                       out['rows'] if r['num_tokens'] == n),
           **{f'{run} {word}': cell[run, n][key] for run, key, word in counts
              if (run, n) in cell}} for n in sizes]
  columns = ['tokens', 'too few'] + [f'{run} {word}' for run, _, word in counts]
  parts.append('Layers with too few tokens (numerical rank < rank), and where '
               'a Gram method failed, retried or produced non-finite '
               'factors:\n\n' + results.markdown_table(rows, columns))
  if out.get('errors'):
    parts.append('Runs that raised:\n' + ''.join(
        f'- {e["run"]} at {e["num_tokens"]} tokens: {e["error"]}\n'
        for e in out['errors']))
  return '\n'.join(parts)


def plot(workdir: str) -> None:
  """Perplexity vs calibration tokens per run, from results.json alone."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  corpora = list(out['dense'])
  fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4),
                           squeeze=False)
  for ax, corpus in zip(axes[0], corpora):
    for run_name in dict.fromkeys(r['run'] for r in out['rows']):
      rows = sorted((r for r in out['rows'] if r['run'] == run_name),
                    key=lambda r: r['num_tokens'])
      ax.plot([r['num_tokens'] for r in rows],
              [r[f'ppl_{corpus}'] for r in rows], 'o-', ms=3, label=run_name)
    ax.axhline(out['dense'][corpus], color='k', ls='--', label='dense')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('calibration tokens')
    ax.set_ylabel('perplexity')
    ax.set_title(f'held-out {corpus}')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'perplexity_vs_tokens.png'), dpi=120)
  plt.close(fig)
