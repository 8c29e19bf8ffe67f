"""Calibration: run data through a model once, fold each target layer's input.

The chosen layers (`surgery.select_linears`: `nnx.Linear`, `nnx.LinearGeneral`,
`nnx.Einsum`) are temporarily wrapped in taps that hold their statistics as
NNX state. One jitted step runs the model on a batch, and each tap folds its
layer's input, as the rows of the layer's matrix view, into its statistics
where the layer is called (docs/method.md §3): memory is O(Σ d_in²) whatever
the number of tokens and no activation is kept. Because the statistics are
state of the layer's module, they pass through `nnx.scan`, `nnx.vmap` and
`nnx.remat` as the layer's parameters do: a stacked layer gets one R per
stacked kernel, folded inside the scan. A layer called several times per
step folds every call's input; a layer not called on some batch folds
nothing from it (its `count` says how many tokens it saw). Layers fed the
*same* arrays (q/k/v of attention, gate/up of a SwiGLU MLP) are detected
while tracing and share one set of statistics, computed once.
"""

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ctxlr import stats as stats_lib
from ctxlr import surgery
from ctxlr.linalg import qr
from ctxlr.linalg import streaming
from ctxlr.linalg import tsqr

_HIGHEST = jax.lax.Precision.HIGHEST
_RECORDER = contextvars.ContextVar('ctxlr_calibration_recorder', default=None)

Want = stats_lib.Want  # re-exported: what to accumulate besides R


class _Stat(nnx.Param):
  """One statistic held by a tap during calibration.

  A Param, so that transforms whose state rules name Params (such as
  `nnx.scan(in_axes=(nnx.Carry, nnx.StateAxes({nnx.Param: 0, ...: None})))`)
  carry it along with the layer's own weights.
  """


def _fields(want: Want) -> tuple[str, ...]:
  return (
      (('r',) if want.r else ())
      + ('count', 'ok')
      + (('gram',) if want.gram else ())
      + (('abs_sum',) if want.abs_sum else ())
  )


class _Recorder:
  """What the taps do during one trace of the model.

  Without `fold`, records every tapped call's input (the rows of the
  layer's matrix view); `inputs` and `group_of` read them. With `fold`
  (names of taps), those taps fold their inputs into their statistics.
  """

  def __init__(
      self,
      fold: frozenset[str] = frozenset(),
      mask=None,
      mesh=None,
      axis: str = 'data',
  ):
    self.fold, self.mask, self.mesh, self.axis = fold, mask, mesh, axis
    self.calls: dict[str, list[tuple[tuple, jax.Array]]] = {}
    self._keep = []  # keeps ids unique during the trace

  def seen(self, tap: '_Tap', x: jax.Array) -> None:
    xm = surgery.input_as_matrix(tap.view, x)  # f[tokens, d_in]
    if self.fold:
      if tap.name in self.fold:
        _fold(tap, xm, self)
      return
    self._keep.append(x)
    key = (
        id(x),
        tap.view.kind,
        tap.view.in_shape,
        tap.view.axis,
        tap.view.einsum_str,
        tap.view.stack,
    )
    self.calls.setdefault(tap.name, []).append((key, xm))

  def signatures(self) -> dict[str, tuple]:
    """{tap: the identities of its inputs, call by call}."""
    return {n: tuple(k for k, _ in calls) for n, calls in self.calls.items()}

  @property
  def group_of(self) -> dict[str, str]:
    """{layer: the first layer (in call order) fed the same arrays}."""
    first, out = {}, {}
    for name, sig in self.signatures().items():
      out[name] = first.setdefault(sig, name)
    return out

  @property
  def inputs(self) -> dict[str, jax.Array]:
    """{group: its inputs, every call's rows stacked, float[tokens, d]}."""
    return {
        g: jnp.concatenate([x for _, x in self.calls[g]])
        for g in set(self.group_of.values())
    }


class _Tap(nnx.Module):
  """Stands in for a layer during calibration: records, then passes on."""

  def __init__(self, inner: nnx.Module, name: str, stats: nnx.Dict):
    self.inner = inner
    self.name = name
    self.view = surgery.matrix_view(inner)
    self.stats = stats

  def __call__(self, x: jax.Array, *args, **kwargs) -> Any:
    recorder = _RECORDER.get()
    if recorder is not None:
      recorder.seen(self, x)
    return self.inner(x, *args, **kwargs)


