"""Adapter initialisations from few examples: learning vs forgetting.

Config and commands: experiments/configs/finetune_adapters.py. results.json
holds `dense` and `dense_val` ({ppl_<corpus>: perplexity} on the test and
validation sets), `task`, `general`, `inits` ({examples: what the init
statistics saw, per layer kind}) and `runs` (one per run label, number of
init examples, learning rate and seed: the variant, the evaluations, the
validation perplexities at the end and the train losses); summary.md,
finetune_curves.png and examples_sweep.png are drawn from it alone.

Protocol: for each run label, the learning-rate grid is run on the first
seed and the rate with the lowest validation task perplexity at the last
step is chosen (`chosen_rates`); the other seeds run at that rate. With
`lr_from_examples` set, the rates chosen at that number of init examples
are reused and no grid is run.
"""

import os
from typing import Any

from absl import logging
from flax import nnx
import jax
import numpy as np

from ctxlr import adapters
from ctxlr import calibration
from ctxlr import data
from ctxlr import pipeline
from ctxlr import results
from ctxlr import stats as stats_lib
from ctxlr import surgery
from experiments import common

KEYS = ('method', 'split', 'mu', 'mu_rule')
# Run labels built on ctxlr's statistics (the target's "context-aware");
# every other method is a peer.
OWN_METHODS = ('coala', 'k_star', 'coala_kpa')
STAT_FREE = tuple(m for m, needs in adapters.NEEDS.items() if not needs)


def _runs(config) -> dict[str, dict]:
  """`config.runs` parsed: {label: dict(method, split, mu, mu_rule)};
  methods are the adapter initialisations (`adapters.METHODS`)."""
  runs = common.check_variants(
      config.runs, keys=KEYS, methods=tuple(adapters.METHODS)
  )
  for name, v in runs.items():
    if v['method'] == 'lora' and v['split'] == 'balanced':
      common.fail(
          f'runs.{name}.split', "'own' for lora (its b is 0)", 'balanced'
      )
    if v['mu'] > 0 and v['method'] not in adapters.TAKES_MU:
      common.fail(
          f'runs.{name}.mu', f'0 (only {adapters.TAKES_MU} take μ₀)', v['mu']
      )
  return runs


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  common.check_model_spec(config.model)
  runs = _runs(config)
  for i, name in enumerate(config.only):
    common.check_choice(name, tuple(runs), f'only[{i}]')
  common.check_int(config.rank, 'rank')
  common.check_number(config.scaling, 'scaling', positive=True)
  common.check_layers(config.include, config.exclude)
  for field in ('task', 'general'):
    common.check_choice(config[field], data.CORPORA, field)
  common.check_int(config.seq_len, 'seq_len')
  for field in ('num_examples', 'seq_len', 'batch_size'):
    common.check_int(config.init[field], f'init.{field}')
  common.check_train_spec(config.train)
  common.check_data_spec(config.eval, 'eval')
  for field in ('num_tokens', 'seq_len', 'batch_size'):
    common.check_int(config.val[field], f'val.{field}')
  common.check_int(config.val.skip_sequences, 'val.skip_sequences', minimum=0)
  if config.val.skip_sequences * config.val.seq_len < (
      config.train.steps * config.train.batch_size * config.seq_len
  ):
    common.fail(
        'val.skip_sequences',
        'validation tokens after the training ones (skip_sequences · '
        'val.seq_len >= steps · batch_size · seq_len)',
        config.val.skip_sequences,
    )
  if not config.learning_rates or isinstance(config.learning_rates, float):
    common.fail('learning_rates', 'a non-empty tuple of rates', None)
  for i, lr in enumerate(config.learning_rates):
    common.check_number(lr, f'learning_rates[{i}]', positive=True)
  common.check_int(config.lr_from_examples, 'lr_from_examples', minimum=0)
  if isinstance(config.sweep.examples, int):
    common.fail('sweep.examples', 'a tuple of counts', config.sweep.examples)
  for i, m in enumerate(config.sweep.examples):
    common.check_int(m, f'sweep.examples[{i}]')
  for i, name in enumerate(config.sweep.only):
    common.check_choice(name, tuple(runs), f'sweep.only[{i}]')
  if not config.seeds or isinstance(config.seeds, int):
    common.fail('seeds', 'a non-empty tuple of seeds', config.seeds)
  for i, seed in enumerate(config.seeds):
    common.check_int(seed, f'seeds[{i}]', minimum=0)


