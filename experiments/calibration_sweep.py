"""Perplexity vs calibration size for every method (docs/method.md §4–5).

Config and commands: experiments/configs/calibration_sweep.py. results.json
holds `dense`, `rows` (`common.sweep_row` plus num_tokens, stats_dtype; one
per run label and size) and `errors` (runs that raised, e.g. a K_* that is
not unique); summary.md and perplexity_vs_tokens.png are drawn from it alone.
"""

import contextlib

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from ctxlr import pipeline
from ctxlr import registry
from ctxlr import results
from ctxlr import stats as stats_lib
from experiments import common


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  common.check_model_and_data(config)
  if isinstance(config.num_tokens, (str, int)) or not config.num_tokens:
    common.fail(
        'num_tokens', 'a non-empty tuple of token counts', config.num_tokens
    )
  for i, n in enumerate(config.num_tokens):
    common.check_int(n, f'num_tokens[{i}]')
  common.check_ratio(config.ratio)
  common.check_variants(config.runs)
  common.check_int(config.kstar_max_tokens, 'kstar_max_tokens', minimum=0)
  common.check_layers(config.include, config.exclude)


def calib_spec(config, num_tokens: int) -> ml_collections.ConfigDict:
  """`num_tokens` as whole sequences (one shorter one if fewer tokens)."""
  seq_len = min(config.calib.seq_len, num_tokens)
  return ml_collections.ConfigDict(
      dict(
          corpus=config.calib.corpus,
          seq_len=seq_len,
          num_tokens=num_tokens,
          batch_size=config.calib.batch_size,
      )
  )


def sweep_stats(model, batches, config, methods, float64: bool):
  """{layer: float32 LayerStats}, and the float64 ones if `float64` (or None).

  With `float64`, one pass accumulates in float64 (for the float64
  references, whose case split must resolve near-ties that float32 R
  blurs); the float32 methods get those statistics rounded once to float32,
  so all runs still see the same data.
  """
  if not float64:
    return common.layer_stats(model, batches, config, methods), None
  with jax.enable_x64(True):
    stats64 = common.layer_stats(
        model, batches, config, methods, dtype=jnp.float64
    )
    rounded = {}  # shared inputs stay shared
    stats32 = {
        n: rounded.setdefault(id(s), stats_lib.as_float32(s))
        for n, s in stats64.items()
    }
  return stats32, stats64


def run(config, workdir: str) -> None:
  """Per calibration size: one calibration, then every run of `config.runs`
  (float64 references such as k_star only up to `kstar_max_tokens`, where
  the pass accumulates in float64). Each (label, size) row goes to
  results.json as it finishes; a rerun skips those and the recorded errors.
  """
  validate(config)
  runs = common.check_variants(config.runs)
  out, model, tokenizer = common.resume_sweep(workdir, config)
  done = {
      (r['run'], r['num_tokens']) for r in out['rows'] + out.get('errors', [])
  }
  for num_tokens in config.num_tokens:
    float64 = num_tokens <= config.kstar_max_tokens
    todo = [
        name
        for name, v in runs.items()
        if (name, num_tokens) not in done
        and (float64 or not registry.get(v['method']).float64)
    ]
    if not todo:
      continue
    batches = common.calibration_batches(
        tokenizer, calib_spec(config, num_tokens)
    )
    stats, stats64 = sweep_stats(
        model, batches, config, [runs[n]['method'] for n in todo], float64
    )
    for name in todo:
      variant = runs[name]
      reference = registry.get(variant['method']).float64
      compressed = nnx.clone(model)
      try:
        with (
            jax.enable_x64(True)
            if reference  # float64 solve, R
            else contextlib.nullcontext()
        ):
          report = pipeline.compress_from_stats(
              compressed,
              stats64 if reference else stats,
              ratio=config.ratio,
              **common.compress_options(variant),
          )
      except ValueError as e:  # e.g. K_* not unique: say so
        logging.error('%s at %d tokens: %s', name, num_tokens, e)
        out.setdefault('errors', []).append(
            dict(run=name, num_tokens=num_tokens, error=str(e))
        )
        common.write_results(workdir, out)
        continue
      ppl = common.evaluate(
          compressed, tokenizer, config.eval, f'{name} at {num_tokens} tokens'
      )
      row = common.sweep_row(name, variant, config.ratio, report, ppl)
      row.update(
          num_tokens=num_tokens, stats_dtype='float64' if float64 else 'float32'
      )
      out['rows'].append(row)
      common.write_results(workdir, out)
  common.finish(workdir, summarize(out), plot)


_COUNTS = (
    ('failed_layers', 'failed'),
    ('retried_layers', 'retried'),
    ('nonfinite_layers', 'non-finite'),
)


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
    rows = [
        {
            'run': run,
            **{
                f'{n} tokens': common.fmt_ppl(cell[run, n][f'ppl_{corpus}'])
                for n in sizes
                if (run, n) in cell
            },
        }
        for run in runs
    ]
    parts.append(
        f'Held-out {corpus} perplexity (dense {dense:.2f}):\n\n'
        + results.markdown_table(rows, ['run'] + token_cols)
    )
  counts = [
      (run, key, word)
      for run in runs
      for key, word in _COUNTS
      if any(r.get(key) for r in out['rows'] if r['run'] == run)
  ]
  rows = [
      {
          'tokens': n,
          'too few': max(
              r['insufficient_layers']
              for r in out['rows']
              if r['num_tokens'] == n
          ),
          **{
              f'{run} {word}': cell[run, n][key]
              for run, key, word in counts
              if (run, n) in cell
          },
      }
      for n in sizes
  ]
  columns = ['tokens', 'too few'] + [f'{run} {word}' for run, _, word in counts]
  parts.append(
      'Layers with too few tokens (numerical rank < rank), and where '
      'a Gram method failed, retried or produced non-finite '
      'factors:\n\n' + results.markdown_table(rows, columns)
  )
  if out.get('errors'):
    parts.append(
        'Runs that raised:\n'
        + ''.join(
            f'- {e["run"]} at {e["num_tokens"]} tokens: {e["error"]}\n'
            for e in out['errors']
        )
    )
  return '\n'.join(parts)


def plot(workdir: str) -> None:
  """perplexity_vs_tokens.png from results.json alone.

  Perplexity relative to dense against the calibration tokens, one panel
  per corpus, on a log axis fitted to the competitive runs (the others are
  marked at the upper edge and named under the panel).
  """
  out = common.read_results(workdir, None)
  fig, axes = common.relative_figure(
      out, x='num_tokens', label=lambda r: r['run'], xlabel='calibration tokens'
  )
  for ax in axes[0]:
    ax.set_xscale('log')
  common.save_figure(fig, workdir, 'perplexity_vs_tokens.png')
