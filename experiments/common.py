"""What the experiments share: a library, not an experiment.

* config checks for `validate(config)` (cheap: no model, no data), raising
  `ValueError('<field path>: expected …, got …')`;
* method variants: the one way a config names a method with its options,
  `config.runs = {label: dict(method=…, allocation=…, mu=…, …)}`;
* the model, its data and evaluation (`load_model`, `calibration_batches`,
  `evaluate`, `make_eval_fn`) and the row of a compression sweep;
* training runs that resume from their checkpoint (`make_tx`, `train_run`,
  `keep_run`);
* the resume/finish tail (`read_results`, `resume_sweep`, `finish`) and
  figures (`subplots`, `save_figure`, `legend_outside`, `relative_panel`,
  `relative_figure`).

Scoring against the float64 optimum is in experiments/scoring.py, timing in
experiments/timing.py. No experiment imports another.
"""

import json
import math
import os
import shutil
import textwrap
import time
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

from flax import nnx
import jax.numpy as jnp
import matplotlib
import numpy as np

from ctxlr import calibration
from ctxlr import data
from ctxlr import evaluation
from ctxlr import models
from ctxlr import pipeline
from ctxlr import registry
from ctxlr import results
from ctxlr import sensitivity as sensitivity_lib
from ctxlr import stats as stats_lib
from ctxlr import surgery
from ctxlr import training

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
from matplotlib import transforms  # pylint: disable=g-import-not-at-top

# ------------------------------------------------------------ config checks --


def fail(path: str, expected: str, got: Any) -> NoReturn:
  """Raises `ValueError('<path>: expected <expected>, got <got!r>.')`."""
  raise ValueError(f'{path}: expected {expected}, got {got!r}.')


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and (
      not isinstance(value, bool)
  )


def check_int(value: Any, path: str, *, minimum: int = 1) -> None:
  """An integer >= `minimum`."""
  if not _is_int(value) or value < minimum:
    fail(path, f'an integer >= {minimum}', value)


def check_number(
    value: Any,
    path: str,
    *,
    minimum: float | None = None,
    positive: bool = False,
    maximum: float | None = None,
) -> None:
  """A finite number, optionally > 0, >= `minimum`, <= `maximum`."""
  ok = _is_number(value) and math.isfinite(value)
  ok = ok and not (positive and value <= 0)
  ok = ok and not (minimum is not None and value < minimum)
  ok = ok and not (maximum is not None and value > maximum)
  if not ok:
    bounds = [
        b
        for b in (
            '> 0' if positive else '',
            f'>= {minimum:g}' if minimum is not None else '',
            f'<= {maximum:g}' if maximum is not None else '',
        )
        if b
    ]
    fail(
        path,
        'a finite number' + (' ' + ' and '.join(bounds) if bounds else ''),
        value,
    )


def check_choice(value: Any, choices: Sequence[Any], path: str) -> None:
  """One of `choices`."""
  if not isinstance(value, type(choices[0])) or value not in choices:
    fail(path, f'one of {tuple(choices)}', value)


def check_names(
    value: Any,
    path: str,
    *,
    choices: Sequence[str] | None = None,
    allow_empty: bool = False,
) -> None:
  """A tuple/list of strings (not one string), each one of `choices`."""
  if (
      isinstance(value, str)
      or not isinstance(value, (tuple, list))
      or (not all(isinstance(v, str) for v in value))
  ):
    fail(path, 'a tuple of strings', value)
  if not value and not allow_empty:
    fail(path, 'at least one entry', value)
  for i, v in enumerate(value):
    if choices is not None and v not in choices:
      fail(f'{path}[{i}]', f'one of {tuple(choices)}', v)


def check_numbers(value: Any, path: str, **bounds) -> None:
  """A non-empty tuple/list of numbers, each as `check_number(**bounds)`."""
  if not isinstance(value, (tuple, list)) or not value:
    fail(path, 'a non-empty tuple of numbers', value)
  for i, v in enumerate(value):
    check_number(v, f'{path}[{i}]', **bounds)


