"""Compress the default model: calibrate, solve, swap, evaluate, save."""
import os
import time

import jax
import matplotlib
import numpy as np

from ctxlr import checkpoint
from ctxlr import pipeline
from ctxlr import results
from experiments import common

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top


def run(config, workdir: str) -> None:
  t = time.perf_counter()
  model, tokenizer = common.load_model(config.model)
  load_seconds = time.perf_counter() - t
  t = time.perf_counter()
  dense = common.evaluate(model, tokenizer, config.eval, 'dense')
  dense_seconds = time.perf_counter() - t
  batches = common.calibration_batches(tokenizer, config.calib)
  mesh = None
  if config.data_parallel and jax.device_count() > 1:
    mesh = jax.make_mesh((jax.device_count(),), ('data',))
  report = pipeline.compress(
      model, batches,
      ratio=config.ratio, method=config.method, mu=config.mu,
      mu_rule=config.mu_rule, auto_mu=config.auto_mu,
      allocation=config.allocation,
      mode=config.mode, include=config.include, exclude=config.exclude,
      mesh=mesh,
      checkpoint_dir=os.path.join(workdir, 'progress'),
      data_id=config.calib.to_dict())
  t = time.perf_counter()
  compressed = common.evaluate(model, tokenizer, config.eval, 'compressed')
  report['seconds'].update(load=load_seconds, eval_dense=dense_seconds,
                           eval_compressed=time.perf_counter() - t)
  out = dict(method=config.method, ratio=config.ratio, mode=config.mode,
             allocation=config.allocation, mu=config.mu,
             calib_tokens=sum(int(b.size) for b in batches), dense=dense,
             compressed=compressed,
             **report)
  results.write_json(os.path.join(workdir, 'results.json'), out)
  if config.save:
    checkpoint.save(model, os.path.join(workdir, 'model'),
                    base=config.model.to_dict())
    checkpoint.export_factors(model, os.path.join(workdir,
                                                  'factors.safetensors'),
                              metadata=dict(config=config.to_dict()))
  common.finish(workdir, summarize(out), plot)


def summarize(out: dict) -> str:
  rows = [dict(set=c, dense=out['dense'][c]['perplexity'],
               compressed=out['compressed'][c]['perplexity'],
               tokens=out['compressed'][c]['tokens'])
          for c in out['dense']]
  layers = out['layers'].values()
  factored = [l for l in layers if l['rank'] is not None]
  flagged = [n for n, l in out['layers'].items()
             if l.get('insufficient_data')]
  lines = [
      f"# {out['method']} at kept ratio {out['ratio']} ({out['mode']}, "
      f"{out['allocation']} ranks, {out['calib_tokens']} calibration tokens)",
      '',
      f"Achieved: {out['kept_ratio']:.4f} of the projections' parameters, "
      f"{out['model_ratio']:.4f} of the whole model's. "
      f'{len(factored)} of {len(layers)} layers factored.',
      '',
      results.markdown_table(rows, ['set', 'dense', 'compressed', 'tokens'],
                             dict(dense='.3f', compressed='.3f')),
      'Seconds per phase: ' + ', '.join(
          f'{k} {v:.1f}' for k, v in out['seconds'].items()),
      '',
      'Relative weighted error ||X(K-K\')||/||XK|| per layer: median '
      f"{np.median([l['rel_err'] for l in factored]):.4f}, max "
      f"{max(l['rel_err'] for l in factored):.4f}."
      if factored else 'No layer factored.',
  ]
  if flagged:
    lines += ['', f'Insufficient calibration data (numerical rank < rank) '
              f'in {len(flagged)} layers, e.g. {flagged[:3]}.']
  return '\n'.join(lines) + '\n'


def plot(workdir: str) -> None:
  """Per-layer relative error by projection type, from results.json alone."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  by_kind = {}
  for name, layer in out['layers'].items():
    if layer['rank'] is None:
      continue
    parts = name.split('.')
    by_kind.setdefault(parts[-1], []).append((int(parts[1]),
                                              layer['rel_err']))
  fig, ax = plt.subplots(figsize=(7, 4))
  for kind, points in sorted(by_kind.items()):
    points.sort()
    ax.plot([p[0] for p in points], [p[1] for p in points], 'o-', ms=3,
            label=kind)
  ax.set_xlabel('block')
  ax.set_ylabel("||X(K - K')||_F / ||XK||_F")
  ax.set_yscale('log')
  ax.set_title(f"{out['method']}, kept ratio {out['ratio']}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'layer_errors.png'), dpi=120)
  plt.close(fig)
