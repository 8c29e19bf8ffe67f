"""The main job: compress the default model, evaluate it, save it.

Writes to the workdir: results.json (dense and compressed perplexity, the
per-layer report, seconds per phase, wall time, disk use), summary.md,
layer_errors.png (redrawn from results.json by `plot`), and, with
`config.save`, the orbax checkpoint model/ and factors.safetensors. With
`config.heal.enabled` the factors are then trained for a time or step
budget (`ctxlr.healing`), the healed model is evaluated too, and it is the
one saved.
"""

import json
import os
import shutil
import time

import jax
import matplotlib
import numpy as np

from ctxlr import allocation
from ctxlr import checkpoint
from ctxlr import healing
from ctxlr import models
from ctxlr import pipeline
from ctxlr import registry
from ctxlr import results
from ctxlr import surgery
from experiments import common

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

_DEFAULT_AUTO_MU = 1e-4  # μ₀ for layers short of data (docs/results/
# calibration_sweep: within 1% of K_* at 128 tokens)


def mixture(calib) -> dict[str, float] | None:
  """`calib.mixture` ('corpus:weight,…') as a dict, or None (`calib.corpus`
  alone); `common.calib_mixture`, which also checks corpora and weights."""
  return common.calib_mixture(calib)


def method_options(config) -> dict[str, float]:
  """The method's options from the config (`power` for coala)."""
  return {} if config.power is None else dict(power=config.power)


def validate(config) -> None:
  """Every option error of the main job, before anything is loaded."""
  try:
    record = registry.get(config.method)
  except ValueError as e:
    raise ValueError(f'method: {e}') from None
  try:
    registry.check_options(config.method, method_options(config))
  except ValueError as e:
    raise ValueError(str(e).replace('method_options:', 'power:', 1)) from None
  if (
      config.auto_mu is not None
      and config.auto_mu > 0
      and (not record.takes_mu)
  ):
    raise ValueError(
        f'auto_mu: {config.method!r} has no ridge term (methods with one: '
        f'{registry.names(takes_mu=True)}); leave auto_mu unset for it.'
    )
  try:
    pipeline.check_options(
        ratio=config.ratio,
        method=config.method,
        mu=config.mu,
        allocation=config.allocation,
        mu_rule=config.mu_rule,
        mode=config.mode,
        auto_mu=auto_mu(config),
        auto_mu_rule=config.auto_mu_rule,
    )
  except ValueError as e:
    raise ValueError(
        str(e).replace('allocation must', 'allocation: must')
    ) from None
  common.check_model_and_data(config)
  common.check_layers(config.include, config.exclude)
  mixture(config.calib)
  if config.heal.enabled:
    try:
      healing.check_budget(seconds=config.heal.seconds, steps=config.heal.steps)
    except ValueError as e:
      raise ValueError(f'heal.{e}') from None
    for field in ('batch_size', 'seq_len', 'num_tokens'):
      value = config.heal[field]
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f'heal.{field}: expected a positive integer; got ' f'{value!r}.'
        )
    if not config.heal.learning_rate > 0:
      raise ValueError(
          f'heal.learning_rate: expected a number > 0; got '
          f'{config.heal.learning_rate!r}.'
      )
  if record.float64:
    raise ValueError(
        f'method: {config.method!r} is a float64 reference, '
        'not a method to ship; the calibration_sweep '
        'experiment runs it.'
    )


def auto_mu(config) -> float:
  """config.auto_mu, or the method's default: 1e-4 if it takes μ, else 0."""
  if config.auto_mu is not None:
    return config.auto_mu
  return _DEFAULT_AUTO_MU if registry.get(config.method).takes_mu else 0.0