def record(run: Callable[[], Any]) -> _Recorder:
  """Runs `run()` (a model call on tapped layers); returns what the taps saw.

  `recorder.inputs[group]` is each distinct input, float[tokens, d] (all
  calls of the layer stacked); `recorder.group_of[layer]` names the first
  layer fed the same arrays. The inputs are those of the trace `run` is
  in: for layers called inside `nnx.scan` / `nnx.vmap` they belong to that
  transform's trace (use `calibrate`, which folds them there).
  """
  recorder = _Recorder()
  token = _RECORDER.set(recorder)
  try:
    run()
  finally:
    _RECORDER.reset(token)
  return recorder


@contextlib.contextmanager
def _recording(recorder: _Recorder):
  token = _RECORDER.set(recorder)
  try:
    yield recorder
  finally:
    _RECORDER.reset(token)


def _placeholder(stack: tuple[int, ...], fields, sharding=None) -> nnx.Dict:
  """Statistics of a tap that folds nothing: empty arrays, stacked."""
  z = jnp.zeros(stack + (0,), jnp.float32)
  if sharding is not None:
    z = jax.device_put(z, sharding)
  return nnx.Dict({f: _Stat(z) for f in fields})


def _modules_of(
    model: nnx.Module, names: Iterable[str]
) -> dict[str, surgery.MatrixView]:
  """{module path: view} of the layers `names` (stacked layers -> module)."""
  out = {}
  for name in names:
    module, index = surgery.split_name(name)
    if module not in out:
      out[module] = surgery.matrix_view(surgery.get_module(model, module))
    stack = out[module].stack
    if len(index) != len(stack) or any(
        not 0 <= i < s for i, s in zip(index, stack)
    ):
      raise ValueError(
          f'Layer {name!r}: {module!r} has stacked axes {stack}; '
          f'name its layers as '
          f'{surgery.stacked_names(module, stack)[0]!r}, ….'
      )
  return out


@contextlib.contextmanager
def _tapped(
    model: nnx.Module,
    views: Mapping[str, surgery.MatrixView],
    fields,
    sharding=None,
):
  originals = {n: surgery.get_module(model, n) for n in views}
  for n, m in originals.items():
    surgery.replace_module(
        model, n, _Tap(m, n, _placeholder(views[n].stack, fields, sharding))
    )
  try:
    yield {n: surgery.get_module(model, n) for n in views}
  finally:
    for n, m in originals.items():
      surgery.replace_module(model, n, m)


@contextlib.contextmanager
def tapped(model: nnx.Module, names: Iterable[str]):
  """Wraps the named layers in taps for the duration of the block.

  `names` are layers of `surgery.select_linears` (a stacked layer's module
  is tapped once). Inside, `record(lambda: model(batch))` gives their
  inputs.
  """
  with _tapped(model, _modules_of(model, names), _fields(Want())):
    yield


def _init(
    view: surgery.MatrixView, want: Want, mesh, axis, dtype
) -> dict[str, jax.Array]:
  """Zero statistics of one tapped module: leading axes = its stack."""
  d, stack = view.d_in, view.stack
  s = dict(count=jnp.zeros(stack, jnp.int32), ok=jnp.ones(stack, jnp.bool_))
  if want.r and mesh is None:
    s['r'] = jnp.zeros(stack + (d, d), dtype)
  elif want.r:  # [*stack, D, d, d]
    size = mesh.shape[axis]
    sharding = jax.sharding.NamedSharding(
        mesh, jax.P(*([None] * len(stack)), axis)
    )
    s['r'] = jax.jit(
        lambda: jnp.zeros(stack + (size, d, d), dtype), out_shardings=sharding
    )()
  if want.gram:
    s['gram'] = jnp.zeros(stack + (d, d), dtype)
  if want.abs_sum:
    s['abs_sum'] = jnp.zeros(stack + (d,), dtype)
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    s = {
        k: v if k == 'r' else jax.device_put(v, replicated)
        for k, v in s.items()
    }
  return s


