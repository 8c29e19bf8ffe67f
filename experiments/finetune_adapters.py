"""Adapter initialisations: learning (task perplexity) vs forgetting.

Config and commands: experiments/configs/finetune_adapters.py. results.json
holds `dense` ({ppl_<corpus>: perplexity}), `task`, `general` and `runs`
(one per run label and seed: the variant, trainable count, evaluations and
train losses); summary.md and finetune_curves.png are drawn from it alone.
"""

from absl import logging
from flax import nnx
import jax
import numpy as np

from ctxlr import adapters
from ctxlr import calibration
from ctxlr import data
from ctxlr import results
from ctxlr import stats as stats_lib
from ctxlr import surgery
from experiments import common

KEYS = ('method', 'split')


def _runs(config) -> dict[str, dict]:
  """`config.runs` parsed: {label: dict(method, split)}; methods are the
  adapter initialisations (`adapters.METHODS`)."""
  runs = common.check_variants(
      config.runs, keys=KEYS, methods=tuple(adapters.METHODS)
  )
  for name, v in runs.items():
    if v['method'] == 'lora' and v['split'] == 'balanced':
      common.fail(
          f'runs.{name}.split', "'own' for lora (its b is 0)", 'balanced'
      )
  return runs


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  common.check_model_spec(config.model)
  _runs(config)
  common.check_int(config.rank, 'rank')
  common.check_number(config.scaling, 'scaling', positive=True)
  common.check_layers(config.include, config.exclude)
  for field in ('task', 'general'):
    common.check_choice(config[field], data.CORPORA, field)
  common.check_int(config.seq_len, 'seq_len')
  common.check_int(config.init.num_sequences, 'init.num_sequences')
  common.check_int(config.init.batch_size, 'init.batch_size')
  common.check_train_spec(config.train)
  common.check_data_spec(config.eval, 'eval')
  if not config.seeds or isinstance(config.seeds, int):
    common.fail('seeds', 'a non-empty tuple of seeds', config.seeds)
  for i, seed in enumerate(config.seeds):
    common.check_int(seed, f'seeds[{i}]', minimum=0)


def label(run: dict) -> str:
  """A run's label (runs written before labels carry it as 'method')."""
  return run.get('run', run['method'])


def _init_stats(model, seqs, layers, batch_size, *, gram, desc):
  return calibration.layer_stats(
      model,
      data.batches(seqs, batch_size),
      layers,
      want=stats_lib.Want(gram=gram),
      desc=desc,
  )


def run(config, workdir: str) -> None:
  """Per seed and run of `config.runs`: adapters initialised, then trained.

  Every run sees the same steps, batches, schedule and seed. A finished
  (label, seed) run is kept in results.json (a rerun skips it); a killed
  one resumes from its last orbax checkpoint in workdir/checkpoints.
  """
  validate(config)
  runs = _runs(config)
  out = common.read_results(workdir, dict(runs=[]))
  model, tokenizer = common.load_model(config.model)
  eval_fn = common.make_eval_fn(tokenizer, config.eval)
  out.update(task=config.task, general=config.general)
  if 'dense' not in out:
    out['dense'] = eval_fn(model)
    common.write_results(workdir, out)
  t = config.train
  num_train = t.steps * t.batch_size
  train_seqs = data.sequences(
      config.task,
      'calib',
      tokenizer,
      seq_len=config.seq_len,
      num_sequences=max(num_train, config.init.num_sequences),
  )
  layers = list(surgery.select_linears(model, config.include, config.exclude))
  needs = {n for v in runs.values() for n in adapters.NEEDS[v['method']]}
  task = _init_stats(
      model,
      train_seqs[: config.init.num_sequences],
      layers,
      config.init.batch_size,
      gram='gram' in needs,
      desc=config.task,
  )
  general = None
  if 'general' in needs:
    general = _init_stats(
        model,
        data.sequences(
            config.general,
            'calib',
            tokenizer,
            seq_len=config.seq_len,
            num_sequences=config.init.num_sequences,
        ),
        layers,
        config.init.batch_size,
        gram=False,
        desc=config.general,
    )
  tx = common.make_tx(t)
  done = {(label(r), r['seed']) for r in out['runs']}
  for seed in config.seeds:
    order = (
        np.arange(len(train_seqs))
        if seed == 0
        else np.random.default_rng(seed).permutation(len(train_seqs))
    )
    for name, variant in runs.items():
      if (name, seed) in done:
        continue
      adapted = nnx.clone(model)
      adapters.add_adapters(
          adapted,
          task,
          method=variant['method'],
          rank=config.rank,
          include=layers,
          exclude=(),
          key=jax.random.key(seed),
          general_stats=general,
          scaling=config.scaling,
          split=variant['split'],
      )
      # Every initialisation keeps the dense model's function at step 0
      # (tested in tests/test_adapters.py): its step-0 row is the dense one.
      history, ckpt = common.train_run(
          adapted,
          train_seqs[order],
          wrt=adapters.TRAINABLE,
          tx=tx,
          train=t,
          eval_fn=eval_fn,
          workdir=workdir,
          name=f'{name}_seed{seed}',
          eval_at_start=False,
          desc=f'{name} seed {seed}',
      )
      common.keep_run(
          workdir,
          out,
          dict(
              run=name,
              **variant,
              seed=seed,
              trainable=adapters.count_trainable(adapted),
              eval=[dict(step=0, **out['dense'])] + history['eval'],
              train=history['train'],
          ),
          ckpt,
      )
      logging.info('%s seed %d: %s', name, seed, out['runs'][-1]['eval'])
  common.finish(workdir, summarize(out), plot)


