r"""Nearly singular activations: every method against the float64 optimum.

Config and run commands: experiments/configs/stability.py. Three parts, each
a list of rows (one per method and rank) in results.json:

* `synthetic`: X (n × d) with exactly the singular values asked for
  (log-spaced 1 … 1/cond over the min(n, d) non-zero ones; or, for the
  rank-deficient case, cond 1e2 over the first `rank_deficient · d` and exact
  zeros after), built in float64 and cast to float32; K Gaussian d × d.
* `real_layer`: the inputs of one projection of the default model (the
  paper's Figure 1 uses an early attention projection), ranks up to
  min(d_in, d_out).
* `real_all`: every selected projection at the uniform-ratio rank
  (`solvers.rank_for_ratio`) and at `high_fractions · min(d_in, d_out)`.

What every method sees, the float64 reference and the row fields:
experiments/scoring.py. The kernel is float32, or bf16 for 'coala_bf16'
(coala on `K.astype(bf16)`, scored against that bf16 kernel). cond(X) (=
cond(R)) is computed from the singular values of the float64 R. Real
activations are captured from the model in float32 (the model's own dtype)
with taps on the selected layers; layers fed the same array (q/k/v,
gate/up) share one X.

One solve per method serves all ranks when truncation is the method's last
step (`scoring.PREFIX_METHODS`); `nonfinite` is re-evaluated on each prefix.
"""

import json
from typing import Any, Iterable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ctxlr import calibration
from ctxlr import reference
from ctxlr import registry
from ctxlr import results
from ctxlr import stats as stats_lib
from ctxlr import surgery
from ctxlr.linalg import solvers
from experiments import common
from experiments import scoring

PARTS = ('synthetic', 'real_layer', 'real_all')
BF16 = 'coala_bf16'


# ---------------------------------------------------------------- scoring ---


def gram_methods() -> list[str]:
  """The methods that read the Gram XᵀX (they retry, jitter, damp)."""
  return registry.names(needs='gram')


def score(
    w: np.ndarray,
    kernel: np.ndarray,
    stats: stats_lib.LayerStats,
    methods: Iterable[str],
    ranks: Iterable[int],
    **fields,
) -> list[dict]:
  """`scoring.score` of `methods`; 'coala_bf16' is coala on the bf16 K."""
  methods = list(methods)
  rows = scoring.score(
      w, kernel, stats, [m for m in methods if m != BF16], ranks, **fields
  )
  if BF16 in methods:
    rows += [
        dict(r, method=BF16)
        for r in scoring.score(
            w, kernel, stats, ['coala'], ranks, storage=jnp.bfloat16, **fields
        )
    ]
  return rows


def singular_values(w: np.ndarray) -> np.ndarray:
  """σ(W) in float64, padded with zeros to d_in values."""
  s = np.linalg.svd(w, compute_uv=False)
  return np.pad(s, (0, w.shape[1] - len(s)))


def _cond(s: np.ndarray) -> float:
  return float(s[0] / s[-1]) if s[-1] > 0 else float('inf')


# -------------------------------------------------------------- synthetic ---


def synthetic_x(
    rng: np.random.Generator, n: int, d: int, cond: float, rank: int
) -> np.ndarray:
  """float64[n, d] with exactly `rank` non-zero σ, log-spaced 1 … 1/cond."""
  k = min(n, d)
  sigma = np.zeros(k)
  sigma[:rank] = np.logspace(0, -np.log10(cond), rank)
  if n >= d:
    return reference.matrix_with_singular_values(rng, n, sigma)
  return reference.matrix_with_singular_values(rng, d, sigma).T  # [n, d]


def synthetic_cases(cfg) -> list[dict]:
  """(d, n, cond, rank of X, label) of every synthetic X in the config."""
  cases = []
  for d, n in cfg['shapes']:
    k = min(n, d)
    for cond in cfg['conds']:
      cases.append(
          dict(d=d, n=n, cond=float(cond), rank_x=k, case=f'cond {cond:.0e}')
      )
    if cfg['rank_deficient'] and n >= d:
      cases.append(
          dict(
              d=d,
              n=n,
              cond=1e2,
              rank_x=max(1, round(cfg['rank_deficient'] * d)),
              case='rank-def',
          )
      )
  return cases