def label(run: dict) -> str:
  """A run's label (runs written before labels carry it as 'method')."""
  return run.get('run', run['method'])


def _key(run: dict) -> tuple:
  return (label(run), run['examples'], run['learning_rate'], run['seed'])


def _init_stats(model, seqs, layers, batch_size, *, gram, desc):
  return calibration.layer_stats(
      model,
      data.batches(seqs, batch_size),
      layers,
      want=stats_lib.Want(gram=gram),
      desc=desc,
  )


def _cached_stats(path: str, compute) -> dict:
  """{layer: LayerStats} from `path` if a run saved it, else computed and
  saved (every launch of a sweep reuses one set per example count)."""
  if os.path.exists(path):
    return common.load_stats(path)
  stats = compute()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  common.save_stats(path, stats)
  return stats


def _data_flags(stats, shapes, rank: int) -> dict[str, Any]:
  """What the init statistics saw: tokens, and per input width d_in the
  layers whose data rank is below d_in (X rank-deficient: a singular Gram)
  and below the adapter rank (insufficient, as compression flags it)."""
  ranks = {}
  for s in stats.values():
    if id(s.r) not in ranks:
      ranks[id(s.r)] = pipeline.numerical_rank(s.r)
  by_width = {}
  for name, (d_in, _) in shapes.items():
    row = by_width.setdefault(
        str(d_in),
        dict(layers=0, short=0, insufficient=0, min_data_rank=d_in),
    )
    k = ranks[id(stats[name].r)]
    row['layers'] += 1
    row['short'] += int(k < d_in)
    row['insufficient'] += int(k < rank)
    row['min_data_rank'] = min(row['min_data_rank'], k)
  tokens = int(next(iter(stats.values())).count)
  return dict(tokens=tokens, by_width=by_width)


