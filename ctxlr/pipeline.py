"""Compress an NNX model in place: calibrate, allocate ranks, solve, swap.

    report = ctxlr.compress(model, batches, ratio=0.8)
    report['kept_ratio'], report['layers']['layers.0.attn.q_proj']['rank']

Every registered method (`ctxlr.registry`: coala, the peers of
`ctxlr.baselines`, the reference k_star) runs through the same pipeline and
sees exactly the same calibration data. Entry points: `compress` (calibrate
and compress), `compress_from_stats` (compress from statistics already
computed, e.g. one calibration for a sweep over methods), and the
functional core `factorize_layers` (kernels + statistics -> factors, for
parameters held in a plain pytree, e.g. Linen).
"""

import functools
import logging
import time
import weakref
from typing import Any, Callable, Iterable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ctxlr import allocation as allocation_lib
from ctxlr import baselines
from ctxlr import calibration
from ctxlr import methods as methods_lib
from ctxlr import registry
from ctxlr import sensitivity as sensitivity_lib
from ctxlr import stats as stats_lib
from ctxlr import store as store_lib
from ctxlr import surgery
from ctxlr.linalg import checks
from ctxlr.linalg import solvers
from ctxlr.linalg import streaming

# Rank allocations (docs/method.md §7): 'uniform', 'global' (least summed
# relative error), 'fisher' (least estimated loss increase: each layer's
# exact error curve weighted by its loss-gradient energy, `ctxlr.sensitivity`),
# and the peers' rules 'svd_llm_v2' and 'coala_hetero' (`ctxlr.allocation`).
# Two controls that take 'fisher' apart: 'fisher_factored' (no layer may stay
# dense) and 'global_dense' (global's relative-error weights, with the step
# to a dense layer that 'fisher' has).
ALLOCATIONS = (
    'uniform',
    'global',
    'fisher',
    'svd_llm_v2',
    'coala_hetero',
    'fisher_factored',
    'global_dense',
)
NEEDS_SENSITIVITY = ('fisher', 'fisher_factored')
MODES = ('one_shot', 'sequential')
# Per-layer μ rules: `solvers.layer_mu`'s, and 'cholesky' (μ = μ₀ times the
# jitter a float32 Cholesky of the layer's RᵀR needs, `baselines.cholesky_shift`).
MU_RULES = solvers.MU_RULES + ('cholesky',)


def check_options(
    *,
    ratio: float,
    method: str,
    mu: float,
    allocation: str,
    mu_rule: str,
    mode: str,
    auto_mu: float = 0.0,
    auto_mu_rule: str = 'energy',
    method_options: Mapping[str, Any] | None = None,
) -> None:
  """Raises before any long work if an option is out of range."""
  if isinstance(ratio, bool) or not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1]; got {ratio}.')
  record = registry.get(method)
  registry.check_options(method, method_options)
  if not mu >= 0:
    raise ValueError(f'mu must be >= 0; got {mu}.')
  if not auto_mu >= 0:
    raise ValueError(f'auto_mu must be >= 0; got {auto_mu}.')
  if (mu > 0 or auto_mu > 0) and not record.takes_mu:
    raise ValueError(
        f'mu > 0 / auto_mu > 0 (regularization): method {method!r} has no '
        f'ridge term; methods with one: {registry.names(takes_mu=True)}.'
    )
  if allocation not in ALLOCATIONS:
    raise ValueError(
        f'allocation must be one of {ALLOCATIONS}; got ' f'{allocation!r}.'
    )
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}; got {mode!r}.')
  if mu_rule not in MU_RULES:
    raise ValueError(f'mu_rule must be one of {MU_RULES}; got {mu_rule!r}.')
  if auto_mu_rule not in MU_RULES:
    raise ValueError(
        f'auto_mu_rule must be one of {MU_RULES}; got ' f'{auto_mu_rule!r}.'
    )


def relative_error(
    kernel: jax.Array, r: jax.Array, a: jax.Array, b: jax.Array
) -> float:
  """`||X(K − a b)||_F / ||X K||_F`, exactly, from R (never X).

  Computed as `R K − (R a) b`, whose cost grows with the rank; the factors
  are zero-padded (a b unchanged) to the next multiple of min(d_in, d_out)/8,
  so that at most 8 compiles per layer shape serve every rank.
  """
  width = solvers.padded_width(a.shape[1], min(kernel.shape))
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  a = np.pad(a, ((0, 0), (0, width - a.shape[1])))
  b = np.pad(b, ((0, width - b.shape[0]), (0, 0)))
  return float(_relative_error(kernel, r, a, b))