def run_synthetic(cfg, methods: list[str], seed: int) -> list[dict]:
  """Rows of every synthetic case (see `synthetic_cases`)."""
  rows = []
  for i, c in enumerate(tqdm.tqdm(synthetic_cases(cfg), desc='synthetic')):
    rng = np.random.default_rng([seed, i])
    d, n = c['d'], c['n']
    x = synthetic_x(rng, n, d, c['cond'], c['rank_x']).astype(np.float32)
    kernel = rng.standard_normal((d, d)).astype(np.float32)
    w = reference.r_factor(x)  # f64[d, d]
    s = singular_values(w)[: min(n, d)]
    ranks = sorted({max(1, round(f * d)) for f in cfg['rank_fractions']})
    rows += score(
        w,
        kernel,
        stats_lib.stats_from_x(jnp.asarray(x)),
        methods,
        ranks,
        d_in=d,
        d_out=d,
        n=n,
        case=c['case'],
        cond=c['cond'],
        rank_x=c['rank_x'],
        cond_x32=_cond(s),
    )
    logging.info('synthetic %s', c)
  return rows


# ------------------------------------------------------------------- real ---


def capture_inputs(
    model: nnx.Module, batches: Iterable[Any], layers: Iterable[str]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The inputs X of `layers` over `batches`, one array per distinct input.

  Returns:
    (xs, group_of): `xs[group]` is float32[tokens, d_in]; `group_of[layer]`
    is the first layer fed the same array (q/k/v share one, gate/up one).
    The model is restored on exit.
  """
  group_of = {}
  chunks = {}
  with calibration.tapped(model, layers):  # the taps of calibration
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, batch):
      recorder = calibration.record(lambda: nnx.merge(graphdef, state)(batch))
      group_of.update(recorder.group_of)
      return {g: x.astype(jnp.float32) for g, x in recorder.inputs.items()}

    for batch in tqdm.tqdm(batches, desc='capture inputs', unit='batch'):
      for g, x in step(state, batch).items():
        chunks.setdefault(g, []).append(np.asarray(x))
  return {g: np.concatenate(c) for g, c in chunks.items()}, group_of


def real_ranks(d_in: int, d_out: int, real) -> dict[str, int]:
  """The real_all ranks: {rule label: rank}, the ratio rank and the highs."""
  p = min(d_in, d_out)
  ranks = {
      f'ratio {real.ratio:g}': solvers.rank_for_ratio(d_in, d_out, real.ratio)
  }
  for f in real.high_fractions:
    ranks[f'{f:g} min'] = max(1, round(f * p))
  return ranks


def run_real(config, parts: list[str], out: dict, save) -> None:
  """real_layer and/or real_all into `out`; `save()` after every group."""
  model, tokenizer = common.load_model(config.model)
  real = config.real
  chosen = surgery.select_linears(model, real.include, real.exclude)
  wanted = dict(chosen) if 'real_all' in parts else {}
  if 'real_layer' in parts:
    wanted.update(surgery.select_linears(model, (real.layer,), ()))
  batches = common.calibration_batches(tokenizer, config.calib)
  xs, group_of = capture_inputs(model, batches, wanted)
  all_part = out.get('real_all') or dict(groups={}, rows=[], complete=False)
  done = {r['layer'] for r in all_part['rows']}
  todo = [
      n
      for n in wanted
      if (n == real.layer and 'real_layer' in parts)
      or (n in chosen and 'real_all' in parts and n not in done)
  ]
  groups = list(dict.fromkeys(group_of[n] for n in todo))
  bar = tqdm.tqdm(total=len(todo), desc='real layers', unit='layer')
  for g in groups:
    x = xs.pop(g)
    w = reference.r_factor(x)  # f64[d, d]
    s = singular_values(w)
    info = dict(
        group=g,
        d_in=x.shape[1],
        n=x.shape[0],
        cond_r=_cond(s),
        sigma_max=float(s[0]),
        sigma_min=float(s[-1]),
    )
    stats = stats_lib.stats_from_x(jnp.asarray(x))
    for name in (n for n in todo if group_of[n] == g):
      kernel = np.asarray(
          surgery.get_module(model, name).kernel[...], np.float32
      )
      d_in, d_out = kernel.shape
      fields = dict(
          layer=name,
          group=g,
          d_in=d_in,
          d_out=d_out,
          n=x.shape[0],
          cond_r=info['cond_r'],
      )
      if name == real.layer and 'real_layer' in parts:
        p = min(d_in, d_out)
        ranks = {max(1, round(f * p)) for f in real.layer_rank_fractions}
        out['real_layer'] = dict(
            info,
            layer=name,
            d_out=d_out,
            rows=score(w, kernel, stats, _methods(config), ranks, **fields),
        )
      if name in chosen and 'real_all' in parts and name not in done:
        rules = real_ranks(d_in, d_out, real)
        rows = score(w, kernel, stats, config.methods, rules.values(), **fields)
        all_part['groups'][g] = info
        all_part['rows'] += [
            dict(r, rule=rule)
            for rule, rank in rules.items()
            for r in rows
            if r['rank'] == rank
        ]
        out['real_all'] = all_part
      bar.update()
    save()
  bar.close()


# -------------------------------------------------------------------- run ---


def _methods(config) -> list[str]:
  return list(config.methods) + ([BF16] if config.bf16 else [])


def _settings(config, part: str) -> dict:
  """The config fields a part depends on (a change redoes the part)."""
  base = dict(seed=config.seed, methods=_methods(config))
  if part == 'synthetic':
    return dict(base, synthetic=config.synthetic.to_dict())
  real = dict(base, model=config.model.to_dict(), calib=config.calib.to_dict())
  if part == 'real_layer':
    return dict(
        real,
        layer=config.real.layer,
        fractions=list(config.real.layer_rank_fractions),
    )
  return dict(
      real,
      methods=list(config.methods),
      real={
          k: v
          for k, v in config.real.to_dict().items()
          if k not in ('layer', 'layer_rank_fractions')
      },
  )


def _jsonable(obj: Any) -> Any:
  """`obj` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(obj, default=results.json_default))


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  common.check_parts(config.parts, PARTS)
  common.check_int(config.seed, 'seed', minimum=0)
  common.check_methods(config.methods, float64=False)
  if not isinstance(config.bf16, bool):
    common.fail('bf16', 'True or False', config.bf16)
  syn = config.synthetic
  if not syn.shapes or not all(
      isinstance(s, (tuple, list)) and len(s) == 2 for s in syn.shapes
  ):
    common.fail(
        'synthetic.shapes', 'a non-empty tuple of (d, n) pairs', syn.shapes
    )
  for i, (d, n) in enumerate(syn.shapes):
    common.check_int(d, f'synthetic.shapes[{i}][0]')
    common.check_int(n, f'synthetic.shapes[{i}][1]')
  common.check_numbers(syn.conds, 'synthetic.conds', minimum=1)
  common.check_number(
      syn.rank_deficient, 'synthetic.rank_deficient', minimum=0, maximum=1
  )
  common.check_numbers(
      syn.rank_fractions, 'synthetic.rank_fractions', positive=True, maximum=1
  )
  common.check_model_spec(config.model)
  common.check_data_spec(config.calib, 'calib')
  real = config.real
  if not isinstance(real.layer, str) or not real.layer:
    common.fail('real.layer', 'a layer path', real.layer)
  common.check_numbers(
      real.layer_rank_fractions,
      'real.layer_rank_fractions',
      positive=True,
      maximum=1,
  )
  common.check_layers(real.include, real.exclude, 'real.')
  common.check_ratio(real.ratio, 'real.ratio')
  common.check_numbers(
      real.high_fractions, 'real.high_fractions', positive=True, maximum=1
  )
  common.check_number(real.loss_tol, 'real.loss_tol', positive=True)


