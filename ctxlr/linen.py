"""Compress Linen models, and Linen models wrapped by `nnx.bridge.ToNNX`.

    params, report = ctxlr.linen.compress(model.apply, params, batches,
                                          ratio=0.5)
    with ctxlr.linen.factored():                   # factored layers compute
      logits = model.apply({'params': params}, ids)

Calibration runs the model under `nn.intercept_methods`: every `nn.Dense`
and `nn.DenseGeneral` call (inside `nn.scan`, `nn.remat` and other lifted
transforms too) sends the rows of its matrix view (`surgery.input_as_matrix`)
to the host, where they are folded into float64 statistics; nothing in the
model changes. So does every two-operand `jnp.einsum('in,ker->out', x, w)`
(either operand order) whose `w` is, as is, a param of a module being
called: an einsum layer of any Linen module (`surgery.MatrixView` 'einsum':
the kernel letters shared with `x` are its rows, those of the output its
columns). A layer of a scanned stack (kernel `[L, d_in, d_out]`) gets one R
per stacked kernel, named `path[i]`. Layers are named by their Linen module
path joined with dots (`model.layers.0.self_attn.q_proj`), an einsum layer by
its param's path (`layer_0.attn.q_einsum.w`), so a name never holds a `/`.
Modules with matrix params that are neither are listed as unhandled
(`find_layers`), as are those the trace never saw called: a module inside
`nn.jit` runs no Python once that jit has a cached trace, so run such a
model's apply under `jax.disable_jit()` for ctxlr.

Surgery is a params transform: a factored layer's `{'kernel'}` becomes
`{'a', 'b'}` (its bias kept), an einsum layer's param `w` becomes
`w: {'a', 'b'}`, so the params really shrink. Under `factored()`, each
`nn.Dense` / `nn.DenseGeneral` whose params hold `a` computes
`(x a) b + bias` with its own `dtype`, `precision`, `dot_general` and
`promote_dtype`; a module whose param is `{'a', 'b'}` runs its own code, and
its einsum with that param is done as two (`surgery.contract`); the others
run as before. `FactoredDense` is the same layer as a Linen module, for
models that take a dense class to build with. For an `nnx.bridge.ToNNX`
model, `compress_bridged` does all of it in place.
"""

import contextlib
import dataclasses
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
# Modules whose kernel goes through other code (flax's Einsum promotes its
# dtype) on its way to the einsum: `factored()` could not hand it factors.
_NOT_EINSUM_LAYER = (nn.Einsum,)


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


def _as_matrix(kernel: jax.Array, view: surgery.MatrixView) -> jax.Array:
  """A kernel as float[*stack, d_in, d_out] (an einsum's letters reordered)."""
  if view.kind == 'einsum':
    _, ker, _, contracted, outputs = surgery._parse_einsum(view.einsum_str)  # pylint: disable=protected-access
    s = len(view.stack)
    order = [ker.index(c) + s for c in contracted + outputs]
    kernel = jnp.transpose(kernel, list(range(s)) + order)
  return kernel.reshape(view.stack + (view.d_in, view.d_out))


def _kernel(params: Mapping[str, Any], module: str, view) -> Any:
  """A layer's kernel: a Dense's `kernel`, an einsum layer's param itself."""
  node = _node(params, _path(module))
  return node if view.kind == 'einsum' else node['kernel']


def kernel_matrix(
    variables: Mapping[str, Any],
    name: str,
    views: Mapping[str, surgery.MatrixView],
) -> jax.Array:
  """Layer `name`'s kernel as its matrix view, float[d_in, d_out]."""
  module, index = surgery.split_name(name)
  view = views[module]
  kernel = _as_matrix(
      jnp.asarray(_kernel(_params_of(variables), module, view)), view
  )
  return kernel[index] if index else kernel


# ---------------------------------------------------------------- einsum ---

_EINSUM = jnp.einsum
_einsum_handlers: list[Callable] = []


def _einsum(*args, **kwargs):
  """`jnp.einsum` while ctxlr traces: the first handler that takes it."""
  for handler in reversed(_einsum_handlers):
    out = handler(args, kwargs)
    if out is not NotImplemented:
      return out
  return _EINSUM(*args, **kwargs)


