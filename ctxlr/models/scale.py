"""What a compression run will hold, known before any long work starts.

    facts = scale_facts(model, surgery.select_linears(model), jnp.float32)
    print(describe(facts))   # "134.5M parameters (538.1 MB); 210 layers ..."

The calibration statistics of a layer are `d_in × d_in` matrices (the R
factor, and the Gram matrix for the Gram baselines), one set per *distinct*
input: layers fed the same array (q/k/v, gate/up) share theirs, found here
exactly as calibration finds them, by tracing the model once on two tokens
(no arithmetic is run).
"""

from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp

from ctxlr import calibration
from ctxlr import stats as stats_lib


def scale_facts(
    model: nnx.Module,
    layer_shapes: Mapping[str, tuple[int, int]],
    stats_dtype: Any = jnp.float32,
    *,
    want: stats_lib.Want = stats_lib.Want(),
    sample: Any = None,
) -> dict[str, Any]:
  """Parameter count and the memory of the calibration statistics.

  Args:
    model: the dense model (not changed).
    layer_shapes: {layer: (d_in, d_out)} of the layers to compress, as
      `surgery.select_linears` gives them.
    stats_dtype: accumulation dtype of the statistics (float32 or float64).
    want: the statistics besides R (`gram` adds a second d_in × d_in
      matrix per input, `abs_sum` a vector).
    sample: a model input to trace (default int32 ids [1, 2]).

  Returns:
    dict with `num_params` and `param_bytes` (every nnx.Param), `num_layers`
    and `layer_params` (Σ d_in·d_out of `layer_shapes`), `num_inputs` (the
    distinct inputs), `sum_d_in_sq` (Σ d_in² over them), `largest_d_in`,
    `stats_dtype` (its name) and `stats_bytes` (what the statistics take on
    one device; data-parallel calibration holds one copy per device).

  Raises:
    ValueError: a layer of `layer_shapes` is not called by the model, or its
      input width is not the `d_in` given.
  """
  names = list(layer_shapes)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  if sample is None:
    sample = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  box = {}
  with calibration.tapped(model, names):
    graphdef, state = nnx.split(model)

    def trace(state, batch):
      recorder = calibration.record(lambda: nnx.merge(graphdef, state)(batch))
      box['recorder'] = recorder
      return recorder.inputs

    inputs = jax.eval_shape(trace, state, sample)
  group_of = box['recorder'].group_of
  missing = sorted(set(names) - set(group_of))
  if missing:
    raise ValueError(
        f'Layers {missing[:4]} ({len(missing)} in all) are not '
        'called by the model.'
    )
  for name in names:
    d_in = inputs[group_of[name]].shape[-1]
    if d_in != layer_shapes[name][0]:
      raise ValueError(
          f'layer_shapes[{name!r}] = {layer_shapes[name]}; its '
          f'input has width {d_in}.'
      )
  widths = [int(x.shape[-1]) for x in inputs.values()]
  sum_sq = sum(d * d for d in widths)
  itemsize = jnp.dtype(stats_dtype).itemsize
  per_element = 1 + int(want.gram)
  stats_bytes = itemsize * (
      per_element * sum_sq + (sum(widths) if want.abs_sum else 0)
  )
  return dict(
      num_params=int(sum(p.size for p in params)),
      param_bytes=int(sum(p.size * p.dtype.itemsize for p in params)),
      num_layers=len(names),
      layer_params=int(sum(a * b for a, b in layer_shapes.values())),
      num_inputs=len(widths),
      sum_d_in_sq=int(sum_sq),
      largest_d_in=max(widths) if widths else 0,
      stats_dtype=jnp.dtype(stats_dtype).name,
      stats_bytes=int(stats_bytes),
  )


def _bytes(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
    if n < 1000 or unit == 'TB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1000
  raise AssertionError('unreachable')


def _count(n: int) -> str:
  if n < 1e6:
    return f'{n:,}'
  return f'{n / 1e6:.1f}M' if n < 1e9 else f'{n / 1e9:.2f}B'


def describe(facts: Mapping[str, Any]) -> str:
  """One paragraph of `scale_facts` for a log line.

  >>> describe(dict(num_params=1_500_000, param_bytes=6_000_000,
  ...               num_layers=14, layer_params=1_000_000, num_inputs=8,
  ...               sum_d_in_sq=2_000_000, largest_d_in=1024,
  ...               stats_dtype='float32', stats_bytes=8_000_000))
  '1.5M parameters (6.0 MB); 14 layers to compress (1.0M parameters) read 8 \
distinct inputs (widest 1024); their statistics take Σ d_in² = 2,000,000 \
elements = 8.0 MB in float32.'
  """
  return (
      f'{_count(facts["num_params"])} parameters '
      f'({_bytes(facts["param_bytes"])}); {facts["num_layers"]} layers to '
      f'compress ({_count(facts["layer_params"])} parameters) read '
      f'{facts["num_inputs"]} distinct inputs (widest '
      f'{facts["largest_d_in"]}); their statistics take Σ d_in² = '
      f'{facts["sum_d_in_sq"]:,} elements = '
      f'{_bytes(facts["stats_bytes"])} in {facts["stats_dtype"]}.'
  )