def run(config, workdir: str) -> None:
  """Calibrates, compresses, evaluates and saves; resumes from workdir.

  Statistics and finished layers are kept in workdir/progress as they
  complete (kill the run and rerun the same command to resume); the dense
  evaluation is cached in workdir/dense.json. progress/ is removed once the
  results and the model are saved, unless `config.keep_progress`.
  """
  start = time.perf_counter()
  t = time.perf_counter()
  model, tokenizer = common.load_model(config.model)
  seconds = dict(load=time.perf_counter() - t)
  layer_shapes = surgery.select_linears(model, config.include, config.exclude)
  if config.ratio < 1:  # an infeasible budget fails before any long work
    allocation.check_budget(layer_shapes, config.ratio)
  dense, dense_seconds, reused = _dense_eval(model, tokenizer, config, workdir)
  seconds['eval_dense'] = dense_seconds
  print(
      models.describe_scale(
          models.scale_facts(
              model, layer_shapes, want=registry.get(config.method).want
          )
      ),
      flush=True,
  )
  batches = common.calibration_batches(tokenizer, config.calib)
  mesh = None
  if config.data_parallel and jax.device_count() > 1:
    mesh = jax.make_mesh((jax.device_count(),), ('data',))
  progress = os.path.join(workdir, 'progress')
  report = pipeline.compress(
      model,
      batches,
      ratio=config.ratio,
      method=config.method,
      mu=config.mu,
      mu_rule=config.mu_rule,
      auto_mu=auto_mu(config),
      auto_mu_rule=config.auto_mu_rule,
      allocation=config.allocation,
      method_options=method_options(config),
      mode=config.mode,
      include=config.include,
      exclude=config.exclude,
      mesh=mesh,
      checkpoint_dir=progress,
  )  # data fingerprinted by content
  seconds.update(report.pop('seconds'))
  t = time.perf_counter()
  compressed = common.evaluate(model, tokenizer, config.eval, 'compressed')
  seconds['eval_compressed'] = time.perf_counter() - t
  healed = heal_history = None
  if config.heal.enabled:
    t = time.perf_counter()
    heal_history = heal(model, tokenizer, config)
    seconds['heal'] = time.perf_counter() - t
    t = time.perf_counter()
    healed = common.evaluate(model, tokenizer, config.eval, 'healed')
    seconds['eval_healed'] = time.perf_counter() - t
  if config.save:
    t = time.perf_counter()
    checkpoint.save(
        model, os.path.join(workdir, 'model'), base=config.model.to_dict()
    )
    checkpoint.export_factors(
        model,
        os.path.join(workdir, 'factors.safetensors'),
        metadata=dict(config=config.to_dict()),
    )
    seconds['save'] = time.perf_counter() - t
  out = dict(
      method=config.method,
      ratio=config.ratio,
      mode=config.mode,
      allocation=config.allocation,
      mu=config.mu,
      auto_mu=auto_mu(config),
      auto_mu_rule=config.auto_mu_rule,
      method_options=method_options(config),
      calib_mixture=mixture(config.calib) or {config.calib.corpus: 1.0},
      calib_tokens=sum(int(b.size) for b in batches),
      dense=dense,
      compressed=compressed,
      seconds=seconds,
      dense_eval_reused=reused,
      **report,
  )
  if healed is not None:
    out.update(healed=healed, heal=heal_history)
  path = os.path.join(workdir, 'results.json')
  results.write_json(path, out)
  if not config.keep_progress:
    shutil.rmtree(progress, ignore_errors=True)
  out['wall_seconds'] = time.perf_counter() - start
  out['disk_bytes'] = _disk_bytes(workdir)
  results.write_json(path, out)
  common.finish(workdir, summarize(out), plot)


def heal(model, tokenizer, config) -> dict:
  """Trains the compressed model's factors on the calibration stream."""
  h = config.heal
  weights = mixture(config.calib) or {config.calib.corpus: 1.0}
  seqs = healing.training_sequences(
      tokenizer, weights, seq_len=h.seq_len, num_tokens=h.num_tokens
  )

  def eval_fn(m):
    if not h.eval_every_seconds:
      return {}
    ppl = common.evaluate(m, tokenizer, config.eval, 'heal')
    return {f'ppl_{c}': v['perplexity'] for c, v in ppl.items()}

  return healing.heal(
      model,
      seqs,
      seconds=h.seconds,
      steps=h.steps,
      learning_rate=h.learning_rate,
      batch_size=h.batch_size,
      warmup_fraction=h.warmup_fraction,
      eval_fn=eval_fn,
      eval_every_seconds=h.eval_every_seconds or None,
  )


def _dense_eval(model, tokenizer, config, workdir: str):
  """(perplexities, seconds, reused): cached in workdir/dense.json."""
  path = os.path.join(workdir, 'dense.json')
  key = json.loads(
      json.dumps(dict(model=config.model.to_dict(), eval=config.eval.to_dict()))
  )
  if os.path.exists(path):
    cached = results.read_json(path)
    if cached.get('key') == key:
      return cached['dense'], cached['seconds'], True
  t = time.perf_counter()
  dense = common.evaluate(model, tokenizer, config.eval, 'dense')
  seconds = time.perf_counter() - t
  results.write_json(path, dict(key=key, dense=dense, seconds=seconds))
  return dense, seconds, False


