"""Healing: train the factors of a compressed model, measure recovery.

Config and commands: experiments/configs/heal.py. results.json holds `dense`
({ppl_<corpus>: perplexity}) and `runs` (one per run label: the variant,
kept ratio, trainable count, the evaluations and train losses);
summary.md and heal_curves.png are drawn from it alone.
"""

import math
from absl import logging
from flax import nnx

from ctxlr import adapters
from ctxlr import data
from ctxlr import pipeline
from ctxlr import results
from ctxlr import surgery
from ctxlr import training
from experiments import common

KEYS = ('method', 'split', 'allocation', 'mu', 'mu_rule', 'auto_mu')


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  common.check_model_and_data(config)
  common.check_ratio(config.ratio)
  common.check_variants(config.runs, keys=KEYS)
  common.check_layers(config.include, config.exclude)
  common.check_int(config.seq_len, 'seq_len')
  common.check_train_spec(config.train)


def label(run: dict) -> str:
  """A run's label (runs written before labels carry it as 'method')."""
  return run.get('run', run['method'])


def run(config, workdir: str) -> None:
  """Compresses a copy per run of `config.runs` (one calibration for all),
  then trains only its factors on the calib-split sequences after the
  calibration ones. A finished run is kept in results.json (a rerun skips
  it); a killed one resumes from its orbax checkpoint in workdir/checkpoints.
  """
  validate(config)
  runs = common.check_variants(config.runs, keys=KEYS)
  out = common.read_results(workdir, dict(runs=[]))
  model, tokenizer = common.load_model(config.model)
  eval_fn = common.make_eval_fn(tokenizer, config.eval)
  if 'dense' not in out:
    out['dense'] = eval_fn(model)
    common.write_results(workdir, out)
  stats = common.layer_stats(
      model,
      common.calibration_batches(tokenizer, config.calib),
      config,
      [v['method'] for v in runs.values()],
  )
  calib, t = config.calib, config.train
  # Training sequences: the calib split's tokens after the calibration ones.
  skip = math.ceil(
      max(1, calib.num_tokens // calib.seq_len) * calib.seq_len / config.seq_len
  )
  train_seqs = data.sequences(
      calib.corpus,
      'calib',
      tokenizer,
      seq_len=config.seq_len,
      num_sequences=skip + t.steps * t.batch_size,
  )
  train_seqs = train_seqs[skip:]
  tx = common.make_tx(t)
  done = {label(r) for r in out['runs']}
  for name, variant in runs.items():
    if name in done:
      continue
    compressed = nnx.clone(model)
    report = pipeline.compress_from_stats(
        compressed,
        stats,
        ratio=config.ratio,
        **common.compress_options(variant),
    )
    if variant['split'] == 'balanced':  # same products, √D split
      for _, layer in nnx.iter_modules(compressed):
        if isinstance(layer, surgery.FactoredLinear):
          layer.a[...], layer.b[...] = adapters.balance(
              layer.a[...], layer.b[...]
          )
    wrt = training.factor_filter(compressed)
    history, ckpt = common.train_run(
        compressed,
        train_seqs,
        wrt=wrt,
        tx=tx,
        train=t,
        eval_fn=eval_fn,
        workdir=workdir,
        name=name,
        desc=f'heal {name}',
    )
    common.keep_run(
        workdir,
        out,
        dict(
            run=name,
            **variant,
            ratio=config.ratio,
            kept_ratio=report['kept_ratio'],
            trainable=training.count_params(compressed, wrt),
            eval=history['eval'],
            train=history['train'],
        ),
        ckpt,
    )
    logging.info('heal %s: %s', name, out['runs'][-1]['eval'])
  common.finish(workdir, summarize(out), plot)


def recovered(start: float, end: float, dense: float) -> float:
  """Fraction of the log-perplexity gap to the dense model closed."""
  gap = math.log(start) - math.log(dense)
  return (math.log(start) - math.log(end)) / gap if gap > 0 else float('nan')


def summarize(out: dict) -> str:
  """Markdown: per run, perplexity before and after healing, recovered."""
  corpora = [c[len('ppl_') :] for c in out['dense']]
  rows = []
  for r in out['runs']:
    first, last = r['eval'][0], r['eval'][-1]
    row = dict(
        run=label(r),
        kept_ratio=r['kept_ratio'],
        steps=last['step'],
        trainable=r['trainable'],
    )
    for c in corpora:
      key = f'ppl_{c}'
      row[f'{c} ppl before'] = first[key]
      row[f'{c} ppl after'] = last[key]
      row[f'{c} recovered'] = recovered(
          first[key], last[key], out['dense'][key]
      )
    rows.append(row)
  if not rows:
    return 'No finished run.\n'
  columns = list(rows[0])
  formats = {c: '.2f' for c in columns if 'ppl' in c}
  formats.update({c: '.1%' for c in columns if 'recovered' in c})
  formats['kept_ratio'] = '.3f'
  formats['trainable'] = ',d'
  dense = ', '.join(f'{c} {out["dense"]["ppl_" + c]:.2f}' for c in corpora)
  return (
      f'Dense perplexity: {dense}. "recovered": fraction of the '
      'log-perplexity gap to the dense model closed by training.\n\n'
      + results.markdown_table(rows, columns, formats)
  )


def plot(workdir: str) -> None:
  """heal_curves.png from results.json alone: perplexity vs healing step
  per run, one panel per corpus, the legend outside."""
  out = common.read_results(workdir, None)
  corpora = list(out['dense'])
  fig, axes = common.subplots(
      1, len(corpora), figsize=(4.8 * len(corpora), 3.8)
  )
  for ax, corpus in zip(axes[0], corpora):
    for i, r in enumerate(out['runs']):
      ax.plot(
          [e['step'] for e in r['eval']],
          [e[corpus] for e in r['eval']],
          '-',
          marker=common.MARKERS[i % 10],
          ms=4,
          mfc='none',
          label=f'{label(r)} @ {r["kept_ratio"]:.2f}',
      )
    ax.axhline(out['dense'][corpus], color='k', ls='--', lw=0.8, label='dense')
    common.log_axis(ax)
    ax.set_xlabel('healing step (a, b trained)')
    ax.set_title(f'held-out {corpus[len("ppl_"):]} perplexity')
  common.legend_outside(fig, axes)
  common.save_figure(fig, workdir, 'heal_curves.png')
