"""Adapter initialisations: learning (task perplexity) vs forgetting."""
import os
import shutil

from absl import logging
from flax import nnx
import jax
import matplotlib
import numpy as np

from ctxlr import adapters
from ctxlr import calibration
from ctxlr import data
from ctxlr import evaluation
from ctxlr import results
from ctxlr import surgery
from ctxlr import training
from experiments import common

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top


def load_model(model_config):
  """`common.load_model`, keeping only the first `num_layers` blocks (> 0)."""
  model, tokenizer = common.load_model(model_config)
  if model_config.get('num_layers'):
    model.layers = nnx.List(list(model.layers)[:model_config.num_layers])
  return model, tokenizer


def make_eval_fn(tokenizer, eval_config):
  """`model -> {ppl_<corpus>: perplexity}` on each corpus's eval split."""
  sets = {c: common.token_sequences(c, 'eval', tokenizer, eval_config)
          for c in eval_config.corpora}

  def eval_fn(model):
    return {f'ppl_{c}': evaluation.perplexity(
        model, s, batch_size=eval_config.batch_size, progress=False
    ).perplexity for c, s in sets.items()}
  return eval_fn


def layer_stats(model, seqs, layers, batch_size, *, gram, desc):
  """{layer: LayerStats} of the layers' inputs on `seqs` (one pass)."""
  group_stats, group_of = calibration.calibrate(
      model, data.batches(seqs, batch_size), layers,
      want=calibration.Want(gram=gram), desc=desc)
  return {n: group_stats[group_of[n]] for n in layers}


def run(config, workdir: str) -> None:
  path = os.path.join(workdir, 'results.json')
  out = results.read_json(path) if os.path.exists(path) else dict(runs=[])
  model, tokenizer = load_model(config.model)
  eval_fn = make_eval_fn(tokenizer, config.eval)
  out.update(task=config.task, general=config.general)
  if 'dense' not in out:
    out['dense'] = eval_fn(model)
    results.write_json(path, out)
  t = config.train
  num_train = t.steps * t.batch_size
  train_seqs = data.sequences(config.task, 'calib', tokenizer,
                              seq_len=config.seq_len,
                              num_sequences=max(num_train,
                                                config.init.num_sequences))
  layers = list(surgery.select_linears(model, config.include, config.exclude))
  methods = [m.partition(':')[0] for m in config.methods]
  init_seqs = train_seqs[:config.init.num_sequences]
  task = layer_stats(model, init_seqs, layers, config.init.batch_size,
                     gram='corda' in methods, desc=config.task)
  general = None
  if 'coala_kpa' in methods:
    general = layer_stats(model, data.sequences(
        config.general, 'calib', tokenizer, seq_len=config.seq_len,
        num_sequences=config.init.num_sequences), layers,
                          config.init.batch_size, gram=False,
                          desc=config.general)
  tx = training.make_tx(learning_rate=t.learning_rate, steps=t.steps,
                        warmup_steps=t.warmup_steps, clip_norm=t.clip_norm,
                        weight_decay=t.weight_decay)
  done = {(r['method'], r['seed']) for r in out['runs']}
  for seed in config.seeds:
    order = (np.arange(len(train_seqs)) if seed == 0 else
             np.random.default_rng(seed).permutation(len(train_seqs)))
    for method in config.methods:          # 'name' or 'name:balanced'
      if (method, seed) in done:
        continue
      adapted = nnx.clone(model)
      name, _, split = method.partition(':')
      adapters.add_adapters(adapted, task, method=name, rank=config.rank,
                            include=layers, exclude=(),
                            key=jax.random.key(seed), general_stats=general,
                            scaling=config.scaling, split=split or 'own')
      ckpt = os.path.join(workdir, 'checkpoints',
                          f'{name}_{split or "own"}_seed{seed}')
      # Every initialisation keeps the dense model's function at step 0
      # (tested in tests/test_adapters.py): its step-0 row is the dense one.
      history = training.train(
          adapted, train_seqs[order], wrt=adapters.TRAINABLE, tx=tx,
          steps=t.steps, batch_size=t.batch_size, eval_fn=eval_fn,
          eval_every=t.eval_every, eval_at_start=False, checkpoint_dir=ckpt,
          checkpoint_every=t.checkpoint_every, desc=f'{method} seed {seed}')
      out['runs'].append(dict(
          method=method, seed=seed,
          trainable=adapters.count_trainable(adapted),
          eval=[dict(step=0, **out['dense'])] + history['eval'],
          train=history['train']))
      results.write_json(path, out)          # each finished run is kept
      shutil.rmtree(ckpt, ignore_errors=True)
      logging.info('%s seed %d: %s', method, seed, out['runs'][-1]['eval'])
  common.finish(workdir, summarize(out), plot)