def check_ints(
    value: Any, path: str, *, minimum: int = 1, maximum: int | None = None
) -> None:
  """A non-empty tuple/list of integers in [minimum, maximum]."""
  if not isinstance(value, (tuple, list)) or not value:
    fail(path, 'a non-empty tuple of integers', value)
  for i, v in enumerate(value):
    check_int(v, f'{path}[{i}]', minimum=minimum)
    if maximum is not None and v > maximum:
      fail(f'{path}[{i}]', f'an integer <= {maximum}', v)


def check_ratio(value: Any, path: str = 'ratio') -> None:
  """A kept parameter ratio in (0, 1]."""
  if not _is_number(value) or not 0 < value <= 1:
    fail(path, 'a kept ratio in (0, 1]', value)


def check_parts(parts: Any, known: Sequence[str], path: str = 'parts') -> None:
  """A non-empty tuple of the experiment's part names."""
  check_names(parts, path, choices=known)


def check_methods(
    methods: Any, path: str = 'methods', *, float64: bool | None = None
) -> None:
  """A non-empty tuple of registered method names (`ctxlr.registry`);
  `float64=False`: not the float64 references (for float32 statistics)."""
  check_names(methods, path, choices=registry.names(float64=float64))


def check_model_spec(spec: Any, path: str = 'model') -> None:
  """`model`: path ('' = the bundled model, else an existing file or
  directory), param_dtype, and num_layers (0 = all) where present."""
  model_path = spec.get('path')
  if model_path is not None and not isinstance(model_path, str):
    fail(f'{path}.path', "'' (the bundled model) or a path", model_path)
  if model_path and not os.path.exists(model_path):
    fail(
        f'{path}.path', 'an existing .gguf file or model directory', model_path
    )
  check_choice(
      spec.get('param_dtype'), ('float32', 'bfloat16'), f'{path}.param_dtype'
  )
  if 'num_layers' in spec:
    check_int(spec['num_layers'], f'{path}.num_layers', minimum=0)


def check_data_spec(spec: Any, path: str) -> None:
  """A data spec (`calib` or `eval`): corpus or corpora, seq_len,
  batch_size and, where present, num_tokens (>= seq_len)."""
  if 'corpora' in spec:
    check_names(spec['corpora'], f'{path}.corpora')
  mixed = bool(spec.get('mixture'))
  if mixed and spec.get('corpus'):
    fail(
        f'{path}.corpus',
        f"'' when {path}.mixture is set (calibrate on one corpus with "
        f"{path}.mixture='' and {path}.corpus=…, or list it in the mixture "
        "as 'corpus:1')",
        spec['corpus'],
    )
  if 'corpus' in spec and not mixed and not spec['corpus']:
    fail(f'{path}.corpus', f'a corpus (or a {path}.mixture)', spec['corpus'])
  named = (
      [(f'{path}.corpus', spec['corpus'])]
      if 'corpus' in spec and not mixed
      else []
  ) + [
      (f'{path}.corpora[{i}]', c) for i, c in enumerate(spec.get('corpora', ()))
  ]
  for where, corpus in named:
    if not data.is_files(corpus):
      check_choice(corpus, data.CORPORA, where)
    elif not corpus[len(data.FILES) :]:
      fail(where, "'files:<path or glob>'", corpus)
  if 'field' in spec and (
      not isinstance(spec['field'], str) or not spec['field']
  ):
    fail(f'{path}.field', 'a non-empty JSON field name', spec['field'])
  if 'corpus' not in spec and 'corpora' not in spec:
    fail(path, 'a field corpus or corpora', sorted(spec.keys()))
  for field in ('seq_len', 'batch_size'):
    check_int(spec[field] if field in spec else None, f'{path}.{field}')
  if 'num_tokens' in spec:
    check_int(spec['num_tokens'], f'{path}.num_tokens', minimum=spec['seq_len'])
  if spec.get('mixture'):
    if not isinstance(spec['mixture'], str):
      fail(f'{path}.mixture', "'corpus:weight,…'", spec['mixture'])
    calib_mixture(spec)


def check_model_and_data(config: Any) -> None:
  """`model`, `calib` and `eval` of a model experiment."""
  check_model_spec(config.model)
  check_data_spec(config.calib, 'calib')
  check_data_spec(config.eval, 'eval')


