"""Perplexity of every method at several kept ratios (one calibration).

Config and commands: experiments/configs/compare_methods.py. results.json
holds `dense` ({corpus: perplexity}) and `rows` (`common.sweep_row`, one per
run label and ratio); summary.md and perplexity_vs_ratio.png are drawn from
it alone.
"""

import os

from flax import nnx

from ctxlr import pipeline
from ctxlr import results
from ctxlr import surgery
from experiments import common


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  common.check_model_and_data(config)
  for i, ratio in enumerate(config.ratios):
    common.check_ratio(ratio, f'ratios[{i}]')
  common.check_variants(config.runs, keys=common.SWEEP_KEYS)
  common.check_layers(config.include, config.exclude)


def label(row: dict) -> str:
  """A row's run label (rows written before labels: 'method:allocation')."""
  return row.get('run') or f"{row['method']}:{row['allocation']}"


def run(config, workdir: str) -> None:
  """Compresses a copy of the model per (run, ratio), evaluates each.

  One calibration gathers the statistics every run needs (kept in workdir:
  a rerun reads them); each variant of `config.runs` at each of
  `config.ratios` is one row of results.json, written as it finishes. A
  rerun skips the (label, ratio) rows present. The ratios of one run are
  solved in turn from one set of full-rank factors per layer where the
  method allows it (`pipeline.compress_from_stats`, `full`).
  """
  validate(config)
  runs = common.check_variants(config.runs, keys=common.SWEEP_KEYS)
  out, model, tokenizer = common.resume_sweep(workdir, config)
  done = {(label(r), r['ratio']) for r in out['rows']} | {
      (e['run'], e['ratio']) for e in out.get('errors', [])
  }
  todo = [
      (name, ratio)
      for name in runs
      for ratio in config.ratios
      if (name, ratio) not in done
  ]
  energy = None
  if todo:
    batches = common.calibration_batches(tokenizer, config.calib)
    stats = _stats(model, batches, config, runs, workdir)
    if any(
        runs[n]['allocation'] in pipeline.NEEDS_SENSITIVITY for n, _ in todo
    ):
      energy = _sensitivity(model, batches, config, workdir)
  full, current = {}, None
  for name, ratio in todo:
    if name != current:  # one run's full-rank factors at a time
      full, current = {}, name
    compressed = nnx.clone(model)
    options = dict(common.compress_options(runs[name]), sensitivity=energy)
    try:
      if runs[name]['mode'] == 'sequential':
        report = pipeline.compress(
            compressed,
            batches,
            ratio=ratio,
            mode='sequential',
            include=config.include,
            exclude=config.exclude,
            **options,
        )
      else:
        report = pipeline.compress_from_stats(
            compressed, stats, ratio=ratio, full=full, **options
        )
    except ValueError as e:  # a rule or method undefined on these data
      print(f'{name} at {ratio} raised: {e}', flush=True)
      out.setdefault('errors', []).append(
          dict(run=name, ratio=ratio, error=str(e))
      )
      common.write_results(workdir, out)
      continue
    ppl = common.evaluate(
        compressed, tokenizer, config.eval, f'{name} at {ratio}'
    )
    out['rows'].append(common.sweep_row(name, runs[name], ratio, report, ppl))
    common.write_results(workdir, out)  # each finished row is kept
  common.finish(workdir, summarize(out), plot)


def _stats(model, batches, config, runs, workdir: str):
  """The runs' calibration statistics, kept in workdir (`stats.npz`, keyed
  by the calibration config, the layers and the statistics asked for)."""
  methods = sorted({v['method'] for v in runs.values()})
  want = common.want(methods)
  key = dict(
      calib=config.calib.to_dict(),
      include=list(config.include),
      exclude=list(config.exclude),
      want=[want.r, want.gram, want.abs_sum],
  )
  path, key_path = (
      os.path.join(workdir, f) for f in ('stats.npz', 'stats.json')
  )
  if os.path.exists(path) and os.path.exists(key_path):
    if results.read_json(key_path) == key:
      return common.load_stats(path)
  stats = common.layer_stats(model, batches, config, methods)
  common.save_stats(path, stats)
  results.write_json(key_path, key)
  return stats