@jax.jit
def _relative_error(kernel, r, a, b):
  hi = jax.lax.Precision.HIGHEST
  r = r.astype(jnp.float32)
  rk = jnp.matmul(r, kernel.astype(jnp.float32), precision=hi)
  approx = jnp.matmul(jnp.matmul(r, a, precision=hi), b, precision=hi)
  return checks.relative_norm_traced(rk - approx, rk)  # no f32 overflow


def numerical_rank(r: jax.Array) -> int:
  """Rank of X from its R: singular values above d·eps·σ_max (float32).

  Remembered per jax array while it lives (jax arrays are immutable), so
  that solving the same statistics at several ratios pays one SVD of R.
  """
  key = id(r)
  hit = _RANKS.get(key)
  if hit is not None and hit[0]() is r:
    return hit[1]
  s = jnp.linalg.svd(jnp.asarray(r, jnp.float32), compute_uv=False)
  tol = max(r.shape) * jnp.finfo(jnp.float32).eps * s[0]
  rank = int((s > tol).sum())
  if isinstance(r, jax.Array):  # not NumPy: it could change in place
    _RANKS[key] = (
        weakref.ref(r, lambda _, key=key: _RANKS.pop(key, None)),
        rank,
    )
  return rank


_RANKS: dict[int, tuple[Any, int]] = {}  # id(r) -> (weakref to r, rank)


def layer_weights(
    sensitivity: Mapping[str, Any], names: Iterable[str]
) -> dict[str, float]:
  """{layer: scalar loss weight} from `sensitivity` ({layer: Energy or float})."""
  out = {}
  for name in names:
    if name not in sensitivity:
      raise ValueError(f'sensitivity has no entry for layer {name!r}.')
    value = sensitivity[name]
    out[name] = float(
        value.mean if isinstance(value, sensitivity_lib.Energy) else value
    )
  return out


def error_gains(
    kernel: jax.Array,
    r: jax.Array,
    *,
    method: str = 'coala',
    method_options: Mapping[str, Any] | None = None,
) -> np.ndarray:
  """The exact squared-error decrement of each direction the method keeps.

  `gains[i]` is what the (i+1)-th direction removes from `||X(K − K')||²`.
  For the exact solution these are σ_i(R K)² (docs/method.md §2); for coala
  with a weighting power other than ½, `||R K v_i||²` of its own directions
  (`methods.power_gains`). Every other method is scored on σ(R K)², its
  optimum in exact arithmetic.
  """
  p = min(kernel.shape)
  power = dict(method_options or {}).get('power', methods_lib.EXACT_POWER)
  if method == 'coala' and float(power) != methods_lib.EXACT_POWER:
    _, gains = methods_lib.power_gains(kernel, r, rank=1, power=power)
    return np.asarray(gains, np.float64)[:p]
  sigma = np.asarray(solvers.weighted_spectrum(kernel, r), np.float64)[:p]
  return np.square(sigma)