def run(config, workdir: str) -> None:
  """The parts of `config.parts`, each kept in results.json as it finishes.

  A part whose settings (`_settings`) changed is redone; one with the same
  settings is skipped, and real_all resumes layer group by layer group.
  Writes summary.md and one figure per part present.
  """
  validate(config)
  out = common.read_results(workdir, {})
  out.setdefault('settings', {})
  out['loss_tol'] = config.real.loss_tol
  for part in config.parts:  # changed settings: redo the part
    wanted = _jsonable(_settings(config, part))
    if out['settings'].get(part) != wanted:
      out.pop(part, None)
      out['settings'][part] = wanted
  save = lambda: common.write_results(workdir, out)
  if 'synthetic' in config.parts and 'synthetic' not in out:
    out['synthetic'] = run_synthetic(
        config.synthetic, _methods(config), config.seed
    )
    save()
  real_parts = [
      p
      for p in ('real_layer', 'real_all')
      if p in config.parts and not out.get(p, {}).get('complete')
  ]
  if real_parts:
    run_real(config, real_parts, out, save)
    for part in real_parts:
      out[part]['complete'] = True
  save()
  common.finish(workdir, summarize(out), plot)


# -------------------------------------------------------------- summaries ---


def _eps_table(rows: list[dict]) -> str:
  """Retries and final eps of the retrying methods, per synthetic case."""
  lines = {}
  for r in rows:
    if r['method'] in gram_methods():
      key = (r['d_in'], r['n'], r['case'])
      line = lines.setdefault(key, dict(d_in=key[0], n=key[1], case=key[2]))
      line[r['method']] = (
          f"{r['retries']} / {r['eps']:.1e}"
          + (' F' if r['failed'] else '')
          + (' N' if r['nonfinite'] else '')
      )
  methods = [m for m in gram_methods() if any(m in l for l in lines.values())]
  return results.markdown_table(
      list(lines.values()), ['d_in', 'n', 'case'] + methods
  )