def _update(
    s: dict[str, jax.Array], x: jax.Array, rows: jax.Array | None, mesh, axis
) -> dict[str, jax.Array]:
  """One block of every statistic: fold R, add XᵀX and Σ|x|.

  Accumulates in the statistics' dtype (float32, or float64). `rows`
  (bool[b], or None for all) marks real rows; padding rows are zeroed, which
  changes none of the statistics. With a mesh, each device folds its
  rows into its own R (no communication). `ok` turns False on NaN/Inf.
  """
  dtype = next(s[k].dtype for k in ('r', 'gram', 'abs_sum') if k in s)
  x = x.astype(dtype)  # f[b, d]
  if rows is not None:
    x = jnp.where(rows[:, None], x, 0.0)
  count = s['count'] + (x.shape[0] if rows is None else rows.sum())
  out = dict(s, count=count.astype(jnp.int32))
  if 'r' not in s:
    ok = jnp.isfinite(x).all()
  elif mesh is None:
    out['r'], ok = qr.fold_r_unchecked(s['r'], x), jnp.isfinite(x).all()
  else:
    out['r'], ok = tsqr.fold_sharded(s['r'], x, mesh=mesh, axis=axis)
    ok = ok.all()
  out['ok'] = s['ok'] & ok
  if 'gram' in s:
    out['gram'] = s['gram'] + jnp.matmul(x.T, x, precision=_HIGHEST)
  if 'abs_sum' in s:
    out['abs_sum'] = s['abs_sum'] + jnp.abs(x).sum(0)
  return out


