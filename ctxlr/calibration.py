"""Calibration: run data through a model once, fold each target layer's input.

The chosen `nnx.Linear` layers are temporarily wrapped in taps. One jitted
step runs the model on a batch and folds every tapped input into its layer's
statistics (docs/method.md §3), so memory is O(Σ d_in²) whatever the number
of tokens and no activation is kept. Layers fed the *same* array (q/k/v of
attention, gate/up of a SwiGLU MLP) are detected while tracing and share one
set of statistics, computed once.
"""
import contextlib
import contextvars
from typing import Any, Callable, Iterable

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


class _Recorder:
  """Collects the inputs of tapped layers during one trace of the model."""

  def __init__(self):
    self.inputs: dict[str, jax.Array] = {}   # group -> x, float[tokens, d]
    self.group_of: dict[str, str] = {}       # layer -> group (first sharer)
    self._by_id: dict[int, str] = {}

  def record(self, name: str, x: jax.Array) -> None:
    key = id(x)
    if key in self._by_id:                   # same traced array: shared input
      self.group_of[name] = self._by_id[key]
      return
    self._by_id[key] = name
    self.group_of[name] = name
    self.inputs[name] = x.reshape(-1, x.shape[-1])


class _Tap(nnx.Module):
  """Stands in for a Linear during calibration: records, then passes on."""

  def __init__(self, inner: nnx.Module, name: str):
    self.inner = inner
    self.name = name

  def __call__(self, x: jax.Array) -> jax.Array:
    recorder = _RECORDER.get()
    if recorder is not None:
      recorder.record(self.name, x)
    return self.inner(x)


def record(run: Callable[[], Any]) -> _Recorder:
  """Runs `run()` (a model call on tapped layers); returns what the taps saw.

  `recorder.inputs[group]` is each distinct input, float[tokens, d];
  `recorder.group_of[layer]` names the first layer fed the same array.
  """
  recorder = _Recorder()
  token = _RECORDER.set(recorder)
  try:
    run()
  finally:
    _RECORDER.reset(token)
  return recorder


@contextlib.contextmanager
def tapped(model: nnx.Module, names: Iterable[str]):
  """Wraps the named layers in taps for the duration of the block."""
  names = list(names)
  originals = {n: surgery.get_module(model, n) for n in names}
  for n, m in originals.items():
    surgery.replace_module(model, n, _Tap(m, n))
  try:
    yield
  finally:
    for n, m in originals.items():
      surgery.replace_module(model, n, m)


Want = stats_lib.Want          # re-exported: what to accumulate besides R


def _init(d: int, want: Want, mesh, axis, dtype) -> dict[str, jax.Array]:
  r = (jnp.zeros((d, d), dtype) if mesh is None else
       tsqr.zeros_sharded(d, mesh=mesh, axis=axis, dtype=dtype))  # [D, d, d]
  s = dict(r=r, count=jnp.zeros((), jnp.int32))
  if want.gram:
    s['gram'] = jnp.zeros((d, d), dtype)
  if want.abs_sum:
    s['abs_sum'] = jnp.zeros((d,), dtype)
  return s


def _update(s: dict[str, jax.Array], x: jax.Array, rows: jax.Array | None,
            mesh, axis) -> tuple[dict[str, jax.Array], jax.Array]:
  """One block of every statistic: fold R, add XᵀX and Σ|x|.

  Accumulates in the statistics' dtype (float32, or float64). `rows`
  (bool[b], or None for all) marks real rows; padding rows are zeroed, which
  changes none of the statistics. With a mesh, each device folds its
  rows into its own R (no communication). Returns (stats, all finite).
  """
  x = x.astype(s['r'].dtype)                                    # f[b, d]
  if rows is not None:
    x = jnp.where(rows[:, None], x, 0.)
  count = s['count'] + (x.shape[0] if rows is None else rows.sum())
  if mesh is None:
    r, ok = qr.fold_r_unchecked(s['r'], x), jnp.isfinite(x).all()
  else:
    r, ok = tsqr.fold_sharded(s['r'], x, mesh=mesh, axis=axis)
    ok = ok.all()
  out = dict(s, r=r, count=count)
  if 'gram' in s:
    out['gram'] = s['gram'] + jnp.matmul(x.T, x, precision=_HIGHEST)
  if 'abs_sum' in s:
    out['abs_sum'] = s['abs_sum'] + jnp.abs(x).sum(0)
  return out, ok


