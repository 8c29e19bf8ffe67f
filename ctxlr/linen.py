"""Compress Linen models, and Linen models wrapped by `nnx.bridge.ToNNX`.

    params, report = ctxlr.linen.compress(model.apply, params, batches,
                                          ratio=0.5)
    with ctxlr.linen.factored():                   # factored layers compute
      logits = model.apply({'params': params}, ids)

Calibration runs the model under `nn.intercept_methods`: every `nn.Dense`
and `nn.DenseGeneral` call (inside `nn.scan`, `nn.remat` and other lifted
transforms too) sends the rows of its matrix view (`surgery.input_as_matrix`)
to the host, where they are folded into float64 statistics; nothing in the
model changes. A layer of a scanned stack (kernel `[L, d_in, d_out]`) gets
one R per stacked kernel, named `path[i]`. Layers are named by their Linen
module path joined with dots (`model.layers.0.self_attn.q_proj`), so a name
never holds a `/`.

Surgery is a params transform: a factored layer's `{'kernel'}` becomes
`{'a', 'b'}` (its bias kept), so the params really shrink. Under
`factored()`, each `nn.Dense` / `nn.DenseGeneral` whose params hold `a`
computes `(x a) b + bias` with its own `dtype`, `precision`, `dot_general`
and `promote_dtype`; the others run as before. `FactoredDense` is the same
layer as a Linen module, for models that take a dense class to build with.
For an `nnx.bridge.ToNNX` model, `compress_bridged` does all of it in place.
"""

import contextlib
import fnmatch
import functools
from typing import Any, Callable, Iterable, Mapping

from flax import linen as nn
from flax import nnx
from flax.core import meta
from flax.nnx.bridge import variables as bridge_variables
import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np
import tqdm

from ctxlr import calibration
from ctxlr import stats as stats_lib
from ctxlr import surgery

HANDLED = (nn.Dense, nn.DenseGeneral)
# Linen modules whose params are not a dense layer's.
_NOT_DENSE = (nn.Embed, nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm)


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, Iterable) else (x,)


def layer_name(path: Iterable[str]) -> str:
  """('model', 'layers', '0', 'q_proj') -> 'model.layers.0.q_proj'."""
  return '.'.join(str(p) for p in path)


def _path(name: str) -> tuple[str, ...]:
  return tuple(name.split('.')) if name else ()