def _sensitivity(model, batches, config, workdir: str):
  """Loss-gradient energies of the calibration batches, kept in workdir
  (`sensitivity.json`) so that a resumed sweep measures them once."""
  return common.cached_sensitivity(
      model,
      batches,
      surgery.select_linears(model, config.include, config.exclude),
      os.path.join(workdir, 'sensitivity.json'),
      dict(
          calib=config.calib.to_dict(),
          include=list(config.include),
          exclude=list(config.exclude),
      ),
  )


OURS = 'recommended'  # the main job's pipeline, compared with the peers


def _is_peer(row: dict) -> bool:
  """A peer's own pipeline: not ours, and not our loss-driven allocation
  lent to a peer (those rows are shown, but are not the peer's method)."""
  return label(row) != OURS and row['allocation'] not in (
      pipeline.NEEDS_SENSITIVITY
  )


def summarize(out: dict) -> str:
  """Markdown: dense perplexity; per ratio the recommended pipeline against
  the best peer on each set; every (run, ratio) row; the runs that raised."""
  corpora = list(out['dense'])
  rows = [dict(r, run=label(r)) for r in out['rows']]
  dense = ', '.join(f'{c} {p:.2f}' for c, p in out['dense'].items())
  lines = [f'Dense perplexity: {dense}.', '']
  ours = {r['ratio']: r for r in rows if r['run'] == OURS}
  if ours:
    lines += [
        f'`{OURS}` against the best peer (each with its own allocation) '
        'at each kept ratio:',
        '',
        '| ratio | '
        + ' | '.join(f'{OURS} {c} | best peer {c}' for c in corpora)
        + ' |',
        '|---|' + '---|---|' * len(corpora),
    ]
    for ratio in sorted(ours, reverse=True):
      cells = []
      for c in corpora:
        peers = [
            r
            for r in rows
            if r['ratio'] == ratio
            and _is_peer(r)
            and r[f'ppl_{c}'] == r[f'ppl_{c}']
        ]  # NaN (non-finite factors) is nobody's best
        best = min(peers, key=lambda r: r[f'ppl_{c}'], default=None)
        mine = ours[ratio][f'ppl_{c}']
        cells.append(f'{common.fmt_ppl(mine)} ({mine / out["dense"][c]:.2f}×)')
        cells.append(
            'n/a'
            if best is None
            else f"{common.fmt_ppl(best[f'ppl_{c}'])} ({best['run']})"
        )
      lines.append(f'| {ratio} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  columns = (
      ['run', 'method', 'allocation', 'ratio', 'kept_ratio']
      + [f'ppl_{c}' for c in corpora]
      + ['failed_layers', 'retried_layers', 'nonfinite_layers']
  )
  formats = {f'ppl_{c}': '.2f' for c in corpora}
  formats['kept_ratio'] = '.3f'
  rows.sort(key=lambda r: (-r['ratio'], r['run']))
  lines.append(results.markdown_table(rows, columns, formats))
  if out.get('errors'):
    lines += [
        '',
        'Runs that raised (the rule or method is undefined here):',
        '',
    ]
    lines += [
        f"- {e['run']} at {e['ratio']}: {e['error']}" for e in out['errors']
    ]
  return '\n'.join(lines) + '\n'


def plot(workdir: str) -> None:
  """perplexity_vs_ratio.png from results.json alone.

  Perplexity relative to dense against the kept ratio, one panel per
  corpus, on a log axis fitted to the competitive runs (the others are
  marked at the upper edge and named under the panel).
  """
  out = common.read_results(workdir, None)
  fig, axes = common.relative_figure(
      out,
      x='kept_ratio',
      label=label,
      xlabel='kept parameter ratio (projections)',
  )
  for ax in axes[0]:
    ax.set_xticks(sorted({r['ratio'] for r in out['rows']}))
  common.save_figure(fig, workdir, 'perplexity_vs_ratio.png')