def _summarize_synthetic(rows: list[dict]) -> list[str]:
  text = [
      '## Synthetic X\n',
      scoring.CELL_LEGEND + ' coala_bf16: coala on the kernel stored '
      'in bf16. cond_x32: cond of the float32 X actually used (float64 '
      'SVD), after the cast.\n',
  ]
  for d, n in dict.fromkeys((r['d_in'], r['n']) for r in rows):
    mine = [r for r in rows if (r['d_in'], r['n']) == (d, n)]
    keep = {r['rank'] for r in mine if r['rank'] >= min(d, n) // 2}
    conds = {r['case']: r['cond_x32'] for r in mine}
    text += [
        f'### d_in = d_out = {d}, n = {n}\n',
        'cond_x32: '
        + ', '.join(f'{c} → {v:.2g}' for c, v in conds.items())
        + '\n',
        scoring.method_table(
            [r for r in mine if r['rank'] in keep], ['case', 'rank']
        ),
    ]
  text += [
      '### Retries / final eps of the Gram methods (F failed, N '
      'non-finite)\n',
      _eps_table(rows),
      '### coala head to head over every (shape, cond, rank) cell\n',
      "wins: the other error > 1.01 × coala's (or NaN); losses: "
      "coala's > 1.01 × the other's; ties otherwise.\n",
      results.markdown_table(
          head_to_head(rows, ['d_in', 'n', 'case', 'rank'], 0.01),
          ['method', 'wins', 'ties', 'losses'],
      ),
  ]
  return text


def _summarize_real_layer(part: dict) -> list[str]:
  return [
      f"## Real activations: {part['layer']} ({part['d_in']} × "
      f"{part['d_out']}, {part['n']} tokens, cond(R) = "
      f"{part['cond_r']:.3g})\n",
      scoring.method_table(
          part['rows'], ['rank'], ('rel_opt',), dict(rel_opt='.3e')
      ),
  ]


def real_counts(rows: list[dict], tol: float) -> list[dict]:
  """Per (method, rule): layers failed/retried/non-finite/lost > tol."""
  out = []
  for method, rule in dict.fromkeys((r['method'], r['rule']) for r in rows):
    mine = [r for r in rows if (r['method'], r['rule']) == (method, rule)]
    ratios = np.array([r['err_over_opt'] for r in mine])
    finite = ratios[np.isfinite(ratios)]
    out.append(
        dict(
            method=method,
            rule=rule,
            layers=len(mine),
            failed=sum(bool(r['failed']) for r in mine),
            retried=sum(r['retries'] > 0 for r in mine),
            nonfinite=sum(bool(r['nonfinite']) for r in mine),
            lost=sum(
                bool(
                    r['failed']
                    or r['nonfinite']
                    or not r['err_over_opt'] <= 1 + tol
                )
                for r in mine
            ),
            median_ratio=float(np.median(finite)) if finite.size else np.nan,
            max_ratio=float(np.max(finite)) if finite.size else np.nan,
            max_eps=max(r['eps'] for r in mine),
        )
    )
  return out


def input_kinds(part: dict) -> dict[str, str]:
  """{group: 'q/k/v'}: the kinds of projection reading each input."""
  kinds = {}
  for r in part['rows']:
    kinds.setdefault(r['group'], {})[
        r['layer'].rsplit('.', 1)[-1].replace('_proj', '')
    ] = None
  return {g: '/'.join(k) for g, k in kinds.items()}


def head_to_head(
    rows: list[dict], keys: list[str], tol: float, by: str | None = None
) -> list[dict]:
  """coala against each method on the same (keys) cells, per `by` value.

  A cell is a win for coala if the other method's error exceeds coala's by
  more than the factor 1 + tol (or is NaN), a loss if coala's exceeds the
  other's by more than that, a tie otherwise.
  """
  cells = {}
  for r in rows:
    cells.setdefault(tuple(r[k] for k in keys), {})[r['method']] = r
  out = {}
  for cell in cells.values():
    mine = cell.get('coala')
    if mine is None:
      continue
    for method, r in cell.items():
      if method == 'coala':
        continue
      line = out.setdefault(
          (r[by] if by else '', method),
          dict(
              method=method,
              wins=0,
              ties=0,
              losses=0,
              **({by: r[by]} if by else {}),
          ),
      )
      if not r['err'] <= (1 + tol) * mine['err']:  # NaN: a win
        line['wins'] += 1
      elif mine['err'] > (1 + tol) * r['err']:
        line['losses'] += 1
      else:
        line['ties'] += 1
  return list(out.values())


def _summarize_real_all(part: dict, tol: float) -> list[str]:
  groups = list(part['groups'].values())
  conds = np.array([g['cond_r'] for g in groups])
  kind_of = input_kinds(part)
  kinds = {}
  for g in groups:
    kinds.setdefault(kind_of[g['group']], []).append(g['cond_r'])
  worst = sorted(groups, key=lambda g: -g['cond_r'])[:8]
  worst_layers = [
      n
      for g in worst
      for n in dict.fromkeys(
          r['layer'] for r in part['rows'] if r['group'] == g['group']
      )
  ]
  high = [
      r
      for r in part['rows']
      if r['layer'] in worst_layers and not r['rule'].startswith('ratio')
  ]
  n_layers = len({r['layer'] for r in part['rows']})
  return [
      f'## Real activations: all {n_layers} projections ({len(groups)} '
      f"distinct inputs, {groups[0]['n']} tokens)\n",
      f'cond(R) of the distinct inputs (float64): min {conds.min():.3g}, '
      f'median {np.median(conds):.3g}, max {conds.max():.3g}. By the '
      'projections reading the input: '
      + ', '.join(
          f'{k} median {np.median(v):.3g} / max {max(v):.3g}'
          for k, v in kinds.items()
      )
      + '.\n',
      f'Layers where a method failed, produced NaN/Inf or lost more than '
      f'{tol:.0%} of the optimum (err/opt > {1 + tol:g}):\n',
      results.markdown_table(
          real_counts(part['rows'], tol),
          [
              'method',
              'rule',
              'layers',
              'failed',
              'retried',
              'nonfinite',
              'lost',
              'median_ratio',
              'max_ratio',
              'max_eps',
          ],
          dict(median_ratio='.6g', max_ratio='.4g', max_eps='.1e'),
      ),
      f'\ncoala head to head, per layer: wins (the other error > '
      f"{1 + tol:g} × coala's, or NaN), losses (coala's > {1 + tol:g} × "
      "the other's), ties:\n",
      results.markdown_table(
          head_to_head(part['rows'], ['layer', 'rule'], tol, by='rule'),
          ['rule', 'method', 'wins', 'ties', 'losses'],
      ),
      '\nThe inputs with the largest cond(R), their layers at the high '
      'ranks (cells as above):\n',
      scoring.method_table(
          high, ['layer', 'cond_r', 'rank'], formats=dict(cond_r='.3g')
      ),
  ]


def summarize(out: dict) -> str:
  """Markdown of every part present in `out`."""
  text = []
  if 'synthetic' in out:
    text += _summarize_synthetic(out['synthetic'])
  if 'real_layer' in out:
    text += _summarize_real_layer(out['real_layer'])
  if 'real_all' in out and out['real_all']['rows']:
    text += _summarize_real_all(out['real_all'], out['loss_tol'])
  return '\n'.join(text)


# ------------------------------------------------------------------ plots ---

_STYLE = dict(
    coala=('C0', 'o'),
    coala_bf16=('C0', 'x'),
    svd=('C7', 'v'),
    svd_llm=('C3', 's'),
    svd_llm_eps=('C1', 'D'),
    svd_llm_v2=('C4', '^'),
    asvd=('C8', 'P'),
    corda=('C2', '*'),
)


def _style(method: str) -> tuple[str, str]:
  """(colour, marker): the published figures' look, a cycle for others."""
  if method in _STYLE:
    return _STYLE[method]
  names = registry.names()
  i = names.index(method) if method in names else len(names)
  return f'C{i % 10}', common.MARKERS[i % len(common.MARKERS)]


_FLOOR = 1e-17  # log axes: exact zeros drawn here
_BROKEN = 10.0  # NaN/Inf factors drawn here (marker, no line)


def _error_vs_rank(ax, rows: list[dict], title: str) -> None:
  opt = sorted({(r['rank'], r['rel_opt']) for r in rows if r['method'] != BF16})
  for method in dict.fromkeys(r['method'] for r in rows):
    mine = [r for r in rows if r['method'] == method]
    color, marker = _style(method)
    ax.plot(
        [r['rank'] for r in mine],
        [r['rel_err'] if np.isfinite(r['rel_err']) else np.nan for r in mine],
        marker=marker,
        color=color,
        ms=4,
        alpha=0.8,
        label=method,
    )
    bad = [r['rank'] for r in mine if not np.isfinite(r['rel_err'])]
    ax.plot(bad, [_BROKEN] * len(bad), marker, color=color, ms=7)
  ax.plot(
      [k for k, o in opt if o > 0],
      [o for _, o in opt if o > 0],
      'k--',
      lw=1.5,
      zorder=5,
      label='float64 optimum',
  )
  ax.set(
      yscale='log',
      xlabel='rank',
      ylabel="||X(K − K')||_F / ||XK||_F",
      title=title,
  )


def _excess_vs_cond(ax, rows: list[dict], title: str) -> None:
  big = max(r['cond'] for r in rows if r['case'] != 'rank-def') * 100
  xpos = lambda r: big if r['case'] == 'rank-def' else r['cond']
  for method in dict.fromkeys(r['method'] for r in rows):
    mine = sorted((r for r in rows if r['method'] == method), key=xpos)
    color, marker = _style(method)
    ok = [r for r in mine if np.isfinite(r['excess'])]
    ax.plot(
        [xpos(r) for r in ok],
        [max(r['excess'], _FLOOR) for r in ok],
        marker=marker,
        color=color,
        ms=4,
        alpha=0.8,
        label=method,
    )
    bad = [xpos(r) for r in mine if not np.isfinite(r['excess'])]
    ax.plot(bad, [_BROKEN] * len(bad), marker, color=color, ms=7)
  ticks = sorted({xpos(r) for r in rows})
  ax.set_xscale('log')
  ax.set_xticks(
      ticks,
      [('rank-\ndef' if t == big else f'{t:.0e}') for t in ticks],
      fontsize=6,
  )
  ax.minorticks_off()
  ax.set(
      yscale='log',
      xlabel='cond(X)',
      ylabel='(err − opt) / ||XK||_F',
      title=title,
  )


def plot(workdir: str) -> None:
  """Figures from results.json alone, one PNG per part present.

  error_vs_rank.png (the largest synthetic shape, one panel per cond),
  excess_vs_cond.png (every shape at the ranks nearest 0.5 d and 0.95 d),
  real_layer.png, real_layers.png. Markers at 10: NaN/Inf factors. Each
  figure has one legend, outside its panels.
  """
  out = common.read_results(workdir, None)
  figs = []
  if 'synthetic' in out:
    rows = out['synthetic']
    shapes = list(dict.fromkeys((r['d_in'], r['n']) for r in rows))
    d, n = max(shapes)
    mine = [r for r in rows if (r['d_in'], r['n']) == (d, n)]
    cases = list(dict.fromkeys(r['case'] for r in mine))
    cols = min(4, len(cases))
    fig, axes = common.subplots(
        -(-len(cases) // cols),
        cols,
        figsize=(4 * cols, 3.4 * -(-len(cases) // cols)),
    )
    for ax, case in zip(axes.flat, cases):
      _error_vs_rank(
          ax,
          [r for r in mine if r['case'] == case],
          f'{case}, d = {d}, n = {n}',
      )
    for ax in axes.flat[len(cases) :]:
      ax.axis('off')
    figs.append((fig, axes, 'error_vs_rank.png'))
    fig, axes = common.subplots(2, len(shapes), figsize=(4 * len(shapes), 7))
    for j, (d, n) in enumerate(shapes):
      mine = [r for r in rows if (r['d_in'], r['n']) == (d, n)]
      ranks = sorted({r['rank'] for r in mine})
      for i, f in enumerate((0.5, 0.95)):
        rank = min(ranks, key=lambda k: abs(k - f * d))
        _excess_vs_cond(
            axes[i, j],
            [r for r in mine if r['rank'] == rank],
            f'd = {d}, n = {n}, rank {rank} (≈{f:g} d)',
        )
    figs.append((fig, axes, 'excess_vs_cond.png'))
  if 'real_layer' in out:
    part = out['real_layer']
    fig, axes = common.subplots(1, 1, figsize=(6, 4.5))
    _error_vs_rank(
        axes[0, 0],
        part['rows'],
        f"{part['layer']}, {part['n']} "
        f"tokens, cond(R) = {part['cond_r']:.2g}",
    )
    figs.append((fig, axes, 'real_layer.png'))
  if out.get('real_all', {}).get('rows'):
    figs.append(
        (*_plot_real_all(out['real_all'], out['loss_tol']), 'real_layers.png')
    )
  for fig, axes, name in figs:
    common.legend_outside(fig, axes)
    common.save_figure(fig, workdir, name, dpi=110)


def _plot_real_all(part: dict, tol: float):
  """(figure, axes): cond(R) per input, then err/opt − 1 per rank rule."""
  rules = list(dict.fromkeys(r['rule'] for r in part['rows']))
  fig, axes = common.subplots(
      1, 1 + len(rules), figsize=(5 * (1 + len(rules)), 4.2)
  )
  ax = axes[0, 0]
  groups = list(part['groups'].values())
  kind_of = input_kinds(part)
  for kind in dict.fromkeys(kind_of[g['group']] for g in groups):
    mine = [g for g in groups if kind_of[g['group']] == kind]
    ax.plot(
        [int(g['group'].split('.')[1]) for g in mine],
        [g['cond_r'] for g in mine],
        'o-',
        ms=3,
        label=f'{kind} input',
    )
  ax.set(
      yscale='log',
      xlabel='layer',
      ylabel='cond(R) (float64)',
      title='cond of each distinct layer input',
  )
  for ax, rule in zip(axes[0, 1:], rules):
    for method in gram_methods() + ['coala']:
      mine = [
          r for r in part['rows'] if r['rule'] == rule and r['method'] == method
      ]
      color, marker = _style(method)
      lost = [
          (
              r['cond_r'],
              r['err_over_opt'] - 1
              if np.isfinite(r['err_over_opt'])
              else _BROKEN,
          )
          for r in mine
      ]
      ax.plot(
          [c for c, _ in lost],
          [max(v, 1e-9) for _, v in lost],
          marker,
          color=color,
          ms=4,
          alpha=0.6,
          label=method,
      )
    ax.axhline(tol, color='k', lw=0.8, ls=':', label=f'{tol:.0%} lost')
    ax.set(
        xscale='log',
        yscale='log',
        xlabel='cond(R) of the layer input',
        ylabel='err / opt − 1 (floored at 1e-9)',
        title=f'rank: {rule}',
    )
  return fig, axes