def assign_ranks(
    shapes: Mapping[str, tuple[int, int]],
    kernels: Mapping[str, jax.Array],
    stats: Mapping[str, stats_lib.LayerStats],
    *,
    ratio: float,
    allocation: str = 'uniform',
    method: str = 'coala',
    method_options: Mapping[str, Any] | None = None,
    sensitivity: Mapping[str, Any] | None = None,
    cache: dict | None = None,
) -> dict[str, int | None]:
  """Per-layer ranks for a kept ratio, by the rule `allocation`.

  'uniform' reads nothing; 'global', 'svd_llm_v2' and 'coala_hetero' read
  σ(R K); 'fisher' reads the exact error decrements of the method's
  directions (`error_gains`) and the layers' loss weights from `sensitivity`
  ({layer: `sensitivity.Energy` or float}). `stats` may be None for the
  uniform rule. `cache`, a dict kept between calls on the same kernels and
  statistics, keeps the error curves.
  """
  if allocation == 'uniform':
    return allocation_lib.uniform_ranks(shapes, ratio)
  if allocation in NEEDS_SENSITIVITY and sensitivity is None:
    raise ValueError(
        f"allocation={allocation!r} needs the layers' "
        'sensitivity (sensitivity.output_gradient_energy).'
    )
  gains = {}
  by = method if allocation in NEEDS_SENSITIVITY else 'coala'
  options = method_options if allocation in NEEDS_SENSITIVITY else None
  tag = ('gains', by, tuple(sorted(dict(options or {}).items())))
  for name in tqdm.tqdm(shapes, desc='spectra', unit='layer'):
    if cache is not None and (tag, name) in cache:
      gains[name] = cache[tag, name]
      continue
    gains[name] = error_gains(
        kernels[name], stats[name].r, method=by, method_options=options
    )
    if cache is not None:
      cache[tag, name] = gains[name]
  groups = _stacks(shapes)
  if allocation in ('svd_llm_v2', 'coala_hetero'):
    rule = (
        allocation_lib.svd_llm_v2_ranks
        if allocation == 'svd_llm_v2'
        else allocation_lib.coala_hetero_ranks
    )
    ranks = rule(shapes, {n: np.sqrt(g) for n, g in gains.items()}, ratio)
    return _tie_ranks(ranks, groups)
  caps = {n: max(1, allocation_lib.max_saving_rank(*shapes[n])) for n in shapes}
  if allocation in ('global', 'global_dense'):  # relative error curves
    curves = {n: g / (g[: caps[n]].sum() or 1.0) for n, g in gains.items()}
  else:  # fisher, fisher_factored: loss weight times the error decrements
    weights = layer_weights(sensitivity, shapes)
    bad = {n: w for n, w in weights.items() if not (np.isfinite(w) and w >= 0)}
    if bad:
      raise ValueError(f'weights must be finite and >= 0; got {bad}.')
    curves = {n: weights[n] * g for n, g in gains.items()}
  # A stack's layers share one rank: one entry per stack, its curve the
  # members' mean (global: relative curves) or sum (loss estimates), its
  # parameters counted once per member.
  units, counts = dict(shapes), {}
  for module, members in groups.items():
    for n in members:
      units.pop(n)
    units[module] = shapes[members[0]]
    counts[module] = len(members)
    stacked = np.stack([curves.pop(n) for n in members])
    curves[module] = (
        stacked.mean(0) if allocation == 'global' else stacked.sum(0)
    )
  if allocation == 'global':
    ranks = allocation_lib.global_ranks(
        units, {n: np.sqrt(c) for n, c in curves.items()}, ratio, counts=counts
    )
  else:
    ranks = allocation_lib.weighted_ranks(
        units,
        curves,
        ratio,
        allow_dense=allocation in ('fisher', 'global_dense'),
        counts=counts,
    )
  for module, members in groups.items():
    rank = ranks.pop(module)
    ranks.update({n: rank for n in members})
  return {n: ranks[n] for n in shapes}


def _stacks(shapes: Mapping[str, Any]) -> dict[str, list[str]]:
  """{module: its stacked layers 'module[i]'} among the layers of `shapes`."""
  groups: dict[str, list[str]] = {}
  for name in shapes:
    module, index = surgery.split_name(name)
    if index:
      groups.setdefault(module, []).append(name)
  return groups


def _tie_ranks(ranks, groups):
  """Ranks with each stack's layers at their mean rank (one stored rank)."""
  out = dict(ranks)
  for members in groups.values():
    given = [ranks[n] for n in members]
    if any(r is None for r in given):
      rank = None
    else:
      rank = max(1, int(round(float(np.mean(given)))))
    out.update({n: rank for n in members})
  return out


def layer_mu(
    kernel: jax.Array, r: jax.Array, mu0: float, *, rank: int, rule: str
) -> float:
  """μ of one layer from μ₀ by `rule` (`MU_RULES`, docs/method.md §4)."""
  if mu0 == 0:
    return 0.0
  r = jnp.asarray(r, jnp.float32)
  if rule == 'cholesky':
    return float(mu0 * baselines.cholesky_shift(r))
  return float(solvers.layer_mu(kernel, r, mu0, rank=rank, rule=rule))