def _finalize(stats: dict[str, dict[str, jax.Array]], mesh, axis
              ) -> dict[str, stats_lib.LayerStats]:
  rs = {g: s['r'] for g, s in stats.items()}
  if mesh is not None:                     # one tree reduction, every layer
    rs = tsqr.reduce_r(rs, mesh=mesh, axis=axis)
  return {g: stats_lib.LayerStats(r=rs[g], gram=s.get('gram'),
                                   abs_sum=s.get('abs_sum'),
                                   count=int(s['count']))
          for g, s in stats.items()}


def _shard_batch(batch: Any, mesh, axis: str) -> tuple[Any, jax.Array]:
  """Pads the leading (batch) axis to a multiple of the devices; shards it.

  Returns (batch, mask bool[padded batch]): padded entries are masked out.
  """
  size = mesh.shape[axis]
  leaves = jax.tree.leaves(batch)
  n = np.shape(leaves[0])[0]
  if any(np.shape(l)[0] != n for l in leaves):
    raise ValueError('Data-parallel calibration needs batches whose arrays '
                     'share a leading batch axis.')
  pad = -n % size
  sharding = jax.sharding.NamedSharding(mesh, jax.P(axis))
  batch = jax.tree.map(lambda l: jax.device_put(np.pad(
      np.asarray(l), [(0, pad)] + [(0, 0)] * (np.ndim(l) - 1)), sharding),
                       batch)
  mask = jax.device_put(np.arange(n + pad) < n, sharding)
  return batch, mask


def default_call(model: nnx.Module, batch: Any) -> Any:
  return model(batch)


def calibrate(model: nnx.Module, batches: Iterable[Any], layers: Iterable[str],
              *, want: Want = Want(), call: Callable = default_call,
              mesh: jax.sharding.Mesh | None = None, axis: str = 'data',
              dtype: Any = jnp.float32, desc: str = 'calibrate'
              ) -> tuple[dict[str, stats_lib.LayerStats], dict[str, str]]:
  """Streams `batches` through `model`, folding each layer's input.

  Args:
    model: an NNX model; it is not changed (taps are removed on exit).
    batches: iterable of model inputs (e.g. int32 ids [batch, seq]); all
      batches should share one shape (one compile).
    layers: dotted paths of the layers to calibrate (`surgery.select_linears`).
    want: extra statistics for the Gram baselines.
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

  Returns:
    (stats, group_of): `stats[group]` is the LayerStats of that group's input
    and `group_of[layer]` names the group of each layer (layers sharing an
    input share a group).

  Raises:
    ValueError: on an empty stream, or NaN/Inf in a layer's input (naming the
      layer and the batch index).
  """
  layers = list(layers)
  dtype = streaming.check_dtype(dtype)
  recorder_box = {}
  if mesh is not None:
    # Auto axes: XLA propagates the batch sharding through any model, which
    # need not annotate its own ops (Explicit axes would require it).
    mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(
        jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
  with tapped(model, layers):
    graphdef, state = nnx.split(model)
    if mesh is not None:                      # replicate the model
      state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.P()))

    def trace(state, batch):
      recorder = record(lambda: call(nnx.merge(graphdef, state), batch))
      recorder_box['last'] = recorder
      return recorder

    @jax.jit
    def step(state, batch, mask, stats):
      recorder = trace(state, batch)
      new, finite = {}, {}
      for g, x in recorder.inputs.items():
        rows = None if mask is None else jnp.repeat(
            mask, x.shape[0] // mask.shape[0])
        new[g], finite[g] = _update(stats[g], x, rows, mesh, axis)
      return new, finite

    stats = None
    for index, batch in enumerate(tqdm.tqdm(batches, desc=desc,
                                            unit='batch')):
      mask = None
      if mesh is not None:
        batch, mask = _shard_batch(batch, mesh, axis)
      if stats is None:                       # discover groups and shapes
        shapes = jax.eval_shape(lambda s, b: trace(s, b).inputs, state, batch)
        rec = recorder_box['last']
        missing = set(layers) - set(rec.group_of)
        if missing:
          raise ValueError(f'Layers {sorted(missing)} were not called by the '
                           'model during calibration.')
        group_of = dict(rec.group_of)
        stats = {g: _init(x.shape[-1], want, mesh, axis, dtype)
                 for g, x in shapes.items()}
      stats, finite = step(state, batch, mask, stats)
      bad = sorted(g for g, ok in jax.device_get(finite).items() if not ok)
      if bad:
        sharers = [n for n in layers if group_of[n] in bad]
        raise ValueError(f'NaN or Inf in the input of layer(s) {sharers} at '
                         f'calibration batch {index}.')
  if stats is None:
    raise ValueError('The calibration stream is empty: no batch to fold.')
  return _finalize(stats, mesh, axis), group_of


def layer_stats(model: nnx.Module, batches: Iterable[Any],
                layers: Iterable[str], **kwargs
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
