"""Which training-free lever buys perplexity: one kept ratio, each lever alone.

Every row compresses all projections of the default model at one kept ratio
and scores it on the held-out split of each corpus. A row names its
calibration set (a corpus mixture and a token count, `config.calibs`) and its
pipeline options (method, method options, allocation, μ rule, mode). Each
calibration set is calibrated once (statistics cached in
`workdir/cache/`), its loss-gradient energies measured once if a row
allocates by them, and every one-shot row compresses a copy of the dense
model from those statistics (`pipeline.compress_from_stats`); sequential
rows run `pipeline.compress` on the same batches. Finished rows are kept in
results.json and a rerun skips them.

An optional healing part trains the factors of one row's model
(`healing.heal`) for a time or step budget and records perplexity against
seconds.

Calibration fold: `config.dense_fold` (default True) makes the calibration
use the dense-QR fold `qr_r([X_b; R])` (docs/method.md §3), the fold the
recorded rows were computed with. The library's `qr.fold_r_unchecked` on
CPU is LAPACK's structured ?tpqrt (`linalg/lapack_fold.py`): the same R to
rounding, faster.
"""

import contextlib
import os
import time
from typing import Any

from flax import nnx
import jax
import matplotlib
import numpy as np

from ctxlr import calibration
from ctxlr import data
from ctxlr import healing
from ctxlr import pipeline
from ctxlr import registry
from ctxlr import results
from ctxlr import sensitivity as sensitivity_lib
from ctxlr import stats as stats_lib
from ctxlr import surgery
from ctxlr.linalg import qr
from experiments import common

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

ROW_KEYS = (
    'group',
    'calib',
    'method',
    'options',
    'allocation',
    'mu',
    'mu_rule',
    'auto_mu',
    'auto_mu_rule',
    'mode',
    'note',
    'ratio',
)
ROW_DEFAULTS = dict(
    ratio=None,
    options={},
    allocation='uniform',
    mu=0.0,
    mu_rule='energy',
    auto_mu=0.0,
    auto_mu_rule='energy',
    mode='one_shot',
    note='',
)


# ----------------------------------------------------------------- config --


def _fail(path: str, expected: str, got: Any):
  raise ValueError(f'{path}: expected {expected}, got {got!r}.')