def factorize_layers(
    kernels: Mapping[str, jax.Array],
    stats: Mapping[str, stats_lib.LayerStats],
    ranks: Mapping[str, int | None],
    *,
    method: str = 'coala',
    mu: float = 0.0,
    mu_rule: str = 'energy',
    auto_mu: float = 0.0,
    auto_mu_rule: str = 'energy',
    method_options: Mapping[str, Any] | None = None,
    store: store_lib.RunStore | None = None,
    full: dict | None = None,
) -> dict[str, dict[str, Any]]:
  """The functional core: kernels + statistics -> factors and a report.

  Args:
    kernels: {layer: K float[d_in, d_out]}.
    stats: {layer: LayerStats of that layer's input} (shared objects are
      fine), float32 or float64 (every method but 'k_star' rounds them to
      float32 first; `stats_lib.as_float32`).
    ranks: {layer: rank, or None to keep dense}.
    method: a registered method (`registry.names()`).
    mu: μ₀ for ctxlr's layer-scaled regularization (0: none).
    mu_rule: 'energy', 'error_ratio' (`solvers.layer_mu`) or 'cholesky'
      (`layer_mu`).
    auto_mu: if > 0 (ctxlr only), a layer whose calibration inputs have
      numerical rank below its rank (the data cannot determine it,
      docs/method.md §5) is solved with the ridge of this μ₀, scaled by
      `auto_mu_rule`, even when `mu` is 0.
    auto_mu_rule: the μ rule of `auto_mu` (default 'energy': 'error_ratio'
      collapses on exactly these layers, docs/method.md §4).
    method_options: the method's own keyword options (`Method.options`).
    store: if given, layers it holds are loaded instead of solved, and each
      newly solved layer is saved to it at once.
    full: a dict the caller keeps between calls on the same kernels and
      statistics (e.g. one sweep over kept ratios): for a nested method
      (`registry.Method.nested`) each layer is solved once at full rank per
      (method, options, μ) and every later rank is its truncation, the same
      factors as a direct solve. Holds every layer's full factors: clear it
      when the sweep moves on.

  Returns:
    {layer: dict(a, b, rank, rel_err, mu (the layer's μ), auto_mu (whether
    it was regularized because its data were insufficient), data_rank,
    tokens, retries, eps, failed, nonfinite)} for the layers with a rank
    (dense ones are absent).
  """
  record = registry.get(method)
  done = set(store.finished_layers()) if store is not None else set()
  out = {
      n: dict(store.load_layer(n), resumed=True) for n in kernels if n in done
  }
  if out:
    logging.warning(
        'Resumed: %d of %d layers loaded from %s, %d to solve.',
        len(out),
        len(kernels),
        store.directory,
        sum(ranks[n] is not None for n in kernels) - len(out),
    )
  todo = [n for n in kernels if ranks[n] is not None and n not in done]
  data_ranks = {}  # per shared input (q/k/v share one R)
  for name in tqdm.tqdm(todo, desc=f'solve ({method})', unit='layer'):
    kernel, layer_stats, rank = kernels[name], stats[name], ranks[name]
    if id(layer_stats.r) not in data_ranks:
      data_ranks[id(layer_stats.r)] = numerical_rank(layer_stats.r)
    mu0, rule = mu, mu_rule
    auto = bool(
        mu == 0 and auto_mu > 0 and data_ranks[id(layer_stats.r)] < rank
    )
    if auto:
      mu0, rule = auto_mu, auto_mu_rule
    this_mu = layer_mu(kernel, layer_stats.r, mu0, rank=rank, rule=rule)
    options = dict(method_options or {})
    solve_rank = rank
    key = None
    if full is not None and record.nested:
      key = (name, method, tuple(sorted(options.items())), this_mu)
      solve_rank = min(kernel.shape)
    try:
      if key is not None and key in full:
        factors, info = full[key]
      else:
        factors, info = record.fn(
            kernel,
            layer_stats
            if record.float64
            else stats_lib.as_float32(layer_stats),
            rank=solve_rank,
            mu=this_mu,
            **options,
        )
        if key is not None:
          full[key] = (factors, info)
    except ValueError as e:
      raise ValueError(f'{name}: {e}') from e
    if solve_rank != rank:
      factors = solvers.truncate(factors, rank)
    result = dict(
        a=factors.a,
        b=factors.b,
        rank=rank,
        mu=this_mu,
        auto_mu=auto,
        rel_err=relative_error(kernel, layer_stats.r, factors.a, factors.b),
        data_rank=data_ranks[id(layer_stats.r)],
        tokens=layer_stats.count,
        **info._asdict(),
    )
    out[name] = result
    if store is not None:
      store.save_layer(name, result)
  return {n: out[n] for n in kernels if n in out}


