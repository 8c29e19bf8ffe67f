"""Healing: train the factors of a compressed model, measure recovery."""
import math
import os
import shutil

from absl import logging
from flax import nnx
import matplotlib

from ctxlr import adapters
from ctxlr import data
from ctxlr import results
from ctxlr import surgery
from ctxlr import training
from experiments import common
from experiments import finetune_adapters

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top


def run(config, workdir: str) -> None:
  path = os.path.join(workdir, 'results.json')
  out = results.read_json(path) if os.path.exists(path) else dict(runs=[])
  model, tokenizer = finetune_adapters.load_model(config.model)
  eval_fn = finetune_adapters.make_eval_fn(tokenizer, config.eval)
  if 'dense' not in out:
    out['dense'] = eval_fn(model)
    results.write_json(path, out)
  calib = config.calib
  num_calib = max(1, calib.num_tokens // calib.seq_len)
  layers = list(surgery.select_linears(model, config.include, config.exclude))
  stats = finetune_adapters.layer_stats(
      model, data.sequences(calib.corpus, 'calib', tokenizer,
                            seq_len=calib.seq_len, num_sequences=num_calib),
      layers, calib.batch_size, gram=True, desc='calibrate')
  # Training sequences: the calib split's tokens after the calibration ones.
  t = config.train
  skip = math.ceil(num_calib * calib.seq_len / config.seq_len)
  train_seqs = data.sequences(calib.corpus, 'calib', tokenizer,
                              seq_len=config.seq_len,
                              num_sequences=skip + t.steps * t.batch_size)
  train_seqs = train_seqs[skip:]
  tx = training.make_tx(learning_rate=t.learning_rate, steps=t.steps,
                        warmup_steps=t.warmup_steps, clip_norm=t.clip_norm,
                        weight_decay=t.weight_decay)
  done = {r['method'] for r in out['runs']}
  for method in config.methods:
    if method in done:
      continue
    name, _, split = method.partition(':')  # 'name' or 'name:balanced'
    compressed, report = common.compress_copy(model, stats, method=name,
                                              ratio=config.ratio)
    if split == 'balanced':                 # same products, √D split
      for _, layer in nnx.iter_modules(compressed):
        if isinstance(layer, surgery.FactoredLinear):
          a, b = adapters.balance(layer.a[...], layer.b[...])
          layer.a[...], layer.b[...] = a, b
    wrt = training.factor_filter(compressed)
    ckpt = os.path.join(workdir, 'checkpoints', method.replace(':', '_'))
    history = training.train(
        compressed, train_seqs, wrt=wrt, tx=tx, steps=t.steps,
        batch_size=t.batch_size, eval_fn=eval_fn, eval_every=t.eval_every,
        checkpoint_dir=ckpt, checkpoint_every=t.checkpoint_every,
        desc=f'heal {method}')
    out['runs'].append(dict(
        method=method, ratio=config.ratio, kept_ratio=report['kept_ratio'],
        trainable=training.count_params(compressed, wrt),
        eval=history['eval'], train=history['train']))
    results.write_json(path, out)
    shutil.rmtree(ckpt, ignore_errors=True)
    logging.info('heal %s: %s', method, out['runs'][-1]['eval'])
  common.finish(workdir, summarize(out), plot)


def recovered(start: float, end: float, dense: float) -> float:
  """Fraction of the log-perplexity gap to the dense model closed."""
  gap = math.log(start) - math.log(dense)
  return (math.log(start) - math.log(end)) / gap if gap > 0 else float('nan')


def summarize(out: dict) -> str:
  corpora = [c[len('ppl_'):] for c in out['dense']]
  rows = []
  for r in out['runs']:
    first, last = r['eval'][0], r['eval'][-1]
    row = dict(method=r['method'], kept_ratio=r['kept_ratio'],
               steps=last['step'], trainable=r['trainable'])
    for c in corpora:
      key = f'ppl_{c}'
      row[f'{c} ppl before'] = first[key]
      row[f'{c} ppl after'] = last[key]
      row[f'{c} recovered'] = recovered(first[key], last[key],
                                        out['dense'][key])
    rows.append(row)
  if not rows:
    return 'No finished run.\n'
  columns = list(rows[0])
  formats = {c: '.2f' for c in columns if 'ppl' in c}
  formats.update({c: '.1%' for c in columns if 'recovered' in c})
  formats['kept_ratio'] = '.3f'
  formats['trainable'] = ',d'
  dense = ', '.join(f'{c} {out["dense"]["ppl_" + c]:.2f}' for c in corpora)
  return (f'Dense perplexity: {dense}. "recovered": fraction of the '
          'log-perplexity gap to the dense model closed by training.\n\n' +
          results.markdown_table(rows, columns, formats))


def plot(workdir: str) -> None:
  """Perplexity vs healing step per method and corpus, from results.json."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  corpora = list(out['dense'])
  fig, axes = plt.subplots(1, len(corpora), figsize=(4.8 * len(corpora), 3.8),
                           squeeze=False)
  for ax, corpus in zip(axes[0], corpora):
    for r in out['runs']:
      ax.plot([e['step'] for e in r['eval']], [e[corpus] for e in r['eval']],
              'o-', ms=3, label=f'{r["method"]} @ {r["kept_ratio"]:.2f}')
    ax.axhline(out['dense'][corpus], color='k', ls='--', lw=0.8,
               label='dense')
    ax.set_yscale('log')
    ax.set_xlabel('healing step (a, b trained)')
    ax.set_title(f'held-out {corpus[len("ppl_"):]} perplexity')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'heal_curves.png'), dpi=120)
  plt.close(fig)