def _val_fn(tokenizer, config):
  """`model -> {ppl_<corpus>: perplexity}` on the validation sequences:
  calib-split sequences after `val.skip_sequences` of each corpus, read by
  neither the init statistics nor training."""
  v = config.val
  n = max(1, v.num_tokens // v.seq_len)
  sets = {
      c: data.sequences(
          c,
          'calib',
          tokenizer,
          seq_len=v.seq_len,
          num_sequences=v.skip_sequences + n,
      )[v.skip_sequences :]
      for c in (config.task, config.general)
  }
  return common.perplexity_fn(sets, v.batch_size)


def chosen_rates(out: dict, examples: int, task: str) -> dict[str, float]:
  """{label: learning rate} with the lowest validation `task` perplexity at
  the last step among the grid runs (first seed) at `examples`."""
  best = {}
  for r in out['runs']:
    if r['examples'] != examples or r.get('stage') != 'grid':
      continue
    score = r['val'][f'ppl_{task}']
    if label(r) not in best or score < best[label(r)][0]:
      best[label(r)] = (score, r['learning_rate'])
  return {name: lr for name, (_, lr) in best.items()}


def run(config, workdir: str) -> None:
  """Per run label of `config.runs` (or `config.only`): the rate grid on
  the first seed, then the other seeds at the chosen rate; then every
  count of `sweep.examples` at the rates chosen here, for the labels of
  `sweep.only` (empty: this launch's).

  Every run sees the same steps and schedule; a seed fixes the order of
  the training batches and LoRA's random init. A finished (label, examples,
  rate, seed) run is kept in results.json (a rerun skips it); a killed one
  resumes from its last orbax checkpoint in workdir/checkpoints.
  """
  validate(config)
  runs = _runs(config)
  names = list(config.only) or list(runs)
  out = common.read_results(workdir, dict(runs=[], inits={}))
  model, tokenizer = common.load_model(config.model)
  eval_fn = common.make_eval_fn(tokenizer, config.eval)
  val_fn = _val_fn(tokenizer, config)
  out.update(task=config.task, general=config.general)
  if 'dense' not in out:
    out['dense'] = eval_fn(model)
    out['dense_val'] = val_fn(model)
    common.write_results(workdir, out)
  t = config.train
  train_seqs = data.sequences(
      config.task,
      'calib',
      tokenizer,
      seq_len=config.seq_len,
      num_sequences=t.steps * t.batch_size,
  )
  shapes = surgery.select_linears(model, config.include, config.exclude)
  layers = list(shapes)
  stats_dir = os.path.join(workdir, 'stats')
  txs = {}
  done = {_key(r) for r in out['runs']}

  def init_stats(n, labels):
    """(task stats, general stats or None) of the first n examples."""

    def examples(corpus):
      return data.sequences(
          corpus,
          'calib',
          tokenizer,
          seq_len=config.init.seq_len,
          num_sequences=n,
      )

    def cached(corpus, gram):
      return _cached_stats(
          os.path.join(stats_dir, f'{corpus}_{n}.npz'),
          lambda: _init_stats(
              model,
              examples(corpus),
              layers,
              config.init.batch_size,
              gram=gram,
              desc=f'{corpus} {n} examples',
          ),
      )

    needs = {x for name in labels for x in adapters.NEEDS[runs[name]['method']]}
    task = cached(config.task, True)
    general = cached(config.general, False) if 'general' in needs else None
    if str(n) not in out['inits']:
      out['inits'][str(n)] = _data_flags(task, shapes, config.rank)
      common.write_results(workdir, out)
    logging.info('init statistics, %d examples: %s', n, out['inits'][str(n)])
    return task, general

  def one(name, n, stats, lr, seed, stage):
    if (name, n, lr, seed) in done:
      return
    variant = runs[name]
    task, general = stats
    order = (
        np.arange(len(train_seqs))
        if seed == config.seeds[0]
        else np.random.default_rng(seed).permutation(len(train_seqs))
    )
    adapted = nnx.clone(model)
    report = adapters.add_adapters(
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
        mu=variant['mu'],
        mu_rule=variant['mu_rule'],
    )
    mus = [v['mu'] for v in report.values() if 'mu' in v]
    if lr not in txs:
      txs[lr] = common.make_tx(dict(t, learning_rate=lr))
    # Every initialisation keeps the dense model's function at step 0
    # (tested in tests/test_adapters.py): its step-0 row is the dense one.
    history, ckpt = common.train_run(
        adapted,
        train_seqs[order],
        wrt=adapters.TRAINABLE,
        tx=txs[lr],
        train=t,
        eval_fn=eval_fn,
        workdir=workdir,
        name=f'{name}_n{n}_lr{lr:g}_seed{seed}',
        eval_at_start=False,
        desc=f'{name} n={n} lr={lr:g} seed {seed}',
    )
    common.keep_run(
        workdir,
        out,
        dict(
            run=name,
            **variant,
            examples=n,
            learning_rate=lr,
            seed=seed,
            stage=stage,
            trainable=adapters.count_trainable(adapted),
            median_mu=float(np.median(mus)) if mus else 0.0,
            eval=[dict(step=0, **out['dense'])] + history['eval'],
            val=val_fn(adapted),
            train=history['train'],
        ),
        ckpt,
    )
    done.add((name, n, lr, seed))
    logging.info('%s: %s', name, out['runs'][-1]['eval'][-1])

  def reused(reuse, labels, field):
    rates = chosen_rates(out, reuse, config.task)
    missing = [name for name in labels if name not in rates]
    if missing:
      common.fail(
          field,
          f'labels whose grid ran at {reuse} init examples (not {missing})',
          reuse if field == 'lr_from_examples' else labels,
      )
    return rates

  n, reuse = config.init.num_examples, config.lr_from_examples
  rates = reused(reuse, names, 'lr_from_examples') if reuse else None
  stats = init_stats(n, names)
  for name in names:
    if not reuse:
      for lr in config.learning_rates:
        one(name, n, stats, lr, config.seeds[0], 'grid')
      lr = chosen_rates(out, n, config.task)[name]
    else:
      lr = rates[name]
    for seed in config.seeds:
      one(
          name,
          n,
          stats,
          lr,
          seed,
          'grid' if seed == config.seeds[0] and not reuse else 'seeds',
      )
  # The example sweep: the rates of this launch's count, no grid.
  labels = list(config.sweep.only) or names
  rates = (
      reused(reuse or n, labels, 'sweep.only')
      if config.sweep.examples
      else None
  )
  for m in config.sweep.examples:
    stats = init_stats(m, labels)
    for name in labels:
      for seed in config.seeds:
        one(name, m, stats, rates[name], seed, 'seeds')
  common.finish(workdir, summarize(out), plot)


# ----------------------------------------------------------------- summary --


def final_runs(out: dict) -> dict[tuple[str, int], list[dict]]:
  """{(label, examples): the runs at the chosen rate, one per seed}.

  At an example count with a grid the chosen rate is that grid's; where
  none ran (rates reused), the runs' own (single) rate.
  """
  groups = {}
  for r in out['runs']:
    groups.setdefault((label(r), r['examples']), []).append(r)
  final = {}
  for (name, n), rs in groups.items():
    rate = chosen_rates(out, n, out['task']).get(name)
    if rate is None:
      rate = rs[0]['learning_rate']
    final[(name, n)] = [r for r in rs if r['learning_rate'] == rate]
  return final


def _stat(values) -> tuple[float, float]:
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summary_rows(out: dict) -> list[dict]:
  """One row per (label, examples) at the chosen rate: mean and standard
  deviation over seeds of the test perplexities at every evaluated step,
  the validation perplexities and the train loss of the last 10 steps."""
  rows = []
  for (name, n), rs in final_runs(out).items():
    first = rs[0]
    row = dict(
        run=name,
        method=first['method'],
        examples=n,
        learning_rate=first['learning_rate'],
        seeds=len(rs),
        steps=[e['step'] for e in first['eval']],
        loss_last=_stat(
            [np.mean([x['loss'] for x in r['train'][-10:]]) for r in rs]
        ),
    )
    for corpus in out['dense']:
      row[corpus] = [
          _stat([r['eval'][i][corpus] for r in rs])
          for i in range(len(first['eval']))
      ]
      row[f'val_{corpus}'] = _stat([r['val'][corpus] for r in rs])
    rows.append(row)
  return rows


def _pm(stat) -> str:
  return f'{stat[0]:.2f} ± {stat[1]:.2f}'


def verdict(rows: list[dict], corpus: str, at: int) -> dict | None:
  """The best ctxlr init (`OWN_METHODS`) against the best peer on `corpus`
  at `examples` = `at`: means, standard deviations, and whether the best
  ctxlr init wins by more than the seeds' spread (sum of the two stds)."""
  here = {r['run']: r for r in rows if r['examples'] == at}
  for r in rows:  # inits that read no statistics hold at every count
    if r['method'] in STAT_FREE:
      here.setdefault(r['run'], r)
  own = [r for r in here.values() if r['method'] in OWN_METHODS]
  peers = [r for r in here.values() if r['method'] not in OWN_METHODS]
  if not own or not peers:
    return None
  end = lambda r: r[corpus][-1]
  a = min(own, key=lambda r: end(r)[0])
  b = min(peers, key=lambda r: end(r)[0])
  gap = end(b)[0] - end(a)[0]
  return dict(
      own=a['run'],
      own_stat=end(a),
      peer=b['run'],
      peer_stat=end(b),
      gap=gap,
      spread=end(a)[1] + end(b)[1],
      met=gap > end(a)[1] + end(b)[1],
  )


def summarize(out: dict) -> str:
  """Markdown: what the init statistics saw; the rate grid (validation);
  per example count, test perplexities (mean ± std over seeds at the
  chosen rate) at every evaluated step; the target's verdict."""
  rows = summary_rows(out)
  if not rows:
    return 'No finished run.\n'
  task, general = f'ppl_{out["task"]}', f'ppl_{out["general"]}'
  corpora = [c[len('ppl_') :] for c in out['dense']]
  dense = ', '.join(
      f'{c} {p:.2f}' for c, p in zip(corpora, out['dense'].values())
  )
  dval = ', '.join(f'{k[4:]} {v:.2f}' for k, v in out['dense_val'].items())
  text = [
      f'Step 0 (every initialisation = the dense model): test {dense}; '
      f'validation {dval}. Mean ± standard deviation over seeds, at the '
      'rate chosen on the validation set.\n'
  ]
  seconds = [x['seconds'] for r in out['runs'] for x in r['train'][1:]]
  text.append(
      f'\n{len(out["runs"])} runs; seconds per training step (after the '
      f'first): median {np.median(seconds):.2f}, 10th-90th percentile '
      f'{np.percentile(seconds, 10):.2f}-{np.percentile(seconds, 90):.2f}.\n'
  )
  flag_rows = []
  for n, info in sorted(out['inits'].items(), key=lambda kv: int(kv[0])):
    for width, f in sorted(info['by_width'].items(), key=lambda kv: int(kv[0])):
      flag_rows.append(
          dict(
              examples=int(n),
              tokens=info['tokens'],
              d_in=int(width),
              layers=f['layers'],
              short=f['short'],
              insufficient=f['insufficient'],
              min_data_rank=f['min_data_rank'],
          )
      )
  text.append(
      '\n## Init statistics\n\n"short": data rank of the init tokens < d_in '
      '(X rank-deficient, singular Gram); "insufficient": data rank < the '
      'adapter rank (the layers compression regularizes).\n\n'
      + results.markdown_table(flag_rows, list(flag_rows[0]))
  )
  grid, tests = {}, {}
  for r in out['runs']:
    if r.get('stage') == 'grid':
      g = grid.setdefault((label(r), r['examples']), {})
      g[r['learning_rate']] = r['val']
      tests.setdefault((label(r), r['examples']), {})[r['learning_rate']] = r[
          'eval'
      ][-1]
  rates = sorted({lr for g in grid.values() for lr in g})
  grid_rows = []
  for (name, n), g in grid.items():
    chosen = chosen_rates(out, n, out['task']).get(name)
    line = dict(run=name, examples=n)
    for lr in rates:
      v = g.get(lr)
      line[f'lr {lr:g}'] = (
          ''
          if v is None
          else f'{v[task]:.2f} / {v[general]:.2f}'
          + (' *' if lr == chosen else '')
      )
    grid_rows.append(line)
  if grid_rows:
    text.append(
        f'\n## Learning-rate grid (first seed)\n\nValidation {out["task"]} / '
        f'{out["general"]} perplexity at the last step; * the chosen rate '
        f'(lowest validation {out["task"]}).\n\n'
        + results.markdown_table(grid_rows, list(grid_rows[0]))
    )
    test_rows = []
    for (name, n), g in tests.items():
      line = dict(run=name, examples=n)
      for lr in rates:
        v = g.get(lr)
        line[f'lr {lr:g}'] = (
            '' if v is None else f'{v[task]:.2f} / {v[general]:.2f}'
        )
      test_rows.append(line)
    text.append(
        f'\nThe same grid on the test set ({out["task"]} / {out["general"]} at '
        'the last step; not used to choose):\n\n'
        + results.markdown_table(test_rows, list(test_rows[0]))
    )
  for n in sorted({r['examples'] for r in rows}):
    table = []
    for r in rows:
      if r['examples'] != n:
        continue
      line = dict(run=r['run'], lr=f'{r["learning_rate"]:g}', seeds=r['seeds'])
      for c in corpora:
        for i, step in enumerate(r['steps'][1:], 1):
          line[f'{c} @{step}'] = _pm(r[f'ppl_{c}'][i])
      line['train loss last 10'] = f'{r["loss_last"][0]:.4f}'
      table.append(line)
    text.append(
        f'\n## {n} init examples: held-out test perplexity\n\n'
        + results.markdown_table(table, list(table[0]))
    )
    for corpus, what in ((task, 'learning'), (general, 'forgetting')):
      v = verdict(rows, corpus, n)
      if v is None:
        continue
      text.append(
          f'\n{what.capitalize()} ({corpus[4:]} at the last step): best ctxlr '
          f'init {v["own"]} {_pm(v["own_stat"])}, best peer {v["peer"]} '
          f'{_pm(v["peer_stat"])}; gap {v["gap"]:+.2f} vs spread '
          f'{v["spread"]:.2f}: target {"met" if v["met"] else "not met"}.\n'
      )
  sweep = sorted({r['examples'] for r in rows})
  labels = [
      name
      for name in dict.fromkeys(r['run'] for r in rows)
      if sum(r['run'] == name for r in rows) > 1
  ]
  if len(sweep) > 1 and labels:
    table = []
    for name in labels:
      line = dict(run=name)
      for n in sweep:
        r = next(
            (x for x in rows if x['run'] == name and x['examples'] == n), None
        )
        line[f'{n} ex.'] = (
            ''
            if r is None
            else f'{_pm(r[task][-1])} / {_pm(r[general][-1])} ({r["seeds"]})'
        )
      table.append(line)
    text.append(
        f'\n## Init examples sweep\n\nTest {out["task"]} / {out["general"]} '
        'perplexity at the last step (seeds). lora, pissa and milora read '
        'no statistics: their rows hold at every count.\n\n'
        + results.markdown_table(table, list(table[0]))
    )
  return ''.join(text)


# ------------------------------------------------------------------- plots --


def _balanced(run: dict) -> bool:
  return run.get('split') == 'balanced'


def plot(workdir: str) -> None:
  """finetune_curves.png (the example count with most runs: train loss
  minus lora's on the same batch, test perplexities vs step, mean ± std
  over seeds at the chosen rates) and examples_sweep.png (final test
  perplexities vs init examples), from results.json alone."""
  out = common.read_results(workdir, None)
  rows = summary_rows(out)
  if not rows:
    return
  corpora = list(out['dense'])
  counts = [r['examples'] for r in rows]
  main = max(set(counts), key=counts.count)
  final = final_runs(out)
  here = [r for r in rows if r['examples'] == main]
  colors = {r['run']: f'C{i % 10}' for i, r in enumerate(here)}
  fig, axes = common.subplots(
      1, 1 + len(corpora), figsize=(4.6 * (1 + len(corpora)), 3.8)
  )
  axes = axes[0]
  ref = next((r for r in here if r['method'] == 'lora'), None)

  def losses(name, seed):
    runs = [r for r in final[(name, main)] if r['seed'] == seed]
    return np.array([x['loss'] for x in runs[0]['train']]) if runs else None

  for r in here:
    style = dict(
        color=colors[r['run']],
        ls='--' if _balanced(final[(r['run'], main)][0]) else '-',
        label=r['run'],
    )
    diffs = []
    for run_ in final[(r['run'], main)]:
      mine = np.array([x['loss'] for x in run_['train']])
      other = losses(ref['run'], run_['seed']) if ref is not None else None
      if other is None or len(other) != len(mine):
        other = np.zeros_like(mine)
      diffs.append(mine - other)
    diff = np.mean(diffs, axis=0)
    k = min(10, len(diff))
    axes[0].plot(
        np.arange(k, len(diff) + 1),
        np.convolve(diff, np.ones(k) / k, mode='valid'),
        **style,
    )
    for ax, corpus in zip(axes[1:], corpora):
      mean = np.array([s[0] for s in r[corpus]])
      std = np.array([s[1] for s in r[corpus]])
      ax.plot(r['steps'], mean, marker='o', ms=3, **style)
      ax.fill_between(
          r['steps'], mean - std, mean + std, color=style['color'], alpha=0.15
      )
  axes[0].set_title(
      f'train loss − {ref["run"] if ref else "0"} (same batch, mean of 10)',
      fontsize=9,
  )
  axes[0].set_xlabel('step')
  for ax, corpus in zip(axes[1:], corpora):
    ax.axhline(out['dense'][corpus], color='k', ls=':', lw=0.8, label='dense')
    ax.set_title(f'held-out {corpus[4:]} ppl, {main} init examples')
    ax.set_xlabel('step')
  common.legend_outside(fig, axes)
  common.save_figure(fig, workdir, 'finetune_curves.png')

  sweep = sorted(set(counts))
  if len(sweep) < 2:
    return
  fig, axes = common.subplots(
      1, len(corpora), figsize=(4.8 * len(corpora), 3.8)
  )
  for ax, corpus in zip(axes[0], corpora):
    for i, name in enumerate(dict.fromkeys(r['run'] for r in rows)):
      mine = sorted(
          (r for r in rows if r['run'] == name), key=lambda r: r['examples']
      )
      color = f'C{i % 10}'
      if len(mine) == 1 and mine[0]['method'] in STAT_FREE:
        ax.axhline(mine[0][corpus][-1][0], color=color, ls=':', label=name)
        continue
      ax.errorbar(
          [r['examples'] for r in mine],
          [r[corpus][-1][0] for r in mine],
          yerr=[r[corpus][-1][1] for r in mine],
          marker='o',
          ms=4,
          capsize=3,
          color=color,
          label=name,
      )
    ax.set_xscale('log')
    ax.set_xlabel('init examples')
    ax.set_title(f'held-out {corpus[4:]} ppl at the last step')
  common.legend_outside(fig, axes)
  common.save_figure(fig, workdir, 'examples_sweep.png')