def summary_rows(out: dict) -> list[dict]:
  """One row per run label: means over seeds of losses and perplexities."""
  rows = []
  for name in dict.fromkeys(label(r) for r in out['runs']):
    runs = [r for r in out['runs'] if label(r) == name]
    first = runs[0]['eval'][1]['step']  # the first evaluation after 0
    row = dict(
        run=name,
        seeds=len(runs),
        first_eval_step=first,
        steps=runs[0]['eval'][-1]['step'],
        loss_first=float(
            np.mean(
                [np.mean([x['loss'] for x in r['train'][:first]]) for r in runs]
            )
        ),
        loss_last=float(
            np.mean(
                [np.mean([x['loss'] for x in r['train'][-10:]]) for r in runs]
            )
        ),
    )
    for corpus in out['dense']:
      row[f'{corpus}_first'] = float(
          np.mean([r['eval'][1][corpus] for r in runs])
      )
      row[f'{corpus}_last'] = float(
          np.mean([r['eval'][-1][corpus] for r in runs])
      )
    rows.append(row)
  return rows


def summarize(out: dict) -> str:
  """Markdown: per run, train loss and perplexities (means over seeds) at
  the first evaluation and at the end; the fastest, best and least
  forgetting runs."""
  rows = summary_rows(out)
  if not rows:
    return 'No finished run.\n'
  corpora = [c[len('ppl_') :] for c in out['dense']]
  first, steps = rows[0]['first_eval_step'], rows[0]['steps']
  table = []
  for row in rows:
    line = dict(run=row['run'])
    line[f'train loss 1-{first}'] = row['loss_first']
    line['train loss last 10'] = row['loss_last']
    for c in corpora:
      line[f'{c} ppl @{first}'] = row[f'ppl_{c}_first']
      line[f'{c} ppl @{steps}'] = row[f'ppl_{c}_last']
    table.append(line)
  columns = list(table[0])
  formats = {c: ('.4f' if 'loss' in c else '.2f') for c in columns[1:]}
  dense = ', '.join(
      f'{c} {p:.2f}' for c, p in zip(corpora, out['dense'].values())
  )
  seeds = rows[0]['seeds']
  task, general = out['task'], out['general']
  fastest = min(rows, key=lambda r: r[f'ppl_{task}_first'])
  best = min(rows, key=lambda r: r[f'ppl_{task}_last'])
  least = min(rows, key=lambda r: r[f'ppl_{general}_last'])
  return (
      f'Step 0 (every initialisation = the dense model): {dense}. '
      f'Means over {seeds} seed(s).\n\n'
      + results.markdown_table(table, columns, formats)
      + f'\nLowest {task} perplexity at step {first}: {fastest["run"]} '
      f'({fastest[f"ppl_{task}_first"]:.2f}); at step {steps}: '
      f'{best["run"]} ({best[f"ppl_{task}_last"]:.2f}). Lowest '
      f'{general} perplexity at step {steps} (least forgetting): '
      f'{least["run"]} ({least[f"ppl_{general}_last"]:.2f}).\n'
  )


def _balanced(run: dict) -> bool:
  return run.get('split') == 'balanced' or run['method'].endswith(
      ':balanced'
  )  # runs written before labels


def plot(workdir: str) -> None:
  """finetune_curves.png from results.json alone: train loss (minus the
  lora run's on the same batch), task and general perplexity vs step; one
  colour per run label, dashed for balanced splits, the legend outside."""
  out = common.read_results(workdir, None)
  corpora = list(out['dense'])
  fig, axes = common.subplots(
      1, 1 + len(corpora), figsize=(4.6 * (1 + len(corpora)), 3.8)
  )
  axes = axes[0]
  labels = list(dict.fromkeys(label(r) for r in out['runs']))
  colors = {name: f'C{i % 10}' for i, name in enumerate(labels)}
  # Every run sees the same batches; the loss minus the reference run's on
  # the same batch removes the batches' own difficulty.
  ref_name = next(
      (label(r) for r in out['runs'] if r['method'] == 'lora'), None
  )
  losses = {
      (label(r), r['seed']): np.array([x['loss'] for x in r['train']])
      for r in out['runs']
  }
  for r in out['runs']:
    style = dict(
        color=colors[label(r)],
        alpha=1.0 if r['seed'] == 0 else 0.4,
        label=label(r) if r['seed'] == 0 else None,
        ls='--' if _balanced(r) else '-',
    )
    loss = losses[(label(r), r['seed'])]
    ref = losses.get((ref_name, r['seed']))
    if ref is None or len(ref) != len(loss):
      ref = np.mean(
          [
              v
              for (_, s), v in losses.items()
              if s == r['seed'] and len(v) == len(loss)
          ],
          axis=0,
      )
    k = min(10, len(loss))
    smooth = np.convolve(loss - ref, np.ones(k) / k, mode='valid')
    axes[0].plot(np.arange(k, len(loss) + 1), smooth, **style)
    for ax, corpus in zip(axes[1:], corpora):
      ax.plot(
          [e['step'] for e in r['eval']],
          [e[corpus] for e in r['eval']],
          marker='o',
          ms=3,
          **style,
      )
  axes[0].set_title(
      f'train loss − {ref_name or "mean"}\'s on the same batch ' '(mean of 10)',
      fontsize=9,
  )
  axes[0].set_xlabel('step')
  for ax, corpus in zip(axes[1:], corpora):
    ax.axhline(out['dense'][corpus], color='k', ls=':', lw=0.8, label='dense')
    name = corpus[len('ppl_') :]
    ax.set_title(f'held-out {name} perplexity')
    ax.set_xlabel('step')
  common.legend_outside(fig, axes)
  common.save_figure(fig, workdir, 'finetune_curves.png')