@contextlib.contextmanager
def _hooked_einsum(handler: Callable):
  """Within the block, `jnp.einsum(...)` calls go by `handler(args, kwargs)`
  first (NotImplemented: the plain einsum). Not thread-safe."""
  _einsum_handlers.append(handler)
  jnp.einsum = _einsum
  try:
    yield
  finally:
    _einsum_handlers.remove(handler)
    if not _einsum_handlers:
      jnp.einsum = _EINSUM


def _split_einsum(args: tuple, is_kernel: Callable) -> tuple | None:
  """('in,ker->out', x, kernel) of a two-operand string einsum one of whose
  operands `is_kernel`, else None."""
  if len(args) != 3 or not isinstance(args[0], str):
    return None
  eqn, p, q = args[0].replace(' ', ''), args[1], args[2]
  if is_kernel(q):
    return eqn, p, q
  if is_kernel(p):
    lhs, arrow, out = eqn.partition('->')
    first, _, second = lhs.partition(',')
    return f'{second},{first}{arrow}{out}', q, p
  return None


def _einsum_view(
    eqn: str, stored: tuple[int, ...], called: tuple[int, ...]
) -> surgery.MatrixView:
  """The matrix view of an einsum layer: its kernel stored with shape
  `stored` ([*stack, *kernel]), given to the einsum as `called`."""
  _, ker, _, contracted, outputs = surgery._parse_einsum(eqn)  # pylint: disable=protected-access
  s = len(stored) - len(called)
  if len(called) != len(ker) or s < 0 or tuple(stored[s:]) != tuple(called):
    raise ValueError(
        f'kernel shape {called} (stored {stored}) does not fit '
        f'subscripts {"".join(ker)!r}'
    )
  size = dict(zip(ker, called))
  return surgery.MatrixView(
      'einsum',
      tuple(size[c] for c in contracted),
      tuple(size[c] for c in outputs),
      tuple(stored[:s]),
      einsum_str=eqn,
  )


def _rows_key(view: surgery.MatrixView) -> tuple:
  """What, beyond the input array, fixes the rows a call multiplies."""
  if view.kind != 'einsum':
    return (view.kind, view.in_shape, view.axis, view.stack)
  inp, _, _, contracted, _ = surgery._parse_einsum(view.einsum_str)  # pylint: disable=protected-access
  roles = tuple(
      str(contracted.index(t))
      if t in contracted
      else ('...' if t == '...' else '-')
      for t in inp
  )
  return ('einsum', view.in_shape, roles, view.stack)


# ---------------------------------------------------------- interception ---