def calib_spec(spec) -> dict[str, Any]:
  """A calibration set's fields, checked: mixture, num_tokens, seq_len,
  batch_size."""
  mixture = (
      dict(spec.mixture.items())
      if hasattr(spec.mixture, 'items')
      else (spec.mixture)
  )
  data.mixture_counts(
      mixture, max(len(mixture), spec.num_tokens // spec.seq_len)
  )
  return dict(
      mixture=mixture,
      num_tokens=spec.num_tokens,
      seq_len=spec.seq_len,
      batch_size=spec.batch_size,
  )


def row_options(row) -> dict[str, Any]:
  """A row with the defaults filled in."""
  out = {k: row[k] if k in row else ROW_DEFAULTS.get(k) for k in ROW_KEYS}
  options = out['options'] or {}
  out['options'] = dict(options.items())
  return out


def validate(config) -> None:
  """Every option error, before the model is loaded."""
  if not 0 < config.ratio <= 1:
    _fail('ratio', 'a kept ratio in (0, 1]', config.ratio)
  for name in config.calibs.keys():
    spec = config.calibs[name]
    for field in ('num_tokens', 'seq_len', 'batch_size'):
      value = spec[field]
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(f'calibs.{name}.{field}', 'a positive integer', value)
    if spec.num_tokens < spec.seq_len:
      _fail(
          f'calibs.{name}.num_tokens',
          f'>= seq_len ({spec.seq_len})',
          spec.num_tokens,
      )
    try:
      calib_spec(spec)
    except ValueError as e:
      raise ValueError(f'calibs.{name}.mixture: {e}') from None
  if not list(config.rows.keys()):
    _fail('rows', 'at least one row', config.rows)
  for label in config.rows.keys():
    row = config.rows[label]
    unknown = set(row.keys()) - set(ROW_KEYS)
    if unknown:
      _fail(f'rows.{label}', f'keys among {ROW_KEYS}', sorted(unknown))
    row = row_options(row)
    if row['calib'] not in config.calibs:
      _fail(
          f'rows.{label}.calib',
          f'one of {list(config.calibs.keys())}',
          row['calib'],
      )
    try:
      pipeline.check_options(
          ratio=row['ratio'] or config.ratio,
          method=row['method'],
          mu=row['mu'],
          allocation=row['allocation'],
          mu_rule=row['mu_rule'],
          mode=row['mode'],
          auto_mu=row['auto_mu'],
          auto_mu_rule=row['auto_mu_rule'],
          method_options=row['options'],
      )
    except ValueError as e:
      raise ValueError(f'rows.{label}: {e}') from None
  if config.heal.enabled:
    if config.heal.row not in config.rows:
      _fail('heal.row', f'one of {list(config.rows.keys())}', config.heal.row)
    healing.check_budget(
        seconds=config.heal.seconds or None, steps=config.heal.steps or None
    )
    try:
      data.mixture_counts(
          dict(config.heal.mixture.items()), 1 + len(config.heal.mixture)
      )
    except ValueError as e:
      raise ValueError(f'heal.mixture: {e}') from None


# -------------------------------------------------------------------- run --


def _batches(tokenizer, spec: dict[str, Any]) -> list[np.ndarray]:
  seq_len = min(spec['seq_len'], spec['num_tokens'])
  n = max(1, spec['num_tokens'] // seq_len)
  mixture = spec['mixture']
  if len(mixture) == 1:
    (corpus,) = mixture
    seqs = data.sequences(
        corpus, 'calib', tokenizer, seq_len=seq_len, num_sequences=n
    )
  else:
    seqs = data.mixture_sequences(
        mixture, 'calib', tokenizer, seq_len=seq_len, num_sequences=n
    )
  return list(data.batches(seqs, min(spec['batch_size'], len(seqs))))


def _has(stats, want: stats_lib.Want) -> bool:
  """Whether every LayerStats holds the statistics `want` asks for."""
  s = next(iter(stats.values()))
  return (not want.gram or s.gram is not None) and (
      not want.abs_sum or s.abs_sum is not None
  )


def _want(rows) -> stats_lib.Want:
  wants = [registry.get(r['method']).want for r in rows]
  return stats_lib.Want(
      gram=any(w.gram for w in wants), abs_sum=any(w.abs_sum for w in wants)
  )


def _row_result(label, row, spec, report, ppl, dense, seconds):
  layers = [l for l in report['layers'].values() if l['rank'] is not None]
  out = dict(
      label=label,
      **{k: row[k] for k in ROW_KEYS},
      tokens=spec['num_tokens'],
      mixture=spec['mixture'],
      kept_ratio=report['kept_ratio'],
      model_ratio=report['model_ratio'],
      dense_layers=sum(l['rank'] is None for l in report['layers'].values()),
      seconds=seconds,
      failed_layers=sum(bool(l['failed']) for l in layers),
      nonfinite_layers=sum(bool(l['nonfinite']) for l in layers),
      median_rel_err=float(np.median([l['rel_err'] for l in layers])),
      ranks={n: l['rank'] for n, l in report['layers'].items()},
  )
  for corpus, value in ppl.items():
    out[f'ppl_{corpus}'] = value['perplexity']
    out[f'x_{corpus}'] = value['perplexity'] / dense[corpus]
  return out


@contextlib.contextmanager
def folding(dense: bool):
  """Calibration inside uses the dense fold if `dense` (module docstring)."""
  if not dense:
    yield
    return
  # Calibration steps compile once per model: cleared on both sides of the
  # swap so that no step compiled with one fold runs with the other.
  jax.clear_caches()
  saved, qr.fold_r_unchecked = qr.fold_r_unchecked, qr.fold_r_dense
  try:
    yield
  finally:
    qr.fold_r_unchecked = saved
    jax.clear_caches()


def run(config, workdir: str) -> None:
  """Every ablation row of the config at its kept ratio, both held-out sets.

  Writes results.json (each finished row kept: a rerun skips it; statistics
  cached per calibration set under workdir/cache), summary.md and
  ablation.png redrawn from results.json.
  """
  with folding(config.dense_fold):
    _run(config, workdir)


def _run(config, workdir: str) -> None:
  path = os.path.join(workdir, 'results.json')
  out, dense, tokenizer = common.resume_sweep(workdir, config)
  out.setdefault('calibration_seconds', {})
  cache = os.path.join(workdir, 'cache')
  os.makedirs(cache, exist_ok=True)
  names = list(surgery.select_linears(dense, config.include, config.exclude))
  done = {r['label'] for r in out['rows']}
  rows = {
      label: row_options(config.rows[label]) for label in config.rows.keys()
  }
  for row in rows.values():
    row['ratio'] = row['ratio'] or config.ratio
  for calib in dict.fromkeys(r['calib'] for r in rows.values()):
    todo = [l for l, r in rows.items() if r['calib'] == calib and l not in done]
    if not todo:
      continue
    spec = calib_spec(config.calibs[calib])
    batches = _batches(tokenizer, spec)
    stats_path = os.path.join(cache, f'{calib}.npz')
    want = _want(r for r in rows.values() if r['calib'] == calib)
    stats = (
        common.load_stats(stats_path) if os.path.exists(stats_path) else None
    )
    if stats is not None and not _has(stats, want):
      stats = None  # cached without a needed statistic
    if stats is None:
      t = time.perf_counter()
      common.reset_peak_rss()
      stats = calibration.layer_stats(dense, batches, names, want=want)
      out['calibration_seconds'][calib] = time.perf_counter() - t
      out.setdefault('calibration_memory', {})[calib] = dict(
          peak_rss_bytes=common.peak_rss(),
          stacked_activation_bytes=common.stacked_bytes(
              dense, names, spec['num_tokens']
          ),
          statistics_bytes=common.stats_bytes(stats),
      )
      common.save_stats(stats_path, stats)
      results.write_json(path, out)
    energy = None
    if any(rows[l]['allocation'] in pipeline.NEEDS_SENSITIVITY for l in todo):
      energy = common.cached_sensitivity(
          dense,
          batches,
          names,
          os.path.join(cache, f'{calib}.sensitivity.json'),
          dict(calib=spec),
      )
    for label in todo:
      row = rows[label]
      model = nnx.clone(dense)
      t = time.perf_counter()
      kwargs = dict(
          ratio=row['ratio'],
          method=row['method'],
          mu=row['mu'],
          mu_rule=row['mu_rule'],
          auto_mu=row['auto_mu'],
          auto_mu_rule=row['auto_mu_rule'],
          allocation=row['allocation'],
          method_options=row['options'],
          sensitivity=energy,
      )
      try:
        if row['mode'] == 'sequential':
          report = pipeline.compress(
              model,
              batches,
              mode='sequential',
              include=config.include,
              exclude=config.exclude,
              **kwargs,
          )
        else:
          report = pipeline.compress_from_stats(model, stats, **kwargs)
      except ValueError as e:  # a rule undefined on these data
        out.setdefault('errors', []).append(dict(label=label, error=str(e)))
        out['rows'].append(dict(label=label, error=str(e)))
        results.write_json(path, out)
        print(label, 'raised:', e, flush=True)
        continue
      seconds = time.perf_counter() - t
      ppl = common.evaluate(model, tokenizer, config.eval, label)
      out['rows'].append(
          _row_result(label, row, spec, report, ppl, out['dense'], seconds)
      )
      results.write_json(path, out)
      print(
          label,
          {
              k: v
              for k, v in out['rows'][-1].items()
              if k.startswith(('ppl_', 'x_', 'kept'))
          },
          flush=True,
      )
    del stats
  if config.heal.enabled and 'heal' not in out:
    out['heal'] = _heal(config, dense, tokenizer, rows, out, workdir)
    results.write_json(path, out)
  common.finish(workdir, summarize(out), plot)


def _heal(config, dense, tokenizer, rows, out, workdir):
  """Rebuilds the healing row's model, trains its factors, records curves."""
  label = config.heal.row
  row = rows[label]
  spec = calib_spec(config.calibs[row['calib']])
  batches = _batches(tokenizer, spec)
  stats = common.load_stats(
      os.path.join(workdir, 'cache', f'{row["calib"]}.npz')
  )
  energy = None
  if row['allocation'] in pipeline.NEEDS_SENSITIVITY:
    energy = sensitivity_lib.from_json(
        results.read_json(
            os.path.join(workdir, 'cache', f'{row["calib"]}.sensitivity.json')
        )['energy']
    )
  model = nnx.clone(dense)
  kwargs = dict(
      ratio=row['ratio'],
      method=row['method'],
      mu=row['mu'],
      mu_rule=row['mu_rule'],
      auto_mu=row['auto_mu'],
      auto_mu_rule=row['auto_mu_rule'],
      allocation=row['allocation'],
      method_options=row['options'],
      sensitivity=energy,
  )
  if row['mode'] == 'sequential':
    pipeline.compress(
        model,
        batches,
        mode='sequential',
        include=config.include,
        exclude=config.exclude,
        **kwargs,
    )
  else:
    pipeline.compress_from_stats(model, stats, **kwargs)
  del stats
  h = config.heal
  seqs = healing.training_sequences(
      tokenizer,
      dict(h.mixture.items()),
      seq_len=h.seq_len,
      skip_tokens=spec['num_tokens'],
      num_tokens=h.num_tokens,
  )

  def eval_fn(m):
    ppl = common.evaluate(m, tokenizer, config.eval, 'heal')
    return {f'ppl_{c}': v['perplexity'] for c, v in ppl.items()}

  history = healing.heal(
      model,
      seqs,
      seconds=h.seconds or None,
      steps=h.steps or None,
      learning_rate=h.learning_rate,
      batch_size=h.batch_size,
      warmup_fraction=h.warmup_fraction,
      eval_fn=eval_fn,
      eval_every_seconds=h.eval_every_seconds or None,
  )
  return dict(row=label, config=h.to_dict(), **history)


# ---------------------------------------------------------------- summary --


def summarize(out: dict) -> str:
  """The table of rows (perplexity and × dense per corpus), then healing."""
  corpora = list(out['dense'])
  lines = [
      'Dense perplexity: '
      + ', '.join(f'{c} {out["dense"][c]:.2f}' for c in corpora)
      + '.',
      '',
  ]
  header = ['row', 'group', 'calibration', 'method', 'allocation', 'kept']
  for c in corpora:
    header += [c, f'× dense ({c})']
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|' + '---|' * len(header))
  for r in out['rows']:
    if 'error' in r:
      continue
    mix = (
        '+'.join(f'{c}:{w:g}' for c, w in r['mixture'].items())
        if len(r['mixture']) > 1
        else next(iter(r['mixture']))
    )
    method = r['method'] + ''.join(f' {k}={v}' for k, v in r['options'].items())
    if r['mu'] > 0:
      method += f' μ₀={r["mu"]:g} ({r["mu_rule"]})'
    if r['auto_mu'] > 0:
      method += f' auto μ₀={r["auto_mu"]:g} ({r["auto_mu_rule"]})'
    if r['mode'] != 'one_shot':
      method += f', {r["mode"]}'
    cells = [
        r['label'],
        r['group'],
        f'{mix} {r["tokens"]:,}',
        method,
        r['allocation'],
        f'{r["kept_ratio"]:.4f}',
    ]
    for c in corpora:
      cells += [common.fmt_ppl(r[f'ppl_{c}']), f'{r[f"x_{c}"]:.2f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  if out.get('errors'):
    lines += ['', 'Rows that raised (the rule is undefined on those data):']
    lines += [f'- {e["label"]}: {e["error"]}' for e in out['errors']]
  if out.get('calibration_seconds'):
    lines += [
        '',
        'Calibration seconds per set: '
        + ', '.join(
            f'{k} {v:.0f}' for k, v in out['calibration_seconds'].items()
        )
        + '.',
    ]
  if out.get('calibration_memory'):
    lines += [
        '',
        'Calibration memory per set (peak RSS of the whole process '
        'during calibration, the float32 size of the stacked layer '
        'inputs it never forms, and the statistics kept):',
        '',
        '| set | peak RSS (GiB) | stacked inputs (GiB) | statistics ' '(GiB) |',
        '|---|---|---|---|',
    ]
    for name, m in out['calibration_memory'].items():
      rss = m['peak_rss_bytes']
      lines.append(
          f'| {name} | {rss / 2**30:.2f} | ' if rss else f'| {name} | n/a | '
      )
      lines[-1] += (
          f"{m['stacked_activation_bytes'] / 2**30:.2f} | "
          f"{m['statistics_bytes'] / 2**30:.2f} |"
      )
  heal = out.get('heal')
  if heal:
    lines += [
        '',
        f'Healing of row {heal["row"]} (factors only): '
        'perplexity against training seconds.',
        '',
        '| step | seconds | ' + ' | '.join(corpora) + ' |',
        '|---|---|' + '---|' * len(corpora),
    ]
    for e in heal['eval']:
      lines.append(
          f'| {e["step"]} | {e["seconds"]:.0f} | '
          + ' | '.join(common.fmt_ppl(e[f'ppl_{c}']) for c in corpora)
          + ' |'
      )
  return '\n'.join(lines) + '\n'


def plot(workdir: str) -> None:
  """× dense per row and corpus (log scale), and the healing curve."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  corpora = list(out['dense'])
  rows = [r for r in out['rows'] if 'error' not in r]
  heal = out.get('heal')
  fig, axes = plt.subplots(
      1,
      2 if heal else 1,
      squeeze=False,
      figsize=(12 if heal else 8, max(3, 0.28 * len(rows) + 1)),
  )
  ax = axes[0][0]
  y = np.arange(len(rows))
  width = 0.8 / len(corpora)
  for i, c in enumerate(corpora):
    ax.barh(y + i * width, [r[f'x_{c}'] for r in rows], height=width, label=c)
  ax.set_yticks(y + width * (len(corpora) - 1) / 2)
  ax.set_yticklabels([r['label'] for r in rows], fontsize=7)
  ax.invert_yaxis()
  ax.set_xscale('log')
  ax.set_xlabel('perplexity / dense')
  ax.set_title(f'kept ratio {rows[0]["kept_ratio"]:.2f}' if rows else '')
  ax.legend(fontsize=7)
  if heal:
    ax = axes[0][1]
    for c in corpora:
      ax.plot(
          [e['seconds'] for e in heal['eval']],
          [e[f'ppl_{c}'] / out['dense'][c] for e in heal['eval']],
          'o-',
          ms=3,
          label=c,
      )
    ax.set_yscale('log')
    ax.set_xlabel('training seconds')
    ax.set_ylabel('perplexity / dense')
    ax.set_title(f'healing {heal["row"]}')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'ablation.png'), dpi=120)
  plt.close(fig)