def _disk_bytes(directory: str) -> int:
  total = 0
  for root, _, files in os.walk(directory):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def summarize(out: dict) -> str:
  """The run's summary.md: perplexities, ratios, time and disk."""
  rows = [
      dict(
          set=c,
          dense=out['dense'][c]['perplexity'],
          compressed=out['compressed'][c]['perplexity'],
          ratio_to_dense=(
              out['compressed'][c]['perplexity'] / out['dense'][c]['perplexity']
          ),
          tokens=out['compressed'][c]['tokens'],
      )
      for c in out['dense']
  ]
  columns = ['set', 'dense', 'compressed', 'ratio_to_dense', 'tokens']
  if out.get('healed'):
    for row in rows:
      row['healed'] = out['healed'][row['set']]['perplexity']
      row['healed_to_dense'] = row['healed'] / row['dense']
    columns[4:4] = ['healed', 'healed_to_dense']
  layers = out['layers'].values()
  factored = [l for l in layers if l['rank'] is not None]
  flagged = [n for n, l in out['layers'].items() if l.get('insufficient_data')]
  seconds = dict(out['seconds'])
  resumed = sum(bool(l.get('resumed')) for l in layers)
  options = ''.join(
      f', {k} {v}' for k, v in out.get('method_options', {}).items()
  )
  mix = ' + '.join(
      f'{c} {w:g}' for c, w in out.get('calib_mixture', {}).items()
  )
  lines = [
      f"# {out['method']} at kept ratio {out['ratio']} ({out['mode']}, "
      f"{out['allocation']} ranks{options}, {out['calib_tokens']} "
      f"calibration tokens{': ' + mix if mix else ''})",
      '',
      f"Achieved: {out['kept_ratio']:.4f} of the projections' parameters, "
      f"{out['model_ratio']:.4f} of the whole model's. "
      f'{len(factored)} of {len(layers)} layers factored.',
      '',
      results.markdown_table(
          rows,
          columns,
          dict(
              dense='.3f',
              compressed='.3f',
              ratio_to_dense='.2f',
              healed='.3f',
              healed_to_dense='.2f',
          ),
      ),
      'Seconds per phase: '
      + ', '.join(f'{k} {v:.1f}' for k, v in seconds.items())
      + (
          ' (dense evaluation reused from dense.json)'
          if out.get('dense_eval_reused')
          else ''
      )
      + '.',
  ]
  if out.get('heal'):
    h = out['heal']
    lines.append(
        f"Healing: {h['steps']} steps in {h['seconds']:.0f} s of "
        f"training ({h['trainable']:,} factor parameters)."
    )
  if out.get('stats_resumed') or resumed:
    lines.append(
        f"Resumed: {'statistics loaded, ' if out.get('stats_resumed') else ''}"
        f'{resumed} of {len(factored)} layers loaded from progress/; their '
        'phases took longer when first computed.'
    )
  if 'wall_seconds' in out:
    lines.append(
        f"Wall time of this run: {out['wall_seconds']:.0f} s; "
        f"workdir on disk: {out['disk_bytes'] / 2**20:.0f} MiB."
    )
  lines += [
      '',
      "Relative weighted error ||X(K-K')||/||XK|| per layer: median "
      f"{np.median([l['rel_err'] for l in factored]):.4f}, max "
      f"{max(l['rel_err'] for l in factored):.4f}."
      if factored
      else 'No layer factored.',
  ]
  if flagged:
    lines += [
        '',
        f'Insufficient calibration data (numerical rank < rank) '
        f'in {len(flagged)} layers, e.g. {flagged[:3]}.',
    ]
  return '\n'.join(lines) + '\n'


def plot(workdir: str) -> None:
  """From results.json alone: layer_errors.png (per-layer relative error and
  kept fraction of parameters, by projection type) and, after healing,
  heal_curve.png (perplexity / dense against training seconds)."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  by_kind = {}
  for name, layer in out['layers'].items():
    parts = name.split('.')
    block = next((int(p) for p in parts if p.isdigit()), 0)
    d_in, d_out = layer['d_in'], layer['d_out']
    kept = (
        1.0
        if layer['rank'] is None
        else layer['rank'] * (d_in + d_out) / (d_in * d_out)
    )
    by_kind.setdefault(parts[-1], []).append(
        (block, layer.get('rel_err'), kept)
    )
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4))
  for kind, points in sorted(by_kind.items()):
    points.sort()
    errs = [(b, e) for b, e, _ in points if e is not None]
    (line,) = ax.plot(
        [p[0] for p in errs], [p[1] for p in errs], 'o-', ms=3, label=kind
    )
    ax2.plot(
        [p[0] for p in points],
        [p[2] for p in points],
        'o-',
        ms=3,
        color=line.get_color(),
        label=kind,
    )
  ax.set_xlabel('block')
  ax.set_ylabel("||X(K - K')||_F / ||XK||_F (factored layers)")
  ax.set_yscale('log')
  ax.set_title(
      f"{out['method']}, {out['allocation']} ranks, kept ratio {out['ratio']}"
  )
  ax2.set_xlabel('block')
  ax2.set_ylabel('kept fraction of the layer (1 = dense)')
  ax2.set_title('where the parameter budget went')
  ax2.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'layer_errors.png'), dpi=120)
  plt.close(fig)
  if out.get('healed'):
    evals = [e for e in out['heal'].get('eval', []) if len(e) > 2]
    fig, ax = plt.subplots(figsize=(7, 4))
    for corpus, dense in out['dense'].items():
      xs = [0.0] + [e['seconds'] for e in evals] + [out['heal']['seconds']]
      ys = (
          [out['compressed'][corpus]['perplexity']]
          + [e[f'ppl_{corpus}'] for e in evals]
          + [out['healed'][corpus]['perplexity']]
      )
      ax.plot(
          xs, [y / dense['perplexity'] for y in ys], 'o-', ms=3, label=corpus
      )
    ax.axhline(1.5, color='grey', lw=0.8, ls='--', label='1.5× dense')
    ax.set_xlabel('training seconds (factors only)')
    ax.set_ylabel('perplexity / dense')
    ax.set_title(f"healing at kept ratio {out['ratio']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'heal_curve.png'), dpi=120)
    plt.close(fig)