def check_train_spec(train: Any, path: str = 'train') -> None:
  """A training spec: steps, batch_size, learning_rate, warmup_steps,
  clip_norm, weight_decay, eval_every, checkpoint_every."""
  for field in ('steps', 'batch_size', 'eval_every', 'checkpoint_every'):
    check_int(train[field], f'{path}.{field}')
  check_int(train['warmup_steps'], f'{path}.warmup_steps', minimum=0)
  check_number(train['learning_rate'], f'{path}.learning_rate', positive=True)
  check_number(train['clip_norm'], f'{path}.clip_norm', positive=True)
  check_number(train['weight_decay'], f'{path}.weight_decay', minimum=0)


def check_layers(include: Any, exclude: Any, path: str = '') -> None:
  """`include` / `exclude`: tuples of fnmatch patterns (include non-empty)."""
  check_names(include, f'{path}include')
  check_names(exclude, f'{path}exclude', allow_empty=True)


# ----------------------------------------------------------------- variants --

VARIANT_KEYS = (
    'method',
    'allocation',
    'mu',
    'mu_rule',
    'auto_mu',
    'split',
    'options',
    'mode',
)
VARIANT_DEFAULTS = dict(
    allocation='uniform',
    mu=0.0,
    mu_rule='energy',
    auto_mu=0.0,
    split='own',
    options={},
    mode='one_shot',
)
_CHOICES = dict(
    allocation=pipeline.ALLOCATIONS,
    mu_rule=pipeline.MU_RULES,
    split=('own', 'balanced'),
    mode=pipeline.MODES,
)
COMPRESS_KEYS = ('method', 'allocation', 'mu', 'mu_rule', 'auto_mu')
# Variant keys a sweep may add to COMPRESS_KEYS: the method's own options
# (`registry.Method.options`, e.g. coala's power) and the calibration mode.
SWEEP_KEYS = COMPRESS_KEYS + ('options', 'mode')


def check_variants(
    runs: Any,
    *,
    keys: Sequence[str] = COMPRESS_KEYS,
    methods: Sequence[str] | None = None,
    path: str = 'runs',
) -> dict[str, dict[str, Any]]:
  """Parses `config.runs`, {label: variant}, into {label: full variant}.

  A variant is a dict of `keys` (a subset of `VARIANT_KEYS`): `method` (a
  registered method, or one of `methods` if given) and the options of
  `VARIANT_DEFAULTS`, which fill what it leaves out. Labels are opaque names
  for tables and figures, kept in the config's order:

      runs = dict(coala=dict(method='coala'),
                  coala_global=dict(method='coala', allocation='global'),
                  coala_mu_0p0001=dict(method='coala', mu=1e-4))

  Raises:
    ValueError: '<path>.<label>.<key>: expected …, got …' for an unknown key,
      an unknown method, a bad option, or mu / auto_mu > 0 for a method
      without a ridge term (`registry.Method.takes_mu`).
  """
  if not hasattr(runs, 'keys') or not list(runs.keys()):
    fail(path, 'a non-empty dict {label: dict(method=..., ...)}', runs)
  unknown = set(keys) - set(VARIANT_KEYS)
  if unknown:
    raise ValueError(
        f'keys must be a subset of {VARIANT_KEYS}; got ' f'{sorted(unknown)}.'
    )
  out = {}
  for label in runs.keys():
    variant, where = runs[label], f'{path}.{label}'
    if not isinstance(label, str) or not label.isidentifier():
      fail(
          where,
          'a label that is a Python identifier (letters, digits, _; '
          'so that --config.runs.<label>.<key>=… can override it)',
          label,
      )
    if not hasattr(variant, 'keys'):
      fail(where, 'a dict(method=..., ...)', variant)
    for key in variant.keys():
      if key not in keys:
        fail(f'{where}.{key}', f'one of the keys {tuple(keys)}', key)
    if 'method' not in variant:
      fail(f'{where}.method', 'a method name', None)
    full = {
        k: variant[k] if k in variant else VARIANT_DEFAULTS[k] for k in keys
    }
    _check_variant(full, where, methods)
    out[label] = full
  return out