def count_params(model: nnx.Module) -> int:
  return sum(
      int(np.prod(x.shape))
      for x in jax.tree.leaves(nnx.state(model, nnx.Param))
  )


def compress(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    ratio: float,
    method: str = 'coala',
    mu: float = 0.0,
    mu_rule: str = 'energy',
    auto_mu: float = 0.0,
    allocation: str = 'uniform',
    mode: str = 'one_shot',
    method_options: Mapping[str, Any] | None = None,
    auto_mu_rule: str = 'energy',
    sensitivity: Mapping[str, Any] | None = None,
    include: Iterable[str] = surgery.DEFAULT_INCLUDE,
    exclude: Iterable[str] = surgery.DEFAULT_EXCLUDE,
    call: Callable = calibration.default_call,
    mesh: jax.sharding.Mesh | None = None,
    stats_dtype: Any = jnp.float32,
    checkpoint_dir: str | None = None,
    data_id: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Compresses the chosen `nnx.Linear` layers of `model` in place.

  Args:
    model: an NNX model.
    batches: calibration inputs, an iterable of what `call(model, batch)`
      takes (default: `model(batch)`, e.g. int32 ids [batch, seq]).
    ratio: kept fraction of the chosen layers' parameters, in (0, 1].
    method: a registered method (`registry.names()`): 'coala', a peer of
      `ctxlr.baselines`, or 'k_star' (the float64 reference K_*).
    mu: μ₀ of the layer-scaled regularization (ctxlr only; 0 = none).
    mu_rule: 'energy' (default), 'error_ratio' (`solvers.layer_mu`) or
      'cholesky' (`layer_mu`); `MU_RULES`.
    auto_mu: if > 0, layers with insufficient calibration data (numerical
      rank of their inputs below their rank) get the ridge with this μ₀,
      scaled by `auto_mu_rule`, automatically (ctxlr only; see
      `factorize_layers`).
    allocation: one of `ALLOCATIONS`: 'uniform'; 'global' (least summed
      relative layer error); 'fisher' (least estimated loss increase, the
      exact error curves weighted by each layer's loss-gradient energy);
      'svd_llm_v2' or 'coala_hetero' (those peers' per-type rules). All but
      'uniform' read a one-shot pass over the dense model.
    method_options: the method's own keyword options (`registry.Method.
      options`), e.g. `dict(power=1.0)` for coala's weighting power.
    auto_mu_rule: the μ rule of `auto_mu` (`MU_RULES`).
    sensitivity: for allocation 'fisher': {layer: `sensitivity.Energy` or a
      float weight}. If None it is measured on `batches` by one backward pass
      of next-token cross-entropy (`sensitivity.output_gradient_energy`;
      needs `model(batch)` to return logits).
    mode: 'one_shot' (every layer calibrated on the dense model, one pass) or
      'sequential' (block by block, each block calibrated on the outputs of
      the already-compressed blocks before it; needs `model.embed(batch)` and
      a list `model.layers` of blocks mapping hidden states to hidden states,
      and keeps the calibration hidden states in memory).
    include, exclude: fnmatch patterns on dotted layer paths.
    call: how to run the model on one batch (one-shot mode).
    mesh: if given, calibration is data-parallel over its 'data' axis: each
      device folds its share of every batch, one tree reduction at the end
      (`calibration.calibrate`); same statistics up to rounding.
    stats_dtype: accumulation dtype of the calibration statistics: float32,
      or float64 (needs 64-bit JAX) for the 'k_star' reference, whose case
      split (ties, numerical rank) must resolve what float32 R cannot. The
      other methods cast float64 statistics to float32 (their compute
      dtype) before solving.
    checkpoint_dir: if given, calibration statistics and every finished
      layer are saved there as they complete, and a rerun with the same
      model and options resumes without recomputing them (`store.RunStore`).
    data_id: JSON-able name of the calibration data, part of the
      checkpoint's fingerprint. None (default): the batches are
      fingerprinted by content (SHA-256 as they are read,
      `store.fingerprinted`), so a checkpoint of other data is refused.

  Returns:
    A report: kept_ratio (over the chosen layers), model_ratio (whole model
    parameters after / before), seconds per phase, and per layer: rank (None:
    kept dense), rel_err = ||X(K−K')||/||XK||, data_rank (numerical rank of
    the calibration inputs), tokens, and the method's
    retries/eps/failed/nonfinite.
  """
  check_options(
      ratio=ratio,
      method=method,
      mu=mu,
      auto_mu=auto_mu,
      allocation=allocation,
      mu_rule=mu_rule,
      mode=mode,
      auto_mu_rule=auto_mu_rule,
      method_options=method_options,
  )
  stats_dtype = streaming.check_dtype(stats_dtype)
  shapes = surgery.select_linears(model, include, exclude)
  if ratio < 1:  # an infeasible budget fails before any calibration
    allocation_lib.check_budget(shapes, ratio)
  measure = allocation in NEEDS_SENSITIVITY and sensitivity is None
  if mode == 'sequential':
    _check_sequential(model, shapes)
  if mode == 'sequential' or measure:
    batches = list(batches)  # read twice: keep them
  unhandled = surgery.unhandled_layers(model, include, exclude)
  kernels = {n: surgery.kernel_matrix(model, n) for n in shapes}
  params_before = count_params(model)
  store = None
  if checkpoint_dir is not None:
    store = store_lib.RunStore(
        checkpoint_dir,
        dict(
            kernels=store_lib.fingerprint_arrays(kernels),
            method=method,
            ratio=ratio,
            mu=mu,
            mu_rule=mu_rule,
            auto_mu=auto_mu,
            allocation=allocation,
            mode=mode,
            data=data_id,
            method_options=dict(method_options or {}),
            auto_mu_rule=auto_mu_rule,
            stats_dtype=stats_dtype.name,
        ),
    )
  bind = lambda: None
  if store is not None and data_id is None:  # the data's own fingerprint
    reiterable = iter(batches) is not batches
    batches = store_lib.fingerprinted(batches)
    bind = lambda: store.bind_data(batches.hexdigest())
    if reiterable or store.has_stats():  # checked before anything loads
      bind()
  want = registry.get(method).want
  seconds, resumed = {}, dict(stats=False)
  t = time.perf_counter()
  stats = None
  if mode == 'one_shot' or allocation != 'uniform':
    stats = _one_shot_stats(
        model,
        batches,
        shapes,
        call=call,
        store=store,
        mesh=mesh,
        dtype=stats_dtype,
        resumed=resumed,
        bind=bind,
        want=want if mode == 'one_shot' else stats_lib.Want(),
    )
  seconds['calibrate'] = time.perf_counter() - t
  if measure:
    t = time.perf_counter()
    sensitivity = sensitivity_lib.output_gradient_energy(model, batches, shapes)
    seconds['sensitivity'] = time.perf_counter() - t
  if mode == 'one_shot':
    report = compress_from_stats(
        model,
        stats,
        ratio=ratio,
        method=method,
        mu=mu,
        mu_rule=mu_rule,
        auto_mu=auto_mu,
        allocation=allocation,
        store=store,
        method_options=method_options,
        auto_mu_rule=auto_mu_rule,
        sensitivity=sensitivity,
    )
    report['seconds'] = dict(seconds, **report['seconds'])
    report['stats_resumed'] = resumed['stats']
    report['unhandled'] = unhandled
    return report
  t = time.perf_counter()
  ranks = assign_ranks(
      shapes,
      kernels,
      stats,
      ratio=ratio,
      allocation=allocation,
      method=method,
      method_options=method_options,
      sensitivity=sensitivity,
  )
  seconds['allocate'] = time.perf_counter() - t
  t = time.perf_counter()
  solve = functools.partial(
      factorize_layers,
      method=method,
      mu=mu,
      mu_rule=mu_rule,
      auto_mu=auto_mu,
      auto_mu_rule=auto_mu_rule,
      method_options=method_options,
      store=store,
  )
  solved = _sequential(
      model,
      batches,
      kernels,
      ranks,
      solve=solve,
      want=want,
      seconds=seconds,
      mesh=mesh,
      dtype=stats_dtype,
  )
  seconds['solve'] = (
      time.perf_counter() - t - seconds.get('calibrate_sequential', 0.0)
  )
  report = make_report(
      shapes,
      ranks,
      solved,
      seconds=seconds,
      params_before=params_before,
      params_after=count_params(model),
  )
  report['stats_resumed'] = resumed['stats']
  report['unhandled'] = unhandled
  return report


def compress_from_stats(
    model: nnx.Module,
    stats: Mapping[str, stats_lib.LayerStats],
    *,
    ratio: float,
    method: str = 'coala',
    mu: float = 0.0,
    mu_rule: str = 'energy',
    auto_mu: float = 0.0,
    allocation: str = 'uniform',
    store: store_lib.RunStore | None = None,
    method_options: Mapping[str, Any] | None = None,
    auto_mu_rule: str = 'energy',
    sensitivity: Mapping[str, Any] | None = None,
    full: dict | None = None,
) -> dict[str, Any]:
  """Compresses the layers named in `stats` in place, from their statistics.

  The one-shot pipeline after calibration: allocate ranks, solve, swap in
  factored layers, report. Every method sees exactly the statistics it is
  given, so a sweep calibrates once and compresses copies:

      stats = calibration.layer_stats(dense, batches, layers,
                                      want=registry.get('corda').want)
      model = nnx.clone(dense)
      report = compress_from_stats(model, stats, ratio=0.8, method='corda')

  Args:
    model: the NNX model whose layers `stats` names (changed in place).
    stats: {layer path: LayerStats of its calibration input}, with what the
      method needs (`registry.get(method).needs`).
    ratio, method, mu, mu_rule, auto_mu, allocation: as in `compress`.
    store: a `store.RunStore` to save finished layers to and resume from.
    method_options, auto_mu_rule: as in `compress`.
    sensitivity: as in `compress`; required (not measured here) for
      allocation 'fisher'.
    full: a dict kept between calls on the same model and statistics (a
      sweep over ratios): each layer's error curve and, for nested methods,
      its full-rank factors are computed once (`factorize_layers`).

  Returns:
    The report `compress` returns (seconds: allocate, solve).
  """
  check_options(
      ratio=ratio,
      method=method,
      mu=mu,
      auto_mu=auto_mu,
      allocation=allocation,
      mu_rule=mu_rule,
      mode='one_shot',
      auto_mu_rule=auto_mu_rule,
      method_options=method_options,
  )
  kernels = {n: surgery.kernel_matrix(model, n) for n in stats}
  shapes = {n: tuple(k.shape) for n, k in kernels.items()}
  params_before = count_params(model)
  seconds = {}
  t = time.perf_counter()
  ranks = assign_ranks(
      shapes,
      kernels,
      stats,
      ratio=ratio,
      allocation=allocation,
      method=method,
      method_options=method_options,
      sensitivity=sensitivity,
      cache=full,
  )
  seconds['allocate'] = time.perf_counter() - t
  t = time.perf_counter()
  solved = factorize_layers(
      kernels,
      stats,
      ranks,
      method=method,
      mu=mu,
      mu_rule=mu_rule,
      auto_mu=auto_mu,
      auto_mu_rule=auto_mu_rule,
      method_options=method_options,
      store=store,
      full=full,
  )
  apply_factors(model, solved)
  seconds['solve'] = time.perf_counter() - t
  return make_report(
      shapes,
      ranks,
      solved,
      seconds=seconds,
      params_before=params_before,
      params_after=count_params(model),
  )


def _one_shot_stats(
    model,
    batches,
    shapes,
    *,
    call,
    store,
    want,
    mesh,
    dtype,
    resumed,
    bind=lambda: None,
):
  """Every layer's statistics from one pass over the dense model.

  `bind()` ties the store to the data once they have been read (a one-pass
  stream is fingerprinted on the way), before anything is saved.
  """
  if store is not None and store.has_stats():
    group_stats, group_of = store.load_stats()
    resumed['stats'] = True
    logging.warning(
        'Resumed: calibration statistics of %d layers loaded ' 'from %s.',
        len(shapes),
        store.directory,
    )
  else:
    group_stats, group_of = calibration.calibrate(
        model, batches, shapes, want=want, call=call, mesh=mesh, dtype=dtype
    )
    if store is not None:
      bind()
      store.save_stats(group_stats, group_of)
  return {n: group_stats[group_of[n]] for n in shapes}


def _check_sequential(model: nnx.Module, shapes) -> None:
  if not (
      callable(getattr(model, 'embed', None))
      and isinstance(getattr(model, 'layers', None), (list, nnx.List))
  ):
    raise ValueError(
        "mode='sequential' needs model.embed(batch) and a list "
        f'model.layers of blocks; {type(model).__name__} has '
        'not both. Use the default one_shot mode.'
    )
  outside = [n for n in shapes if not n.startswith('layers.')]
  if outside:
    raise ValueError(
        f"mode='sequential' compresses layers inside "
        f'model.layers only; also selected: {outside[:3]}.'
    )


@functools.partial(jax.jit, static_argnums=0)
def _run_block(graphdef, state, h):
  return nnx.merge(graphdef, state)(h)


def _sequential(
    model, batches, kernels, ranks, *, solve, want, seconds, mesh, dtype
):
  """Block by block: calibrate on compressed predecessors, solve, swap."""
  if not batches:
    raise ValueError('The calibration stream is empty: no batch to fold.')
  hs = [model.embed(b) for b in batches]  # float32[batch, seq, hidden]
  solved, spent = {}, 0.0
  for i, block in enumerate(model.layers):
    prefix = f'layers.{i}.'
    names = [n for n in kernels if n.startswith(prefix)]
    if names:
      t = time.perf_counter()
      group_stats, group_of = calibration.calibrate(
          block,
          hs,
          [n[len(prefix) :] for n in names],
          want=want,
          call=lambda m, h: m(h),
          mesh=mesh,
          dtype=dtype,
          desc=f'calibrate block {i}',
      )
      spent += time.perf_counter() - t
      stats = {n: group_stats[group_of[n[len(prefix) :]]] for n in names}
      done = solve({n: kernels[n] for n in names}, stats, ranks)
      apply_factors(model, done)
      solved.update(done)
    graphdef, state = nnx.split(block)
    hs = [_run_block(graphdef, state, h) for h in hs]
  seconds['calibrate_sequential'] = spent
  return solved


def apply_factors(model: nnx.Module, solved: Mapping[str, dict]) -> None:
  """Swaps each solved layer for a FactoredLinear, in place."""
  surgery.apply_factors(model, solved)


def make_report(
    shapes, ranks, solved, *, seconds, params_before, params_after
) -> dict[str, Any]:
  """The report `compress` returns; warns once about undetermined layers."""
  layers, short = {}, []
  for name, (d_in, d_out) in shapes.items():
    row = dict(d_in=d_in, d_out=d_out, rank=ranks[name])
    if name in solved:
      row.update({k: v for k, v in solved[name].items() if k not in ('a', 'b')})
      row['insufficient_data'] = row['data_rank'] < row['rank']
      if row['insufficient_data']:
        short.append(f"{name} ({row['data_rank']} < {row['rank']})")
    layers[name] = row
  if short:
    remedied = all(layers[n.split(' ')[0]].get('auto_mu') for n in short)
    logging.warning(
        '%d layer(s) have calibration inputs of numerical rank below their '
        'rank, so the data cannot determine them: %s%s. %s',
        len(short),
        ', '.join(short[:5]),
        ', …' if len(short) > 5 else '',
        'They were regularized (auto_mu).'
        if remedied
        else 'Use more calibration tokens, or a method with a ridge term '
        f'({", ".join(registry.names(takes_mu=True))}) with mu > 0 or '
        'auto_mu > 0.',
    )
  unknown = [
      n
      for n, l in layers.items()
      if 'rel_err' in l and not np.isfinite(l['rel_err'])
  ]
  if unknown:
    logging.warning(
        '%d layer(s) have a non-finite relative error (non-finite factors or '
        'statistics): %s%s.',
        len(unknown),
        ', '.join(unknown[:5]),
        ', …' if len(unknown) > 5 else '',
    )
  return dict(
      kept_ratio=allocation_lib.kept_ratio(shapes, ranks),
      model_ratio=params_after / params_before,
      seconds=seconds,
      layers=layers,
  )
