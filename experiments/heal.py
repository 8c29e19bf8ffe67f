"""Healing: train the factors of a compressed model, measure recovery.

Config and commands: experiments/configs/heal.py. results.json holds `dense`
({ppl_<corpus>: perplexity}) and `runs` (one per run label, learning rate
and seed: the variant, kept ratio, trainable count, the evaluations, the
validation perplexity at the end and train losses); summary.md and
heal_curves.png are drawn from it alone.

Protocol, as in finetune_adapters: per run label the rates of
`learning_rates` run on the first seed, the one with the lowest validation
perplexity (calib-split sequences after the training ones) is chosen, and
the other seeds (the order of the training batches) run at it.
"""

import math

from absl import logging
from flax import nnx
import numpy as np

from ctxlr import adapters
from ctxlr import data
from ctxlr import evaluation
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
  for field in ('num_tokens', 'batch_size'):
    common.check_int(config.val[field], f'val.{field}')
  if not config.learning_rates or isinstance(config.learning_rates, float):
    common.fail('learning_rates', 'a non-empty tuple of rates', None)
  for i, lr in enumerate(config.learning_rates):
    common.check_number(lr, f'learning_rates[{i}]', positive=True)
  if not config.seeds or isinstance(config.seeds, int):
    common.fail('seeds', 'a non-empty tuple of seeds', config.seeds)
  for i, seed in enumerate(config.seeds):
    common.check_int(seed, f'seeds[{i}]', minimum=0)


def label(run: dict) -> str:
  """A run's label (runs written before labels carry it as 'method')."""
  return run.get('run', run['method'])


def _key(run: dict) -> tuple:
  """(label, rate, seed); runs written before the grid: one rate, seed 0."""
  return (label(run), run.get('learning_rate'), run.get('seed', 0))


def chosen_rates(out: dict) -> dict[str, float]:
  """{label: the grid rate with the lowest validation perplexity}."""
  best = {}
  for r in out['runs']:
    if r.get('stage') != 'grid':
      continue
    if label(r) not in best or r['val'] < best[label(r)][0]:
      best[label(r)] = (r['val'], r['learning_rate'])
  return {name: lr for name, (_, lr) in best.items()}