class _Trace:
  """What the Dense calls of one trace did (discovery) or must do (folding)."""

  def __init__(self, params, fold: frozenset[str] = frozenset(), host=None):
    self.params, self.fold, self.host = params, fold, host
    self.views: dict[str, surgery.MatrixView] = {}
    self.calls: dict[str, list[tuple]] = {}
    self.kinds: dict[str, str] = {}  # every module called: its type
    self.why: dict[str, str] = {}  # einsum layers not seen as one matrix
    self._active: list[nn.Module] = []  # modules in a call, innermost last
    self._keep = []

  @contextlib.contextmanager
  def tracing(self):
    with nn.intercept_methods(self.interceptor):
      with _hooked_einsum(self.einsum):
        yield

  def interceptor(self, next_fun, args, kwargs, context):
    module = context.module
    if module.scope is None or context.method_name == 'setup':
      return next_fun(*args, **kwargs)
    path = tuple(str(p) for p in module.scope.path)
    name = layer_name(path)
    self.kinds.setdefault(name, type(module).__name__)
    if context.method_name == '__call__' and isinstance(module, HANDLED):
      if args:
        if name not in self.views:
          try:
            kernel = _node(self.params, path)['kernel']
            self.views[name] = _view(module, tuple(np.shape(kernel)))
          except (KeyError, TypeError, ValueError):
            self.views[name] = None
        self._see(name, args[0])
      return next_fun(*args, **kwargs)
    self._active.append(module)
    try:
      return next_fun(*args, **kwargs)
    finally:
      self._active.pop()

  def _param_of(self, operand) -> tuple[nn.Module, str] | None:
    """(module, param name) if `operand` is a param of a module in a call."""
    for module in reversed(self._active):
      if isinstance(module, _NOT_EINSUM_LAYER):
        continue
      for key, value in module.variables.get('params', {}).items():
        if not isinstance(value, Mapping) and meta.unbox(value) is operand:
          return module, key
    return None

  def einsum(self, args, kwargs):
    del kwargs
    split = _split_einsum(args, lambda v: self._param_of(v) is not None)
    if split is None:
      return NotImplemented
    eqn, x, kernel = split
    module, key = self._param_of(kernel)
    path = tuple(str(p) for p in module.scope.path) + (key,)
    name = layer_name(path)
    if name not in self.views:
      try:
        stored = tuple(np.shape(_node(self.params, path)))
        self.views[name] = _einsum_view(eqn, stored, tuple(np.shape(kernel)))
      except (KeyError, TypeError, ValueError) as e:
        self.views[name] = None
        self.why[name] = f'{type(module).__name__}: einsum {eqn!r}: {e}'
    self._see(name, x)
    return NotImplemented

  def _see(self, name: str, x: jax.Array) -> None:
    """One call of layer `name` on `x`: folded, or its signature noted."""
    view = self.views[name]
    if view is None:
      return
    if self.fold:
      if name in self.fold:
        io_callback(
            functools.partial(self.host.receive, name),
            None,
            surgery.input_as_matrix(dataclasses.replace(view, stack=()), x),
            ordered=True,
        )
    else:
      self._keep.append(x)
      self.calls.setdefault(name, []).append((id(x),) + _rows_key(view))

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
    with trace.tracing():
      apply(v, b)

  jax.eval_shape(run, variables, batch)
  return trace


def _abstract(batch: Any) -> tuple:
  leaves, treedef = jax.tree.flatten(batch)
  return treedef, tuple((np.shape(l), jnp.result_type(l)) for l in leaves)


def find_layers(
    apply: Callable, variables: Mapping[str, Any], example: Any
) -> tuple[dict[str, surgery.MatrixView], dict[str, str]]:
  """The Dense and einsum layers one call `apply(variables, example)` reaches.

  Returns:
    (handled, unhandled): `handled[name]` is the MatrixView of each
    `nn.Dense` / `nn.DenseGeneral` (by module path) and einsum layer (by
    param path); `unhandled[path]` says why each other module whose own
    params hold a matrix is not one (embeddings and norms aside), a module
    the trace never saw called included.
  """
  trace = _discover(apply, variables, example)
  handled = {n: v for n, v in trace.views.items() if v is not None}
  unhandled = {
      n: trace.why.get(n, f'{trace.kinds.get(n)}: cannot be seen as one matrix')
      for n, v in trace.views.items()
      if v is None
  }
  skip = {t.__name__ for t in _NOT_DENSE}
  for path, node in _module_nodes(_params_of(variables)):
    name = layer_name(path)
    own = sorted(
        k
        for k, v in node.items()
        if not isinstance(v, Mapping)
        and np.ndim(v) >= 2
        and layer_name(path + (k,)) not in trace.views
    )
    kind = trace.kinds.get(name)
    if not own or name in trace.views or kind in skip:
      continue
    if kind is None:
      kind = (
          'not seen called (inside nn.jit, whose cached trace runs no '
          'Python? run apply under jax.disable_jit())'
      )
    unhandled[name] = f'{kind}: params {", ".join(own)}'
  return handled, unhandled