def _check_variant(
    variant: dict[str, Any], where: str, methods: Sequence[str] | None
) -> None:
  method = variant['method']
  if methods is not None:
    check_choice(method, tuple(methods), f'{where}.method')
  elif not isinstance(method, str) or method not in registry.names():
    fail(f'{where}.method', f'one of {registry.names()}', method)
  for key, choices in _CHOICES.items():
    if key in variant:
      check_choice(variant[key], choices, f'{where}.{key}')
  for key in ('mu', 'auto_mu'):
    if key not in variant:
      continue
    check_number(variant[key], f'{where}.{key}', minimum=0)
    if (
        variant[key] > 0
        and methods is None
        and (not registry.get(method).takes_mu)
    ):
      fail(
          f'{where}.{key}',
          f'0: {method!r} has no ridge term (methods '
          f'with one: {registry.names(takes_mu=True)})',
          variant[key],
      )
  if 'options' in variant:
    options = variant['options']
    if not hasattr(options, 'keys'):
      fail(f'{where}.options', 'a dict of method options', options)
    try:
      registry.check_options(method, dict(options.items()))
    except ValueError as e:
      raise ValueError(f'{where}.options: {e}') from None


def compress_options(variant: Mapping[str, Any]) -> dict[str, Any]:
  """The `pipeline.compress_from_stats` keywords of a parsed variant
  (`options` becomes `method_options`; `mode` is the caller's)."""
  out = {k: variant[k] for k in COMPRESS_KEYS if k in variant}
  if variant.get('options'):
    out['method_options'] = dict(variant['options'].items())
  return out