def run(config, workdir: str) -> None:
  """Compresses a copy per run of `config.runs` (one calibration for all),
  then trains only its factors on the calib-split sequences after the
  calibration ones: the rate grid on the first seed, the other seeds at
  the rate chosen on validation. A finished (label, rate, seed) run is kept
  in results.json (a rerun skips it); a killed one resumes from its orbax
  checkpoint in workdir/checkpoints.
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
  # Training sequences: the calib split's tokens after the calibration ones;
  # validation: the next val.num_tokens after the training ones.
  skip = math.ceil(
      max(1, calib.num_tokens // calib.seq_len) * calib.seq_len / config.seq_len
  )
  num_val = max(1, config.val.num_tokens // config.seq_len)
  seqs = data.sequences(
      calib.corpus,
      'calib',
      tokenizer,
      seq_len=config.seq_len,
      num_sequences=skip + t.steps * t.batch_size + num_val,
  )
  train_seqs = seqs[skip : skip + t.steps * t.batch_size]
  val_seqs = seqs[skip + t.steps * t.batch_size :]

  def val_fn(m):
    return evaluation.perplexity(
        m, val_seqs, batch_size=config.val.batch_size, progress=False
    ).perplexity

  txs, wrts = {}, {}
  done = {_key(r) for r in out['runs']}

  def one(name, lr, seed, stage):
    if (name, lr, seed) in done:
      return
    variant = runs[name]
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
    # One filter object per set of factored layers: the jitted train step
    # (keyed by it) compiles once per rate, not once per run.
    factored = frozenset(
        tuple(path)
        for path, m in nnx.iter_modules(compressed)
        if isinstance(m, surgery.FactoredLinear)
    )
    if factored not in wrts:
      wrts[factored] = training.factor_filter(compressed)
    wrt = wrts[factored]
    if lr not in txs:
      txs[lr] = common.make_tx(dict(t, learning_rate=lr))
    order = (
        np.arange(len(train_seqs))
        if seed == config.seeds[0]
        else np.random.default_rng(seed).permutation(len(train_seqs))
    )
    history, ckpt = common.train_run(
        compressed,
        train_seqs[order],
        wrt=wrt,
        tx=txs[lr],
        train=t,
        eval_fn=eval_fn,
        workdir=workdir,
        name=f'{name}_lr{lr:g}_seed{seed}',
        desc=f'heal {name} lr={lr:g} seed {seed}',
    )
    common.keep_run(
        workdir,
        out,
        dict(
            run=name,
            **variant,
            ratio=config.ratio,
            learning_rate=lr,
            seed=seed,
            stage=stage,
            kept_ratio=report['kept_ratio'],
            trainable=training.count_params(compressed, wrt),
            eval=history['eval'],
            val=val_fn(compressed),
            train=history['train'],
        ),
        ckpt,
    )
    done.add((name, lr, seed))
    logging.info('heal %s: %s', name, out['runs'][-1]['eval'])

  for name in runs:
    for lr in config.learning_rates:
      one(name, lr, config.seeds[0], 'grid')
    lr = chosen_rates(out)[name]
    for seed in config.seeds[1:]:
      one(name, lr, seed, 'seeds')
  common.finish(workdir, summarize(out), plot)


def final_runs(out: dict) -> dict[str, list[dict]]:
  """{label: its runs at the chosen rate, one per seed} (runs written
  before the grid: the one run of each label)."""
  rates = chosen_rates(out)
  final = {}
  for r in out['runs']:
    if rates.get(label(r)) in (None, r.get('learning_rate')):
      final.setdefault(label(r), []).append(r)
  return final


def recovered(start: float, end: float, dense: float) -> float:
  """Fraction of the log-perplexity gap to the dense model closed."""
  gap = math.log(start) - math.log(dense)
  return (math.log(start) - math.log(end)) / gap if gap > 0 else float('nan')


def _stat(values) -> tuple[float, float]:
  v = np.asarray(values, float)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def summarize(out: dict) -> str:
  """Markdown: per run label at the chosen rate, perplexity before and
  after healing (mean ± std over seeds), fraction recovered; the grid."""
  corpora = [c[len('ppl_') :] for c in out['dense']]
  rows = []
  for name, rs in final_runs(out).items():
    first = rs[0]
    row = dict(
        run=name,
        lr=(
            f'{first["learning_rate"]:g}' if 'learning_rate' in first else ''
        ),  # runs written before the grid carry none
        seeds=len(rs),
        kept_ratio=f'{first["kept_ratio"]:.3f}',
        steps=first['eval'][-1]['step'],
        trainable=f'{first["trainable"]:,d}',
    )
    for c in corpora:
      key = f'ppl_{c}'
      after = _stat([r['eval'][-1][key] for r in rs])
      row[f'{c} ppl before'] = f'{first["eval"][0][key]:.2f}'
      row[f'{c} ppl after'] = f'{after[0]:.2f} ± {after[1]:.2f}'
      row[f'{c} recovered'] = '{:.1%}'.format(
          np.mean(
              [
                  recovered(
                      r['eval'][0][key], r['eval'][-1][key], out['dense'][key]
                  )
                  for r in rs
              ]
          )
      )
    rows.append(row)
  if not rows:
    return 'No finished run.\n'
  dense = ', '.join(f'{c} {out["dense"]["ppl_" + c]:.2f}' for c in corpora)
  text = (
      f'Dense perplexity: {dense}. "recovered": fraction of the '
      'log-perplexity gap to the dense model closed by training (mean over '
      'seeds); after: mean ± standard deviation over seeds at the rate '
      'chosen on the validation set.\n\n'
      + results.markdown_table(rows, list(rows[0]))
  )
  grid = [r for r in out['runs'] if r.get('stage') == 'grid']
  if grid:
    rates = chosen_rates(out)
    lines = [
        dict(
            run=label(r),
            lr=f'{r["learning_rate"]:g}'
            + (' *' if rates[label(r)] == r['learning_rate'] else ''),
            validation=f'{r["val"]:.2f}',
        )
        for r in grid
    ]
    text += (
        '\nLearning-rate grid (first seed): validation perplexity at the '
        'end; * the chosen rate.\n\n'
        + results.markdown_table(lines, list(lines[0]))
    )
  return text


def plot(workdir: str) -> None:
  """heal_curves.png from results.json alone: perplexity vs healing step
  per run label at its chosen rate (mean ± std over seeds), one panel per
  corpus, the legend outside."""
  out = common.read_results(workdir, None)
  corpora = list(out['dense'])
  fig, axes = common.subplots(
      1, len(corpora), figsize=(4.8 * len(corpora), 3.8)
  )
  final = final_runs(out)
  for ax, corpus in zip(axes[0], corpora):
    for i, (name, rs) in enumerate(final.items()):
      steps = [e['step'] for e in rs[0]['eval']]
      values = np.array([[e[corpus] for e in r['eval']] for r in rs])
      ax.errorbar(
          steps,
          values.mean(axis=0),
          yerr=values.std(axis=0, ddof=1) if len(rs) > 1 else None,
          fmt='-',
          marker=common.MARKERS[i % 10],
          ms=4,
          mfc='none',
          capsize=3,
          label=f'{name} @ {rs[0]["kept_ratio"]:.2f} ({len(rs)} seeds)',
      )
    ax.axhline(out['dense'][corpus], color='k', ls='--', lw=0.8, label='dense')
    common.log_axis(ax)
    ax.set_xlabel('healing step (a, b trained)')
    ax.set_title(f'held-out {corpus[len("ppl_"):]} perplexity')
  common.legend_outside(fig, axes)
  common.save_figure(fig, workdir, 'heal_curves.png')