def _module_nodes(params: Mapping[str, Any], path: tuple[str, ...] = ()):
  """(path, node) for every dict of the params tree, the root first."""
  yield path, params
  for key, value in params.items():
    if isinstance(value, Mapping):
      yield from _module_nodes(value, path + (str(key),))


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
          f'Pattern {pattern!r} matches no nn.Dense, '
          f'nn.DenseGeneral or einsum layer; layers are e.g. '
          f'{sorted(every)[:4]}; not handled: '
          f'{dict(sorted(unhandled.items())[:4])}.'
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
    with trace.tracing():
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
        f'Layers {never} were not called by the model during '
        'calibration (inside nn.jit, whose cached trace runs no Python? run '
        'apply under jax.disable_jit()).'
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
    views: {layer: MatrixView} (`find_layers`).

  Returns:
    New params (plain dicts): `kernel` replaced by `a` [*stack, d_in, rank]
    and `b` [*stack, rank, d_out] in the kernel's dtype, the bias kept; an
    einsum layer's param replaced by `{'a': a, 'b': b}`.
  """
  by_module: dict[str, dict] = {}
  for name, f in factors.items():
    a, b = (f['a'], f['b']) if isinstance(f, Mapping) else f
    module, index = surgery.split_name(name)
    by_module.setdefault(module, {})[index] = (jnp.asarray(a), jnp.asarray(b))
  out = jax.tree.map(lambda x: x, _unfreeze(params))
  for module, parts in by_module.items():
    view = views[module]
    path = _path(module)
    if view.kind == 'einsum':  # the param itself becomes {a, b}
      node, key = _node(out, path[:-1]), path[-1]
    else:
      node, key = _node(out, path), 'kernel'
    kernel = jnp.asarray(meta.unbox(node[key]))
    matrix = lambda k=kernel, v=view: _as_matrix(k, v)
    a, b = surgery.stack_factors(module, view, parts, matrix)
    a, b = a.astype(kernel.dtype), b.astype(kernel.dtype)
    if view.kind == 'einsum':
      node[key] = {'a': a, 'b': b}
    else:
      del node['kernel']
      node['a'], node['b'] = a, b
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


class _Factors:
  """A factored einsum kernel as its module's code gets it from `param`:
  the kernel's `shape` and `dtype`, its factors `a`, `b`."""

  def __init__(self, a: jax.Array, b: jax.Array, like: Any):
    self.a, self.b = a, b
    self.shape, self.dtype = tuple(like.shape), like.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)


def _is_factors(value: Any) -> bool:
  return (
      isinstance(value, Mapping)
      and set(value) == {'a', 'b'}
      and not any(isinstance(value[k], Mapping) for k in 'ab')
  )


def _factored_einsum(args, kwargs):
  split = _split_einsum(args, lambda v: isinstance(v, _Factors))
  if split is None:
    return NotImplemented
  eqn, x, f = split
  view = _einsum_view(eqn, f.shape, f.shape)
  kwargs = dict(kwargs)
  precision = kwargs.pop('precision', None)
  out_sharding = kwargs.pop('out_sharding', None)
  return surgery.contract(
      view,
      x,
      f.a,
      f.b,
      None,
      einsum_op=_EINSUM,
      precision=precision,
      out_sharding=out_sharding,
      **kwargs,
  )


def _factored_interceptor(next_fun, args, kwargs, context):
  module = context.module
  if module.scope is None or context.method_name == 'setup':
    return next_fun(*args, **kwargs)
  if (
      context.method_name == '__call__'
      and isinstance(module, HANDLED)
      and module.has_variable('params', 'a')
  ):
    return _factored_call(module, args[0])
  factors = {
      k: v
      for k, v in module.variables.get('params', {}).items()
      if _is_factors(v)
  }
  if not factors or 'param' in vars(module):  # none, or patched already
    return next_fun(*args, **kwargs)
  original = module.param

  def param(name, init_fn, *init_args, **init_kwargs):
    if name not in factors:
      return original(name, init_fn, *init_args, **init_kwargs)
    init_kwargs.pop('unbox', None)
    like = jax.eval_shape(
        lambda: init_fn(jax.random.key(0), *init_args, **init_kwargs)
    )
    f = factors[name]
    return _Factors(meta.unbox(f['a']), meta.unbox(f['b']), like)

  object.__setattr__(module, 'param', param)
  try:
    return next_fun(*args, **kwargs)
  finally:
    object.__delattr__(module, 'param')


@contextlib.contextmanager
def factored():
  """Within the block, Dense layers whose params hold `a`, `b` compute
  factored (`factor_params`), and so does each einsum with a param that is
  `{'a', 'b'}`; every other module runs as before."""
  with nn.intercept_methods(_factored_interceptor):
    with _hooked_einsum(_factored_einsum):
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
  """Compresses a Linen model's Dense and einsum layers: params and a report.

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
    with `unhandled` (chosen modules of kinds not factored, or not seen
    called).
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