def _node(params: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  node = params
  for key in path:
    node = node[key]
  return node


def _view(
    module: nn.Module, kernel_shape: tuple[int, ...]
) -> surgery.MatrixView:
  """The matrix view of a Linen Dense / DenseGeneral with this kernel."""
  if isinstance(module, nn.Dense):
    n_in, n_out, kind, axis = 1, 1, 'linear', ()
  elif isinstance(module, nn.DenseGeneral):
    if _tuple(module.batch_dims):
      raise ValueError(
          f'batch_dims {module.batch_dims} (one matrix per batch ' 'index)'
      )
    axis = _tuple(module.axis)
    n_in, n_out, kind = (
        len(axis),
        len(_tuple(module.features)),
        ('linear_general'),
    )
  else:
    raise ValueError(
        f'a {type(module).__name__}, not one of '
        f'{[t.__name__ for t in HANDLED]}'
    )
  s = len(kernel_shape) - n_in - n_out
  if s < 0:
    raise ValueError(
        f'kernel shape {kernel_shape} has fewer than {n_in + n_out}' ' axes'
    )
  return surgery.MatrixView(
      kind,
      tuple(kernel_shape[s : s + n_in]),
      tuple(kernel_shape[s + n_in :]),
      tuple(kernel_shape[:s]),
      axis=axis,
  )


def _params_of(variables: Mapping[str, Any]) -> Mapping[str, Any]:
  return meta.unbox(variables['params'])


def kernel_matrix(
    variables: Mapping[str, Any],
    name: str,
    views: Mapping[str, surgery.MatrixView],
) -> jax.Array:
  """Layer `name`'s kernel as its matrix view, float[d_in, d_out]."""
  module, index = surgery.split_name(name)
  view = views[module]
  kernel = jnp.asarray(_node(_params_of(variables), _path(module))['kernel'])
  kernel = kernel.reshape(view.stack + (view.d_in, view.d_out))
  return kernel[index] if index else kernel


# ---------------------------------------------------------- interception ---


class _Trace:
  """What the Dense calls of one trace did (discovery) or must do (folding)."""

  def __init__(self, params, fold: frozenset[str] = frozenset(), host=None):
    self.params, self.fold, self.host = params, fold, host
    self.views: dict[str, surgery.MatrixView] = {}
    self.calls: dict[str, list[tuple]] = {}
    self.kinds: dict[str, str] = {}  # every module called: its type
    self._keep = []

  def interceptor(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or module.scope is None:
      return next_fun(*args, **kwargs)
    path = tuple(str(p) for p in module.scope.path)
    name = layer_name(path)
    self.kinds.setdefault(name, type(module).__name__)
    if isinstance(module, HANDLED) and args:
      x = args[0]
      if name not in self.views:
        try:
          kernel = _node(self.params, path)['kernel']
          self.views[name] = _view(module, tuple(np.shape(kernel)))
        except (KeyError, TypeError, ValueError):
          self.views[name] = None
      view = self.views[name]
      if view is not None:
        call_view = surgery.MatrixView(
            view.kind, view.in_shape, view.out_shape, (), view.axis
        )
        if self.fold:
          if name in self.fold:
            io_callback(
                functools.partial(self.host.receive, name),
                None,
                surgery.input_as_matrix(call_view, x),
                ordered=True,
            )
        else:
          self._keep.append(x)
          key = (id(x), view.kind, view.in_shape, view.axis, view.stack)
          self.calls.setdefault(name, []).append(key)
    return next_fun(*args, **kwargs)

  def signatures(self) -> dict[str, tuple]:
    return {n: tuple(c) for n, c in self.calls.items()}


class _Host:
  """float64 statistics folded on the host, one set per folding layer.

  A step's calls arrive in program order (ordered callbacks); a stacked
  layer's calls are assigned to its kernels in scan order: with T calls for
  L stacked kernels, calls j·T/L … (j+1)·T/L − 1 went to kernel j.
  """

  def __init__(
      self,
      groups: calibration._Groups,
      views,  # pylint: disable=protected-access
      want: stats_lib.Want,
  ):
    self.groups, self.views, self.want = groups, views, want
    self.buffer: dict[str, list[np.ndarray]] = {}

  def init(self, name: str) -> dict[str, np.ndarray]:
    view = self.views[name]
    d, stack = view.d_in, view.stack
    s = dict(
        r=np.zeros(stack + (d, d)),
        count=np.zeros(stack, np.int64),
        ok=np.ones(stack, bool),
    )
    if self.want.gram:
      s['gram'] = np.zeros(stack + (d, d))
    if self.want.abs_sum:
      s['abs_sum'] = np.zeros(stack + (d,))
    return s

  def receive(self, name: str, x) -> None:
    self.buffer.setdefault(name, []).append(np.asarray(x, np.float64))

  def flush(self) -> None:
    """Folds the step's calls into their layers' statistics (copy on write)."""
    for name, xs in self.buffer.items():
      view = self.views[name]
      size = int(np.prod(view.stack))
      if len(xs) % size:
        raise ValueError(
            f'Layer {name!r} is stacked {view.stack} but was '
            f'called {len(xs)} times in one step: not a multiple '
            f'of its {size} kernels (one scan over its stack '
            'expected).'
        )
      per = len(xs) // size
      s = {k: v.copy() for k, v in self.groups.stats[name].items()}
      for j, x in enumerate(xs):
        index = np.unravel_index(j // per, view.stack) if view.stack else ()
        s['ok'][index] &= bool(np.isfinite(x).all())
        x = np.where(np.isfinite(x), x, 0.0)
        r = np.linalg.qr(np.concatenate([x, s['r'][index]]), mode='r')
        r = np.pad(r, ((0, view.d_in - r.shape[0]), (0, 0)))
        s['r'][index] = r * np.where(np.diag(r) < 0, -1.0, 1.0)[:, None]
        s['count'][index] += x.shape[0]
        if 'gram' in s:
          s['gram'][index] += x.T @ x
        if 'abs_sum' in s:
          s['abs_sum'][index] += np.abs(x).sum(0)
      self.groups.stats[name] = s
    self.buffer = {}


def _discover(apply: Callable, variables, batch) -> _Trace:
  trace = _Trace(_params_of(variables))

  def run(v, b):
    with nn.intercept_methods(trace.interceptor):
      apply(v, b)

  jax.eval_shape(run, variables, batch)
  return trace


def _abstract(batch: Any) -> tuple:
  leaves, treedef = jax.tree.flatten(batch)
  return treedef, tuple((np.shape(l), jnp.result_type(l)) for l in leaves)


def find_layers(
    apply: Callable, variables: Mapping[str, Any], example: Any
) -> tuple[dict[str, surgery.MatrixView], dict[str, str]]:
  """The Dense layers one call `apply(variables, example)` reaches.

  Returns:
    (handled, unhandled): `handled[module path]` is each `nn.Dense` /
    `nn.DenseGeneral`'s MatrixView; `unhandled[module path]` names the other
    modules called whose own params hold a matrix (embeddings and norms
    aside).
  """
  trace = _discover(apply, variables, example)
  params = _params_of(variables)
  handled = {n: v for n, v in trace.views.items() if v is not None}
  unhandled = {
      n: f'{trace.kinds[n]}: cannot be seen as one matrix'
      for n, v in trace.views.items()
      if v is None
  }
  for name, kind in trace.kinds.items():
    if name in trace.views or kind in {t.__name__ for t in _NOT_DENSE}:
      continue
    try:
      node = _node(params, _path(name))
    except (KeyError, TypeError):
      continue
    own = sorted(
        k
        for k, v in node.items()
        if not isinstance(v, Mapping) and np.ndim(v) >= 2
    )
    if own:
      unhandled[name] = f'{kind}: params {", ".join(own)}'
  return handled, unhandled


def select(
    apply: Callable,
    variables: Mapping[str, Any],
    example: Any,
    include: Iterable[str] = surgery.DEFAULT_INCLUDE,
    exclude: Iterable[str] = surgery.DEFAULT_EXCLUDE,
) -> dict[str, tuple[int, int]]:
  """`surgery.select_linears` for a Linen model: {layer: (d_in, d_out)}.

  Args:
    apply: `apply(variables, batch)` runs the model (e.g. `module.apply`).
    variables: its variables, with 'params'.
    example: one batch, to trace which Dense layers it reaches.
    include, exclude: fnmatch patterns on layer names, as in
      `surgery.select_linears`.

  Raises:
    ValueError: a pattern that matches nothing, or nothing chosen. Chosen
      modules of kinds not handled are named in one logged warning.
  """
  if isinstance(include, str) or isinstance(exclude, str):
    raise ValueError(
        'include and exclude must be sequences of patterns, '
        f'e.g. ({include!r},); got a string.'
    )
  include, exclude = tuple(include), tuple(exclude)
  handled, unhandled = find_layers(apply, variables, example)
  names_of = {m: surgery.stacked_names(m, v.stack) for m, v in handled.items()}
  every = [n for names in names_of.values() for n in names]
  for pattern in include:
    if not any(fnmatch.fnmatchcase(n, pattern) for n in list(names_of) + every):
      raise ValueError(
          f'Pattern {pattern!r} matches no nn.Dense or '
          f'nn.DenseGeneral layer; layers are e.g. '
          f'{sorted(every)[:4]}.'
      )
  chosen = {}
  for module, names in surgery._choose(names_of, include, exclude).items():  # pylint: disable=protected-access
    chosen.update(
        {n: (handled[module].d_in, handled[module].d_out) for n in names}
    )
  if not chosen:
    raise ValueError(
        f'No Dense layer matches include={include} and ' f'exclude={exclude}.'
    )
  skipped = {
      n: why
      for n, why in unhandled.items()
      if surgery._matches(n, include)  # pylint: disable=protected-access
      and not surgery._matches(n, exclude)
  }  # pylint: disable=protected-access
  if skipped:
    surgery.warn_unhandled(skipped)
  return dict(
      sorted(chosen.items(), key=lambda kv: surgery._order(kv[0]))
  )  # pylint: disable=protected-access


def calibrate(
    apply: Callable,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    layers: Iterable[str],
    *,
    want: stats_lib.Want = stats_lib.Want(),
    dtype: Any = jnp.float32,
    desc: str = 'calibrate',
) -> tuple[dict[str, stats_lib.LayerStats], dict[str, str]]:
  """`calibration.calibrate` for a Linen model: (group stats, group_of).

  Each layer's inputs are folded on the host in float64 (then given in
  `dtype`), every call of a layer counted, batches that do not reach a layer
  skipped for it; layers fed the same arrays share one group.

  Args:
    apply: `apply(variables, batch)` runs the model.
    variables: its variables, with 'params'.
    batches: iterable of model inputs.
    layers: names from `select`.
    want: extra statistics for the Gram baselines.
    dtype: the dtype of the returned statistics (float32, or float64 under
      64-bit JAX).
    desc: the progress bar's label.
  """
  layers = list(layers)
  modules = list(dict.fromkeys(surgery.split_name(n)[0] for n in layers))
  groups = calibration._Groups(modules)  # pylint: disable=protected-access
  plans, seen, views = {}, set(), {}
  host = _Host(groups, views, want)

  @functools.partial(jax.jit, static_argnames='fold')
  def step(variables, batch, fold):
    trace = _Trace(_params_of(variables), fold, host)
    with nn.intercept_methods(trace.interceptor):
      apply(variables, batch)

  index = -1
  for index, batch in enumerate(tqdm.tqdm(batches, desc=desc, unit='batch')):
    key = _abstract(batch)
    if key not in plans:
      trace = _discover(apply, variables, batch)
      plans[key] = {m: s for m, s in trace.signatures().items() if m in modules}
      views.update({m: trace.views[m] for m in plans[key]})
    signatures = plans[key]
    seen.update(signatures)
    folding = groups.refine(signatures, host.init)
    step(variables, batch, fold=frozenset(folding))
    jax.effects_barrier()
    host.flush()
    bad = [g for g in folding if not np.all(groups.stats[g]['ok'])]
    if bad:
      sharers = [
          n for n in layers if groups.group_of[surgery.split_name(n)[0]] in bad
      ]
      raise ValueError(
          f'NaN or Inf in the input of layer(s) {sharers} at '
          f'calibration batch {index}.'
      )
  if index < 0:
    raise ValueError('The calibration stream is empty: no batch to fold.')
  never = [n for n in layers if surgery.split_name(n)[0] not in seen]
  if never:
    raise ValueError(
        f'Layers {never} were not called by the model during ' 'calibration.'
    )
  out, group_of = {}, {}
  for name in layers:
    module, index = surgery.split_name(name)
    gid = groups.group_of[module]
    group = f"{gid}[{','.join(map(str, index))}]" if index else gid
    group_of[name] = group
    if group not in out:
      s = groups.stats[gid]
      cast = lambda k: (jnp.asarray(s[k][index], dtype) if k in s else None)  # pylint: disable=cell-var-from-loop
      out[group] = stats_lib.LayerStats(
          r=cast('r'),
          gram=cast('gram'),
          abs_sum=cast('abs_sum'),
          count=int(s['count'][index]),
      )
  return out, group_of


def layer_stats(
    apply: Callable,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    layers: Iterable[str],
    **kwargs,
) -> dict[str, stats_lib.LayerStats]:
  """{layer: LayerStats}: `calibrate` with its groups expanded."""
  layers = list(layers)
  group_stats, group_of = calibrate(apply, variables, batches, layers, **kwargs)
  return {n: group_stats[group_of[n]] for n in layers}


# ----------------------------------------------------------------- surgery ---


def factor_params(
    params: Mapping[str, Any],
    factors: Mapping[str, Any],
    views: Mapping[str, surgery.MatrixView],
) -> dict[str, Any]:
  """A copy of `params` in which each factored layer holds `a`, `b`.

  Args:
    params: the model's 'params' collection.
    factors: {layer: (a, b)} or {layer: dict(a=, b=, …)}, a: float[d_in,
      rank], b: float[rank, d_out]; the layers of a stack are stacked back
      (`surgery.stack_factors`).
    views: {module path: MatrixView} (`find_layers`).

  Returns:
    New params (plain dicts): `kernel` replaced by `a` [*stack, d_in, rank]
    and `b` [*stack, rank, d_out] in the kernel's dtype, the bias kept.
  """
  by_module: dict[str, dict] = {}
  for name, f in factors.items():
    a, b = (f['a'], f['b']) if isinstance(f, Mapping) else f
    module, index = surgery.split_name(name)
    by_module.setdefault(module, {})[index] = (jnp.asarray(a), jnp.asarray(b))
  out = jax.tree.map(lambda x: x, _unfreeze(params))
  for module, parts in by_module.items():
    node = _node(out, _path(module))
    kernel = jnp.asarray(meta.unbox(node['kernel']))
    view = views[module]
    matrix = lambda k=kernel, v=view: k.reshape(v.stack + (v.d_in, v.d_out))
    a, b = surgery.stack_factors(module, view, parts, matrix)
    del node['kernel']
    node['a'], node['b'] = a.astype(kernel.dtype), b.astype(kernel.dtype)
  return out


def _unfreeze(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def _factored_call(module: nn.Module, x: jax.Array) -> jax.Array:
  """A Dense / DenseGeneral with `a`, `b` params: `(x a) b + bias`."""
  get = lambda k: meta.unbox(module.get_variable('params', k))
  a, b = get('a'), get('b')
  bias = get('bias') if module.use_bias else None
  x, a, b, bias = module.promote_dtype(x, a, b, bias, dtype=module.dtype)
  if module.dot_general_cls is not None:
    dot = module.dot_general_cls()
  else:
    dot = module.dot_general or jax.lax.dot_general
  if not isinstance(module, nn.DenseGeneral):  # Dense, FactoredDense
    view = surgery.MatrixView('linear', (a.shape[-2],), (module.features,))
  else:
    axis = _tuple(module.axis)
    in_shape = tuple(x.shape[ax] for ax in sorted(a % x.ndim for a in axis))
    view = surgery.MatrixView(
        'linear_general', in_shape, _tuple(module.features), axis=axis
    )
  return surgery.contract(
      view, x, a, b, bias, dot_general=dot, precision=module.precision
  )


def _factored_interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (
      context.method_name == '__call__'
      and isinstance(module, HANDLED)
      and module.scope is not None
      and module.has_variable('params', 'a')
  ):
    return _factored_call(module, args[0])
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def factored():
  """Within the block, Dense layers whose params hold `a`, `b` compute
  factored (`factor_params`); every other module runs as before."""
  with nn.intercept_methods(_factored_interceptor):
    yield


class FactoredDense(nn.Module):
  """`(x a) b + bias`, a rank-`rank` Linen stand-in for `nn.Dense`.

  Its params are those `factor_params` writes (`a` [d_in, rank], `b`
  [rank, features], `bias`), for models that take the dense class they
  build with.
  """

  features: int
  rank: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  promote_dtype: Callable = nn.dtypes.promote_dtype
  dot_general: Callable | None = None
  dot_general_cls: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    self.param('a', self.kernel_init, (d_in, self.rank), self.param_dtype)
    self.param(
        'b', self.kernel_init, (self.rank, self.features), self.param_dtype
    )
    if self.use_bias:
      self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    return _factored_call(self, x)


class _WithFactors(nn.Module):
  """`inner` on the same params, run under `factored()`."""

  inner: nn.Module

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, *args, **kwargs):
    with factored():
      return self.inner(*args, **kwargs)


# ------------------------------------------------------------------- runs ---


def compress(
    apply: Callable,
    params: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    ratio: float,
    method: str = 'coala',
    allocation: str = 'uniform',
    include: Iterable[str] = surgery.DEFAULT_INCLUDE,
    exclude: Iterable[str] = surgery.DEFAULT_EXCLUDE,
    variables: Mapping[str, Any] | None = None,
    stats_dtype: Any = jnp.float32,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Compresses a Linen model's Dense layers: new params and a report.

  Args:
    apply: `apply(variables, batch)` runs the model (e.g. `module.apply`).
    params: its 'params' collection (not changed).
    batches: calibration inputs (a list: read twice).
    ratio, method, allocation, include, exclude, stats_dtype: as in
      `ctxlr.compress`.
    variables: the other collections, if the model has any.

  Returns:
    (params, report): the factored params (`factor_params`), to apply under
    `factored()`; the report `ctxlr.compress` gives, by Linen layer name,
    with `unhandled` (chosen modules of kinds not factored).
  """
  from ctxlr import pipeline  # pylint: disable=g-import-not-at-top

  batches = list(batches)
  if not batches:
    raise ValueError('The calibration stream is empty: no batch to fold.')
  pipeline.check_options(
      ratio=ratio,
      method=method,
      mu=0.0,
      mu_rule='energy',
      allocation=allocation,
      mode='one_shot',
  )
  variables = dict(variables or {}, params=params)
  handled, unhandled = find_layers(apply, variables, batches[0])
  shapes = select(apply, variables, batches[0], include, exclude)
  from ctxlr import registry  # pylint: disable=g-import-not-at-top

  stats = layer_stats(
      apply,
      variables,
      batches,
      shapes,
      want=registry.get(method).want,
      dtype=stats_dtype,
  )
  kernels = {n: kernel_matrix(variables, n, handled) for n in shapes}
  ranks = pipeline.assign_ranks(
      shapes, kernels, stats, ratio=ratio, allocation=allocation
  )
  solved = pipeline.factorize_layers(kernels, stats, ranks, method=method)
  new = factor_params(params, solved, handled)
  size = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))
  report = pipeline.make_report(
      shapes,
      ranks,
      solved,
      seconds={},
      params_before=size(params),
      params_after=size(new),
  )
  report['unhandled'] = {
      n: w
      for n, w in unhandled.items()
      if surgery._matches(n, tuple(include))  # pylint: disable=protected-access
      and not surgery._matches(n, tuple(exclude))
  }  # pylint: disable=protected-access
  return new, report


def _bridged(model: nnx.bridge.ToNNX) -> tuple[Callable, dict[str, Any]]:
  attrs = {
      k: v
      for k, v in vars(model).items()
      if not k.startswith('to_nnx__') and not k.startswith('_pytree__')
  }
  variables = bridge_variables.nnx_attrs_to_linen_vars(attrs)
  linen_module = model.to_nnx__module
  return (lambda v, b: linen_module.apply(v, b)), variables


def compress_bridged(
    model: nnx.bridge.ToNNX, batches: Iterable[Any], *, ratio: float, **kwargs
) -> dict[str, Any]:
  """`compress` for a Linen model wrapped by `nnx.bridge.ToNNX`, in place.

  The wrapper's params become the factored ones and its Linen module runs
  under `factored()` from then on, so `model(x)` computes the compressed
  model; `nnx.state(model)` holds the factors.

  Returns:
    The report.
  """
  if not isinstance(model, nnx.bridge.ToNNX):
    raise ValueError(
        f'model must be an nnx.bridge.ToNNX; got ' f'{type(model).__name__}.'
    )
  apply, variables = _bridged(model)
  params = variables.pop('params')
  new, report = compress(
      apply, params, batches, ratio=ratio, variables=variables, **kwargs
  )
  attrs = bridge_variables.linen_vars_to_nnx_attrs({'params': new})
  for key in list(vars(model)):
    if (
        not key.startswith('to_nnx__')
        and not key.startswith('_pytree__')
        and key not in attrs
        and isinstance(getattr(model, key), nnx.Param)
    ):
      delattr(model, key)
  for key, value in attrs.items():
    setattr(model, key, nnx.data(value) if isinstance(value, dict) else value)
  if not isinstance(model.to_nnx__module, _WithFactors):
    model.to_nnx__module = _WithFactors(model.to_nnx__module)
  return report