def calib_mixture(calib: Any) -> dict[str, float] | None:
  """`calib.mixture` ('corpus:weight,…') as {corpus: weight}, or None.

  An empty or absent field calibrates on `calib.corpus` alone. A weight is
  the last ':'-separated field, so 'files:/data/*.jsonl:1' works. Raises
  ValueError('calib.mixture: …') for a malformed item, a repeated corpus,
  an unknown corpus or a weight that is not a finite number > 0.
  """
  spec = calib.get('mixture', '') or ''
  if not spec.strip():
    return None
  out = {}
  for item in spec.split(','):
    corpus, sep, weight = item.strip().rpartition(':')
    try:
      value = float(weight)
    except ValueError:
      value = None
    if not sep or not corpus or value is None:
      raise ValueError(
          "calib.mixture: expected 'corpus:weight,…' (e.g. "
          f"'wikipedia:1,sotu:1'); got the item {item!r}."
      )
    if corpus in out:
      raise ValueError(f'calib.mixture: corpus {corpus!r} appears twice.')
    out[corpus] = value
  try:
    data.mixture_counts(
        out, max(len(out), calib.get('num_tokens', 0) // calib.seq_len)
    )
  except ValueError as e:
    raise ValueError(f'calib.mixture: {e}') from None
  return out


def layer_stats(
    model, batches, config: Any, methods: Iterable[str], **kwargs
) -> dict[str, stats_lib.LayerStats]:
  """{layer: LayerStats} of the layers `config.include` / `config.exclude`
  select, with what every one of `methods` needs, from one pass over
  `batches` (`calibration.layer_stats`; kwargs: e.g. dtype)."""
  layers = surgery.select_linears(model, config.include, config.exclude)
  return calibration.layer_stats(
      model, batches, layers, want=want(methods), **kwargs
  )


def want(methods: Iterable[str]) -> stats_lib.Want:
  """The statistics that serve every one of `methods` (one calibration)."""
  wants = [registry.get(m).want for m in methods]
  return stats_lib.Want(
      gram=any(w.gram for w in wants), abs_sum=any(w.abs_sum for w in wants)
  )


# ---------------------------------------------------- model, data, sweeps --


def load_model(model_config) -> tuple[nnx.Module, Any]:
  """(model, tokenizer) from `config.model`: path ('' = bundled SmolLM2),
  param_dtype, and, if present and > 0, num_layers (the first blocks only).
  """
  dtype = jnp.dtype(model_config.param_dtype)
  model, tokenizer = models.load_llama(
      model_config.path or None, param_dtype=dtype
  )
  if model_config.get('num_layers'):
    model.layers = nnx.List(list(model.layers)[: model_config.num_layers])
  return model, tokenizer


def token_sequences(corpus: str, split: str, tokenizer, spec) -> np.ndarray:
  """int32[num_tokens // seq_len, seq_len] from a corpus split."""
  n = max(1, spec.num_tokens // spec.seq_len)
  return data.sequences(
      corpus,
      split,
      tokenizer,
      seq_len=spec.seq_len,
      num_sequences=n,
      field=spec.get('field', 'text'),
  )


def calibration_batches(tokenizer, calib_config) -> list:
  """The calibration batches of `config.calib` (corpus, num_tokens, ...;
  a non-empty `mixture` draws them from several corpora, `calib_mixture`)."""
  weights = calib_mixture(calib_config)
  if weights is None:
    seqs = token_sequences(
        calib_config.corpus, 'calib', tokenizer, calib_config
    )
  else:
    seqs = data.mixture_sequences(
        weights,
        'calib',
        tokenizer,
        seq_len=calib_config.seq_len,
        num_sequences=max(1, calib_config.num_tokens // calib_config.seq_len),
    )
  return list(data.batches(seqs, min(calib_config.batch_size, len(seqs))))


def evaluate(model, tokenizer, eval_config, label: str) -> dict[str, dict]:
  """Perplexity on the held-out split of every corpus in `eval_config`."""
  out = {}
  for corpus in eval_config.corpora:
    seqs = token_sequences(corpus, 'eval', tokenizer, eval_config)
    p = evaluation.perplexity(
        model, seqs, batch_size=eval_config.batch_size, desc=f'{label} {corpus}'
    )
    out[corpus] = dict(
        perplexity=p.perplexity,
        tokens=p.num_tokens,
        tokens_per_second=p.tokens_per_second,
    )
  return out


def make_eval_fn(tokenizer, eval_config) -> Callable[[Any], dict]:
  """`model -> {ppl_<corpus>: perplexity}` on each corpus's eval split
  (the sequences are read once; no progress bar: for training loops)."""
  sets = {
      c: token_sequences(c, 'eval', tokenizer, eval_config)
      for c in eval_config.corpora
  }
  return perplexity_fn(sets, eval_config.batch_size)


def perplexity_fn(sets: dict, batch_size: int) -> Callable[[Any], dict]:
  """`model -> {ppl_<corpus>: perplexity}` on `sets` ({corpus: sequences})."""

  def eval_fn(model):
    return {
        f'ppl_{c}': evaluation.perplexity(
            model, s, batch_size=batch_size, progress=False
        ).perplexity
        for c, s in sets.items()
    }

  return eval_fn


def sweep_row(
    label: str,
    variant: Mapping[str, Any],
    ratio: float,
    report: dict,
    ppl: dict,
) -> dict[str, Any]:
  """One row of a compression sweep: the variant, the report's counts, the
  perplexity per corpus (`ppl_<corpus>`)."""
  layers = [l for l in report['layers'].values() if l['rank'] is not None]
  return dict(
      run=label,
      **compress_options(variant),
      **({'mode': variant['mode']} if 'mode' in variant else {}),
      ratio=ratio,
      kept_ratio=report['kept_ratio'],
      model_ratio=report['model_ratio'],
      solve_seconds=report['seconds']['solve'],
      **{f'ppl_{c}': v['perplexity'] for c, v in ppl.items()},
      failed_layers=sum(bool(l['failed']) for l in layers),
      retried_layers=sum(l['retries'] > 0 for l in layers),
      nonfinite_layers=sum(bool(l['nonfinite']) for l in layers),
      insufficient_layers=sum(bool(l.get('insufficient_data')) for l in layers),
      max_rel_err=max((l['rel_err'] for l in layers), default=0.0),
  )


# ----------------------------------------------------------------- training --


def make_tx(train: Any):
  """The optax optimizer of a `train` spec (`training.make_tx`)."""
  return training.make_tx(
      learning_rate=train['learning_rate'],
      steps=train['steps'],
      warmup_steps=train['warmup_steps'],
      clip_norm=train['clip_norm'],
      weight_decay=train['weight_decay'],
  )


def train_run(
    model,
    seqs,
    *,
    wrt,
    tx,
    train: Any,
    eval_fn,
    workdir: str,
    name: str,
    **kwargs,
) -> tuple[dict, str]:
  """(history, checkpoint dir): `training.train` under a `train` spec,
  checkpointed in workdir/checkpoints/<name> (a killed run resumes from
  it); pass the directory to `keep_run` once the run is recorded."""
  ckpt = os.path.join(workdir, 'checkpoints', name)
  history = training.train(
      model,
      seqs,
      wrt=wrt,
      tx=tx,
      steps=train['steps'],
      batch_size=train['batch_size'],
      eval_fn=eval_fn,
      eval_every=train['eval_every'],
      checkpoint_dir=ckpt,
      checkpoint_every=train['checkpoint_every'],
      **kwargs,
  )
  return history, ckpt


def keep_run(workdir: str, out: dict, run: dict, ckpt: str) -> None:
  """Appends a finished run to out['runs'], writes results.json, then
  removes its checkpoint (in this order: a kill leaves one or the other)."""
  out['runs'].append(run)
  write_results(workdir, out)
  shutil.rmtree(ckpt, ignore_errors=True)


# ------------------------------------------- statistics on disk, memory --


def save_stats(path: str, stats: dict[str, stats_lib.LayerStats]) -> None:
  """Writes {layer: LayerStats} to one .npz atomically (shared objects
  stored once, `load_stats` restores the sharing)."""
  groups, of = {}, {}
  for name, s in stats.items():
    of[name] = groups.setdefault(id(s), (len(groups), s))[0]
  arrays = {}
  for index, s in groups.values():
    for field in ('r', 'gram', 'abs_sum'):
      value = getattr(s, field)
      if value is not None:
        arrays[f'{index}.{field}'] = np.asarray(value)
    arrays[f'{index}.count'] = np.asarray(s.count)
  arrays['layers'] = np.asarray(json.dumps(of))
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_stats(path: str) -> dict[str, stats_lib.LayerStats]:
  """The {layer: LayerStats} of `save_stats` (layers that shared one object
  share one again)."""
  with np.load(path) as f:
    of = json.loads(str(f['layers']))
    built = {}
    for index in set(of.values()):
      get = (
          lambda k: jnp.asarray(f[f'{index}.{k}'])
          if (f'{index}.{k}' in f)
          else None
      )
      built[index] = stats_lib.LayerStats(
          r=get('r'),
          gram=get('gram'),
          abs_sum=get('abs_sum'),
          count=int(f[f'{index}.count']),
      )
  return {n: built[i] for n, i in of.items()}


def reset_peak_rss() -> None:
  """Resets the process's peak RSS (Linux `clear_refs` 5), if allowed."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass


def peak_rss() -> int | None:
  """Peak resident set size since the last reset (VmHWM), in bytes."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def stacked_bytes(model, names, tokens: int) -> int:
  """float32 bytes of every distinct layer input stacked over `tokens`."""
  d_in = {}
  for name in names:
    block = name.rsplit('.', 1)[0]
    kernel = surgery.kernel_matrix(model, name)
    group = (
        block,
        name.split('.')[-1] in ('q_proj', 'k_proj', 'v_proj'),
        name.split('.')[-1] in ('gate_proj', 'up_proj'),
    )
    d_in[group if any(group[1:]) else name] = kernel.shape[0]
  return 4 * tokens * sum(d_in.values())


def stats_bytes(stats) -> int:
  """Bytes of the distinct statistics arrays held by {layer: LayerStats}."""
  seen, total = set(), 0
  for s in stats.values():
    if id(s) in seen:
      continue
    seen.add(id(s))
    total += sum(
        int(np.asarray(a).nbytes)
        for a in (s.r, s.gram, s.abs_sum)
        if a is not None
    )
  return total


# ------------------------------------------------------ resume and finish --


def read_results(workdir: str, default: Any) -> Any:
  """workdir/results.json if a run left one (to resume from), else
  `default`."""
  path = os.path.join(workdir, 'results.json')
  return results.read_json(path) if os.path.exists(path) else default


def write_results(workdir: str, out: Any) -> None:
  """workdir/results.json, atomically (a killed run keeps the last one)."""
  results.write_json(os.path.join(workdir, 'results.json'), out)


def resume_sweep(workdir: str, config) -> tuple[dict, Any, Any]:
  """(results so far, model, tokenizer) for a sweep that keeps its rows.

  `results.json` in `workdir` holds `dense` perplexities and finished `rows`;
  a rerun continues from them (the dense evaluation is done once).
  """
  out = read_results(workdir, dict(rows=[]))
  model, tokenizer = load_model(config.model)
  if 'dense' not in out:
    out['dense'] = {
        c: v['perplexity']
        for c, v in evaluate(model, tokenizer, config.eval, 'dense').items()
    }
    write_results(workdir, out)
  return out, model, tokenizer


def finish(
    workdir: str,
    summary: str,
    plot: Callable[[str], None] | None,
    *,
    out: Any = None,
) -> None:
  """The tail of every run: results.json (if `out` is given), summary.md,
  the figures drawn from results.json by `plot(workdir)` (if any), the
  summary printed."""
  if out is not None:
    write_results(workdir, out)
  results.write_text(os.path.join(workdir, 'summary.md'), summary)
  if plot is not None:
    plot(workdir)
  print(summary)


def cached_sensitivity(
    model, batches, layers, path: str, key: Mapping[str, Any]
) -> dict:
  """Loss-gradient energies of `layers` over `batches`
  (`sensitivity.output_gradient_energy`), kept in `path` with `key` (what
  they were measured on, JSON-able) and its measuring seconds; a later call
  with the same key reads them instead of measuring again."""
  key = json.loads(json.dumps(key))  # as it reads back
  if os.path.exists(path):
    cached = results.read_json(path)
    if cached.get('key') == key:
      return sensitivity_lib.from_json(cached['energy'])
  t = time.perf_counter()
  energy = sensitivity_lib.output_gradient_energy(model, batches, layers)
  results.write_json(
      path,
      dict(
          key=key,
          seconds=time.perf_counter() - t,
          energy=sensitivity_lib.to_json(energy),
      ),
  )
  return energy


def fmt_ppl(value: float) -> str:
  """Perplexity as the tables print it: 4 digits, thousands separated."""
  if value != value:  # NaN: non-finite factors
    return 'NaN'
  if value >= 1e5:
    return f'{value:.3g}'
  return f'{value:,.0f}' if value >= 1000 else f'{value:.4g}'


# ------------------------------------------------------------------ figures --


def subplots(rows: int, cols: int, **kwargs):
  """`pyplot.subplots(rows, cols, squeeze=False, **kwargs)` on the Agg
  backend: (figure, 2-D array of axes)."""
  return plt.subplots(rows, cols, squeeze=False, **kwargs)


def save_figure(fig, workdir: str, name: str, *, dpi: int = 120) -> None:
  """Lays out, writes workdir/name and closes `fig`."""
  if not fig.legends:  # legend_outside has laid it out
    fig.tight_layout()
  # Captions kept out of the layout (`relative_panel`) still count here.
  extra = [t for ax in fig.axes for t in ax.texts] + list(fig.legends)
  fig.savefig(
      os.path.join(workdir, name),
      dpi=dpi,
      bbox_inches='tight',
      bbox_extra_artists=extra,
  )
  plt.close(fig)


def legend_outside(fig, axes, **kwargs) -> None:
  """One legend for all `axes`, right of the panels (never over data)."""
  handles = {}
  for ax in np.ravel(axes):
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  fig.tight_layout()
  fig.legend(
      list(handles.values()),
      list(handles),
      loc='center left',
      bbox_to_anchor=(1.0, 0.5),
      fontsize=kwargs.pop('fontsize', 8),
      frameon=False,
      **kwargs,
  )


def relative_figure(
    out: dict, *, x: str, label: Callable[[dict], str], xlabel: str
):
  """(figure, axes): one `relative_panel` per corpus of a sweep's results.

  `out` holds `dense` ({corpus: perplexity}) and `rows` with `ppl_<corpus>`;
  `x` is the row field on the x axis, `label(row)` the run a row belongs
  to (the legend, outside the panels, lists the runs in order).
  """
  corpora = list(out['dense'])
  labels = list(dict.fromkeys(label(r) for r in out['rows']))
  fig, axes = subplots(1, len(corpora), figsize=(5 * len(corpora), 4))
  for ax, corpus in zip(axes[0], corpora):
    dense = out['dense'][corpus]
    relative_panel(
        ax,
        {
            name: [
                (r[x], r[f'ppl_{corpus}'] / dense)
                for r in out['rows']
                if label(r) == name
            ]
            for name in labels
        },
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel('perplexity / dense perplexity')
    ax.set_title(f'held-out {corpus} (dense {dense:.2f})')
    ax.grid(True, which='major', alpha=0.3)
  legend_outside(fig, axes)
  return fig, axes


def log_axis(ax) -> None:
  """A log y axis ticked at 1, 2, 5 × 10^k, labelled as plain numbers."""
  ax.set_yscale('log')
  ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _times(value: float) -> str:
  """1.3e5×, 42×: a factor for a caption."""
  if value < 1000:
    return f'{value:.3g}×'
  mantissa, exponent = f'{value:.1e}'.split('e')
  return f'{mantissa}e{int(exponent)}×'


def _span(values: list[float]) -> str:
  lo, hi = min(values), max(values)
  return _times(lo) if lo == hi else f'{_times(lo)[:-1]}–{_times(hi)}'


MARKERS = ('o', 's', 'D', 'v', 'P', 'X', '<', '>', 'h', '*')


def relative_panel(
    ax,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    competitive: float = 20.0,
) -> dict[str, str]:
  """Perplexity relative to dense, on a log axis fitted to the close runs.

  The axis spans only the points within `competitive` times the best run at
  their x, so a run a thousand times worse cannot squash the others. A
  point above the axis is drawn as ▲ at its upper edge (× for NaN: the run
  produced non-finite factors), and a caption under the panel names those
  runs and how far off they are.

  Args:
    ax: the panel.
    series: {label: [(x, perplexity / dense perplexity)]}; colours follow
      the order of the labels (the same order gives the same colours in
      every panel).
    competitive: see above.

  Returns:
    {label: 'how far off'} for the runs with points off the scale.
  """
  xs = sorted({x for points in series.values() for x, _ in points})
  best = {
      x: min(
          (
              y
              for points in series.values()
              for px, y in points
              if px == x and np.isfinite(y)
          ),
          default=np.nan,
      )
      for x in xs
  }
  shown = [
      y
      for points in series.values()
      for x, y in points
      if np.isfinite(y) and y <= competitive * best[x]
  ]
  if not shown:
    return {}
  low, high = min(shown) / 1.15, max(shown) * 1.15
  log_axis(ax)
  ax.set_ylim(low, high)
  edge = high / 1.08  # just inside the top of the axis
  notes, shift = {}, 0
  for i, (label, points) in enumerate(series.items()):
    points = sorted(points)
    color = plt.cm.tab20(i % 20) if len(series) > 10 else f'C{i % 10}'
    on = [y if np.isfinite(y) and y <= high else np.nan for _, y in points]
    # Hollow markers of different shapes: runs that coincide stay visible.
    ax.plot(
        [x for x, _ in points],
        on,
        '-',
        marker=MARKERS[i % len(MARKERS)],
        ms=5,
        mfc='none',
        color=color,
        alpha=0.85,
        label=label,
    )
    above = [x for x, y in points if np.isfinite(y) and y > high]
    broken = [x for x, y in points if not np.isfinite(y)]
    if not above and not broken:
      continue
    # Runs off the scale at the same x are set side by side, 7 points apart.
    offset = transforms.offset_copy(
        ax.transData, fig=ax.figure, x=7 * shift, units='points'
    )
    shift = -shift if shift > 0 else 1 - shift
    for xs_off, marker in ((above, '^'), (broken, 'x')):
      if xs_off:
        ax.plot(
            xs_off,
            [edge] * len(xs_off),
            marker,
            ms=7,
            mew=2,
            color=color,
            transform=offset,
            clip_on=False,
        )
    notes[label] = ', '.join(
        (
            [_span([y for _, y in points if np.isfinite(y) and y > high])]
            if above
            else []
        )
        + (['NaN'] if broken else [])
    )
  if notes:  # under the panel, outside the data
    nan = ' (× NaN)' if any('NaN' in n for n in notes.values()) else ''
    caption = textwrap.fill(
        f'▲ above the scale{nan}: '
        + '; '.join(f'{label} {note}' for label, note in notes.items()),
        60,
    )
    ax.text(
        0, -0.16, caption, transform=ax.transAxes, va='top', fontsize=7
    ).set_in_layout(False)
  return notes