def summary_rows(out: dict) -> list[dict]:
  """One row per method: means over seeds of the losses and perplexities."""
  rows = []
  for method in dict.fromkeys(r['method'] for r in out['runs']):
    runs = [r for r in out['runs'] if r['method'] == method]
    first = runs[0]['eval'][1]['step']      # the first evaluation after 0
    row = dict(method=method, seeds=len(runs), first_eval_step=first,
               steps=runs[0]['eval'][-1]['step'],
               loss_first=float(np.mean([np.mean(
                   [x['loss'] for x in r['train'][:first]]) for r in runs])),
               loss_last=float(np.mean([np.mean(
                   [x['loss'] for x in r['train'][-10:]]) for r in runs])))
    for corpus in out['dense']:
      row[f'{corpus}_first'] = float(np.mean([r['eval'][1][corpus]
                                              for r in runs]))
      row[f'{corpus}_last'] = float(np.mean([r['eval'][-1][corpus]
                                             for r in runs]))
    rows.append(row)
  return rows


def summarize(out: dict) -> str:
  rows = summary_rows(out)
  if not rows:
    return 'No finished run.\n'
  corpora = [c[len('ppl_'):] for c in out['dense']]
  first, steps = rows[0]['first_eval_step'], rows[0]['steps']
  columns, formats, table = ['method'], {}, []
  for row in rows:
    line = dict(method=row['method'])
    line[f'train loss 1-{first}'] = row['loss_first']
    line['train loss last 10'] = row['loss_last']
    for c in corpora:
      line[f'{c} ppl @{first}'] = row[f'ppl_{c}_first']
      line[f'{c} ppl @{steps}'] = row[f'ppl_{c}_last']
    table.append(line)
  columns = list(table[0])
  formats = {c: ('.4f' if 'loss' in c else '.2f') for c in columns[1:]}
  dense = ', '.join(f'{c} {p:.2f}' for c, p in zip(corpora,
                                                   out['dense'].values()))
  seeds = rows[0]['seeds']
  task, general = out['task'], out['general']
  fastest = min(rows, key=lambda r: r[f'ppl_{task}_first'])
  best = min(rows, key=lambda r: r[f'ppl_{task}_last'])
  least = min(rows, key=lambda r: r[f'ppl_{general}_last'])
  return (f'Step 0 (every initialisation = the dense model): {dense}. '
          f'Means over {seeds} seed(s).\n\n' +
          results.markdown_table(table, columns, formats) +
          f'\nLowest {task} perplexity at step {first}: {fastest["method"]} '
          f'({fastest[f"ppl_{task}_first"]:.2f}); at step {steps}: '
          f'{best["method"]} ({best[f"ppl_{task}_last"]:.2f}). Lowest '
          f'{general} perplexity at step {steps} (least forgetting): '
          f'{least["method"]} ({least[f"ppl_{general}_last"]:.2f}).\n')


def plot(workdir: str) -> None:
  """Train loss, task and general perplexity vs step, from results.json."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  corpora = list(out['dense'])
  fig, axes = plt.subplots(1, 1 + len(corpora),
                           figsize=(4.6 * (1 + len(corpora)), 3.8))
  methods = list(dict.fromkeys(r['method'] for r in out['runs']))
  colors = dict(zip(methods, plt.rcParams['axes.prop_cycle'].by_key()[
      'color']))
  # Every run sees the same batches; the loss minus the reference run's on
  # the same batch removes the batches' own difficulty.
  ref_name = 'lora' if 'lora' in methods else None
  losses = {(r['method'], r['seed']): np.array([x['loss'] for x in r['train']])
            for r in out['runs']}
  for r in out['runs']:
    style = dict(color=colors[r['method']], alpha=1.0 if r['seed'] == 0
                 else 0.4, label=r['method'] if r['seed'] == 0 else None,
                 ls='--' if r['method'].endswith(':balanced') else '-')
    loss = losses[(r['method'], r['seed'])]
    ref = losses.get((ref_name, r['seed']))
    if ref is None or len(ref) != len(loss):
      ref = np.mean([v for (_, s), v in losses.items() if s == r['seed']
                     and len(v) == len(loss)], axis=0)
    k = min(10, len(loss))
    smooth = np.convolve(loss - ref, np.ones(k) / k, mode='valid')
    axes[0].plot(np.arange(k, len(loss) + 1), smooth, **style)
    for ax, corpus in zip(axes[1:], corpora):
      ax.plot([e['step'] for e in r['eval']], [e[corpus] for e in r['eval']],
              marker='o', ms=3, **style)
  axes[0].set_title(f'train loss − {ref_name or "mean"}\'s on the same batch '
                    '(mean of 10)', fontsize=9)
  axes[0].set_xlabel('step')
  for ax, corpus in zip(axes[1:], corpora):
    ax.axhline(out['dense'][corpus], color='k', ls=':', lw=0.8,
               label='dense')
    name = corpus[len('ppl_'):]
    ax.set_title(f'held-out {name} perplexity')
    ax.set_xlabel('step')
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'finetune_curves.png'), dpi=120)
  plt.close(fig)