def _fold(tap: _Tap, x: jax.Array, recorder: _Recorder) -> None:
  """Folds one call's input into the tap's statistics, in place."""
  s = {k: v[...] for k, v in tap.stats.items()}
  if s['count'].ndim:
    raise ValueError(
        f'Layer {tap.name!r} is stacked {tuple(tap.view.stack)} (its kernel '
        f'has leading axes {s["count"].shape}) but was called on its whole '
        'stack at once: call it through nnx.scan or nnx.vmap over its '
        'leading axes (its statistics are sliced like its kernel).'
    )
  rows = None
  if recorder.mask is not None:
    n, b = x.shape[0], recorder.mask.shape[0]
    if n % b:
      raise ValueError(
          f'Layer {tap.name!r}: its input has {n} rows, not a '
          f'multiple of the batch size {b}: data-parallel '
          'calibration needs layer inputs whose leading axis is '
          'the batch.'
      )
    rows = jnp.repeat(recorder.mask, n // b)
  new = _update(s, x, rows, recorder.mesh, recorder.axis)
  for k, v in new.items():
    tap.stats[k][...] = v


def _shard_batch(batch: Any, mesh, axis: str) -> tuple[Any, jax.Array]:
  """Pads the leading (batch) axis to a multiple of the devices; shards it.

  Returns (batch, mask bool[padded batch]): padded entries are masked out.
  """
  size = mesh.shape[axis]
  leaves = jax.tree.leaves(batch)
  n = np.shape(leaves[0])[0]
  if any(np.shape(l)[0] != n for l in leaves):
    raise ValueError(
        'Data-parallel calibration needs batches whose arrays '
        'share a leading batch axis.'
    )
  pad = -n % size
  sharding = jax.sharding.NamedSharding(mesh, jax.P(axis))
  batch = jax.tree.map(
      lambda l: jax.device_put(
          np.pad(np.asarray(l), [(0, pad)] + [(0, 0)] * (np.ndim(l) - 1)),
          sharding,
      ),
      batch,
  )
  mask = jax.device_put(np.arange(n + pad) < n, sharding)
  return batch, mask


def default_call(model: nnx.Module, batch: Any) -> Any:
  return model(batch)


def _abstract(batch: Any) -> tuple:
  leaves, treedef = jax.tree.flatten(batch)
  return treedef, tuple((np.shape(l), jnp.result_type(l)) for l in leaves)


class _Groups:
  """Which tapped modules share statistics, refined batch by batch.

  Modules fed the same arrays on every batch so far share one group, named
  by its first module (in the order of `modules`). A batch on which they
  part (different inputs, or some not called) splits the group; each part
  starts from a copy of the statistics so far, which are the same for all.
  """

  def __init__(self, modules: list[str]):
    self.modules = modules
    self.group_of: dict[str, str] = {}  # module -> group
    self.stats: dict[str, dict[str, jax.Array]] = {}

  def members_of(self, gid: str) -> list[str]:
    return [m for m in self.modules if self.group_of.get(m) == gid]

  def refine(
      self, signatures: Mapping[str, tuple], init: Callable
  ) -> list[str]:
    """Refines by one batch's call signatures; returns the groups it folds."""
    buckets: dict[tuple, list[str]] = {}
    for m in self.modules:
      key = (self.group_of.get(m), signatures.get(m))
      buckets.setdefault(key, []).append(m)
    previous = {g: self.members_of(g) for g in self.stats}
    folding, stats = [], {}
    for (old, sig), members in buckets.items():
      if old is None and sig is None:
        continue  # never called so far
      gid = members[0]
      if old is None:
        stats[gid] = init(gid)
      else:  # a part: its own copy
        stats[gid] = (
            self.stats[old]
            if members == previous[old]
            else dict(self.stats[old])
        )
      for m in members:
        self.group_of[m] = gid
      if sig is not None:
        folding.append(gid)
    self.stats = stats
    return folding


def calibrate(
    model: nnx.Module,
    batches: Iterable[Any],
    layers: Iterable[str],
    *,
    want: Want = Want(),
    call: Callable = default_call,
    mesh: jax.sharding.Mesh | None = None,
    axis: str = 'data',
    dtype: Any = jnp.float32,
    desc: str = 'calibrate',
) -> tuple[dict[str, stats_lib.LayerStats], dict[str, str]]:
  """Streams `batches` through `model`, folding each layer's input.

  Args:
    model: an NNX model; it is not changed (taps are removed on exit).
    batches: iterable of model inputs (e.g. int32 ids [batch, seq]); each
      distinct batch shape compiles once.
    layers: names of the layers to calibrate (`surgery.select_linears`;
      `path[i]` for one layer of a stack).
    want: which statistics to accumulate (`stats.Want`; default R only;
      `Want(r=False, gram=True)` for the Gram alone).
    call: `call(model, batch)` runs the model (default `model(batch)`).
    mesh: if given, data-parallel: each batch is split over the devices of
      `axis` (its leading axis padded with masked entries to a multiple of
      the device count), each device folds its share into its own R's, and
      one tree reduction at the end gives every layer's R (`tsqr.reduce_r`).
      Works across processes under `jax.distributed`.
    axis: the mesh axis of the data parallelism.
    dtype: accumulation dtype of every statistic: float32 (default; the
      model's float32 activations are folded exactly as they are), or
      float64 (needs 64-bit JAX, e.g. `with jax.enable_x64(True):`), for
      references that must resolve what float32 statistics cannot, such as
      `k_star` on near-tied spectra.
    desc: the progress bar's label.

  Returns:
    (stats, group_of): `stats[group]` is the LayerStats of that group's input
    and `group_of[layer]` names the group of each layer (layers sharing an
    input share a group). A layer's `count` is the number of input rows it
    folded over all its calls: a layer called twice per batch counts both,
    a layer some batches do not reach counts only the others.

  Raises:
    ValueError: on an empty stream; NaN/Inf in a layer's input (naming the
      layer and the batch index); a layer never called; a layer called inside
      a transform whose state rules drop its statistics (e.g. its module
      broadcast, `in_axes=None`, in `nnx.scan`).
  """
  layers = list(layers)
  dtype = streaming.check_dtype(dtype)
  if mesh is not None and axis not in mesh.axis_names:
    raise ValueError(
        f'mesh has axes {mesh.axis_names}; calibration is '
        f'data-parallel over axis={axis!r}: name that mesh '
        f'axis {axis!r} (or pass axis=).'
    )
  replicated = None
  if mesh is not None:
    # Auto axes: XLA propagates the batch sharding through any model, which
    # need not annotate its own ops (Explicit axes would require it).
    mesh = jax.sharding.Mesh(
        mesh.devices,
        mesh.axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names),
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
  views = _modules_of(model, layers)
  fields = _fields(want)
  groups = _Groups(list(views))
  init = lambda m: _init(views[m], want, mesh, axis, dtype)
  with _tapped(model, views, fields, replicated) as taps:
    graphdef, stats_state, rest = nnx.split(model, _Stat, ...)
    if mesh is not None:  # replicate the model
      rest = jax.device_put(rest, replicated)
    empty = {m: {k: v[...] for k, v in taps[m].stats.items()} for m in taps}

    def run(stats_state, rest, batch, recorder):
      with _recording(recorder):
        call(nnx.merge(graphdef, stats_state, rest), batch)

    def discover(stats_state, rest, batch):
      recorder = _Recorder()
      jax.eval_shape(
          lambda s, r, b: run(s, r, b, recorder), stats_state, rest, batch
      )
      return recorder.signatures()

    step = functools.partial(
        _step, graphdef=graphdef, call=call, mesh=mesh, axis=axis
    )

    plans, seen = {}, set()
    index = -1
    for index, batch in enumerate(tqdm.tqdm(batches, desc=desc, unit='batch')):
      mask = None
      if mesh is not None:
        batch, mask = _shard_batch(batch, mesh, axis)
      key = _abstract(batch)
      if key not in plans:
        plans[key] = discover(nnx.state(model, _Stat), rest, batch)
      signatures = plans[key]
      seen.update(signatures)
      folding = groups.refine(signatures, init)
      for m, tap in taps.items():
        values = groups.stats[m] if m in folding else empty[m]
        for k, v in values.items():
          tap.stats[k].set_value(v)
      before = {g: groups.stats[g]['count'] for g in folding}
      new = step(
          nnx.state(model, _Stat), rest, batch, mask, fold=frozenset(folding)
      )
      nnx.update(model, new)
      for g in folding:
        groups.stats[g] = {k: v[...] for k, v in taps[g].stats.items()}
      _check_step(groups, folding, before, layers, index)
  if index < 0:
    raise ValueError('The calibration stream is empty: no batch to fold.')
  never = [n for n in layers if surgery.split_name(n)[0] not in seen]
  if never:
    raise ValueError(
        f'Layers {never} were not called by the model during ' 'calibration.'
    )
  return _finalize(groups, views, layers, mesh, axis)


@functools.partial(
    jax.jit, static_argnames=('graphdef', 'call', 'fold', 'mesh', 'axis')
)
def _step(stats_state, rest, batch, mask, *, graphdef, call, fold, mesh, axis):
  """One batch through the tapped model; the taps' new statistics.

  Module-level, with the model's structure static, so that calibrating the
  same model again (a sweep, a benchmark) reuses the compiled step.
  """
  model = nnx.merge(graphdef, stats_state, rest)
  with _recording(_Recorder(fold, mask, mesh, axis)):
    call(model, batch)
  return nnx.state(model, _Stat)


def _check_step(groups: _Groups, folding, before, layers, index) -> None:
  """Raises on NaN/Inf, or on statistics a transform did not give back."""
  got = jax.device_get(
      {
          g: (groups.stats[g]['ok'], groups.stats[g]['count'], before[g])
          for g in folding
      }
  )
  module_of = {n: surgery.split_name(n)[0] for n in layers}
  bad = [g for g, (ok, _, _) in got.items() if not np.all(ok)]
  if bad:
    sharers = [n for n in layers if groups.group_of[module_of[n]] in bad]
    raise ValueError(
        f'NaN or Inf in the input of layer(s) {sharers} at '
        f'calibration batch {index}.'
    )
  lost = [g for g, (_, after, prev) in got.items() if np.any(after <= prev)]
  if lost:
    raise ValueError(
        f'Layer(s) {lost} were called at calibration batch {index}, but their '
        'statistics did not come back out of the transform around them: its '
        'state rules drop changes to their module (e.g. nnx.scan or nnx.vmap '
        'with the module broadcast, in_axes=None). Pass the module as '
        'nnx.Carry, or scan its state (axis 0).'
    )


def _finalize(
    groups: _Groups, views, layers, mesh, axis
) -> tuple[dict[str, stats_lib.LayerStats], dict[str, str]]:
  """{group layer: LayerStats}, {layer: group layer} for the asked layers."""
  group_of, wanted = {}, {}
  for name in layers:
    module, index = surgery.split_name(name)
    gid = groups.group_of[module]
    group = f"{gid}[{','.join(map(str, index))}]" if index else gid
    group_of[name] = group
    wanted[group] = (gid, index)
  rs = {
      g: groups.stats[gid]['r'][index]
      for g, (gid, index) in wanted.items()
      if 'r' in groups.stats[gid]
  }
  if mesh is not None and rs:  # one tree reduction, every layer
    rs = tsqr.reduce_r(rs, mesh=mesh, axis=axis)
  out = {}
  for g, (gid, index) in wanted.items():
    s = groups.stats[gid]
    pick = lambda k: s[k][index] if k in s else None
    out[g] = stats_lib.LayerStats(
        r=rs.get(g),
        gram=pick('gram'),
        abs_sum=pick('abs_sum'),
        count=int(s['count'][index]),
    )
  return out, group_of


def layer_stats(
    model: nnx.Module, batches: Iterable[Any], layers: Iterable[str], **kwargs
) -> dict[str, stats_lib.LayerStats]:
  """`{layer: LayerStats}` of each layer's input, from one pass over `batches`.

  The same as `calibrate` (same arguments), with its groups expanded: layers
  fed the same array (q/k/v, gate/up) map to one shared `LayerStats` object.

      stats = layer_stats(model, batches, ['layers.0.attn.q_proj'])
      stats['layers.0.attn.q_proj'].r.shape     # (d_in, d_in)
  """
  layers = list(layers)
  group_stats, group_of = calibrate(model, batches, layers, **kwargs)
  return {n: group_stats[group_of[n]] for n in layers}
