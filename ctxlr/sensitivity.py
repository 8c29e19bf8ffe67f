"""How much the model's loss cares about each layer's output: one backward pass.

The loss change from a small change `Δy_t` of a layer's output on token t is,
to first order, `Σ_t g_tᵀ Δy_t` with `g_t = ∂L/∂y_t`; its second moment, with
the output errors uncorrelated with the gradients (the diagonal empirical
Fisher approximation), is

    E[(ΔL)²] ≈ Σ_j (mean_t g_tj²) · Σ_t Δy_tj²

so a layer's sensitivity is the energy of the loss gradient at its output,
per output channel: `output_gradient_energy` returns `Σ_t g_tj²` for every
target layer from one backward pass per batch, without storing any gradient
(an identity with a custom VJP at each layer's output sends `Σ_t g_t²` to a
zero "sink" variable, whose gradient is read). With `Δy = X ΔK` the squared
output error is the layer objective of docs/method.md §1, so

    loss increase of layer l at rank k  ≈  w_l · err_l(k)²,
    w_l = Σ_tj g_tj² / (tokens · d_out)                     (`layer_weights`)

with `err_l(k)` the exact error curve from σ(R K) (docs/method.md §2). Rank
allocation on these weighted curves is `allocation.fisher_ranks`.

    energy = sensitivity.output_gradient_energy(model, batches, layers)
    weights = sensitivity.layer_weights(energy)
"""

import dataclasses
from typing import Any, Callable, Iterable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ctxlr import surgery
from ctxlr import training


@dataclasses.dataclass(frozen=True)
class Energy:
  """Loss-gradient energy at one layer's output.

  Attributes:
    channel: float64[d_out], `Σ_t g_tj²` over every calibration token t.
    tokens: how many output rows (tokens) were summed.
  """

  channel: np.ndarray
  tokens: int

  @property
  def mean(self) -> float:
    """`Σ_tj g_tj² / (tokens · d_out)`: the layer's scalar weight."""
    return float(self.channel.sum() / (self.tokens * self.channel.size))


class _Sink(nnx.Variable):
  """A zero vector whose gradient collects `Σ_t g_t²` of a layer's output."""


@jax.custom_vjp
def _collect(y: jax.Array, sink: jax.Array) -> jax.Array:
  del sink
  return y


def _collect_fwd(y, sink):
  return y, sink.ndim


def _collect_bwd(features, g):
  # Σ over every axis before the output features (batch, sequence, heads…)
  lead = tuple(range(g.ndim - features))
  return g, jnp.sum(jnp.square(g.astype(jnp.float32)), axis=lead)


_collect.defvjp(_collect_fwd, _collect_bwd)


class _Tap(nnx.Module):
  """Stands in for a layer: same output, gradient energy sent to `sink`.

  The sink has the layer's stack axes (if any) before its output features,
  so that `nnx.vmap` / `nnx.scan` over a stack slice it with the kernel and
  each stacked layer collects its own energy.
  """

  def __init__(self, inner: nnx.Module, view: surgery.MatrixView, name: str):
    self.inner = inner
    self.name = name
    self.features = tuple(view.out_shape)
    self.sink = _Sink(jnp.zeros(view.stack + self.features, jnp.float32))

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    y = self.inner(x, *args, **kwargs)
    if tuple(y.shape[-len(self.features) :]) != self.features:
      raise ValueError(
          f'{self.name}: the layer returned shape {y.shape}; the loss '
          f'gradient energy needs its output features {self.features} last.'
      )
    return _collect(y, self.sink[...])


@nnx.jit(static_argnames='loss_fn')
def _energy_step(model: nnx.Module, batch: Any, loss_fn: Callable):
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, _Sink))(model, batch)
  return grads


def _flat(state: Any) -> list[tuple[tuple, Any]]:
  """(path, array) of every sink gradient in an nnx.State."""
  return [
      (path, v.get_value() if isinstance(v, nnx.Variable) else v)
      for path, v in nnx.to_flat_state(state)
  ]


def output_gradient_energy(
    model: nnx.Module,
    batches: Iterable[Any],
    layers: Iterable[str],
    *,
    loss_fn: Callable = training.next_token_loss,
    micro_batch: int = 1,
    desc: str = 'sensitivity',
) -> dict[str, Energy]:
  """`Σ_t (∂L/∂y_t)²` per output channel of each layer, over `batches`.

  Args:
    model: an NNX model; not changed (the taps are removed on exit).
    batches: calibration inputs (int32 ids [batch, seq] for the default loss);
      each is split into micro-batches of `micro_batch` rows along axis 0,
      and each micro-batch's gradient is that of its own mean loss.
    layers: layer names (`surgery.select_linears`; 'path[i]' for one layer
      of an `nnx.vmap` / `nnx.scan` stack) whose outputs end with the
      layer's output features (nnx.Linear, nnx.LinearGeneral, and an
      nnx.Einsum whose output features come last).
    loss_fn: `loss_fn(model, batch) -> scalar`; default next-token
      cross-entropy (`training.next_token_loss`).
    micro_batch: rows per backward pass (memory: one pass's activations).
    desc: the progress bar's label.

  Returns:
    {layer: Energy(channel float64[d_out], tokens)}.

  Raises:
    ValueError: no batch, `micro_batch` < 1, an unknown layer, a layer whose
      output features are not last, or a non-finite gradient (naming the
      layer and the batch).
  """
  layers = list(layers)
  if (
      isinstance(micro_batch, bool)
      or not isinstance(micro_batch, int)
      or (micro_batch < 1)
  ):
    raise ValueError(f'micro_batch must be an int >= 1; got {micro_batch!r}.')
  if not layers:
    raise ValueError('layers is empty: name at least one layer to measure.')
  modules: dict[str, surgery.MatrixView] = {}
  for name in layers:
    module, _ = surgery.split_name(name)
    if module not in modules:
      modules[module] = surgery.matrix_view(surgery.get_module(model, module))
  d_out = {n: modules[surgery.split_name(n)[0]].d_out for n in layers}
  sums = {n: np.zeros(d_out[n], np.float64) for n in layers}
  tokens = {n: 0 for n in layers}
  originals = {m: surgery.get_module(model, m) for m in modules}
  for m, layer in originals.items():
    surgery.replace_module(model, m, _Tap(layer, modules[m], m))
  count = 0
  try:
    for index, batch in enumerate(tqdm.tqdm(batches, desc=desc, unit='batch')):
      rows = np.shape(jax.tree.leaves(batch)[0])[0]
      for start in range(0, rows, micro_batch):
        part = jax.tree.map(lambda l: l[start : start + micro_batch], batch)
        grads = _energy_step(model, part, loss_fn)
        got = {
            surgery.path_name(path[:-1]): np.asarray(value, np.float64)
            for path, value in _flat(grads)
        }
        bad = [n for n, g in got.items() if not np.all(np.isfinite(g))]
        if bad:
          raise ValueError(
              f'Non-finite loss gradient at the output of '
              f'{bad[:3]} at batch {index}.'
          )
        for n in layers:
          module, stack_index = surgery.split_name(n)
          sums[n] += got[module][stack_index].reshape(-1)
        count += 1
      size = int(np.prod(np.shape(jax.tree.leaves(batch)[0])))
      for n in layers:
        tokens[n] += size
  finally:
    for m, layer in originals.items():
      surgery.replace_module(model, m, layer)
  if count == 0:
    raise ValueError('The calibration stream is empty: no batch to measure.')
  return {n: Energy(sums[n], tokens[n]) for n in layers}


def layer_weights(energy: Mapping[str, Energy]) -> dict[str, float]:
  """{layer: `Energy.mean`}, the scalar loss weight of each layer's error."""
  return {n: e.mean for n, e in energy.items()}


def to_json(energy: Mapping[str, Energy]) -> dict[str, Any]:
  """A JSON-able copy (`from_json` reads it back)."""
  return {
      n: dict(channel=e.channel.tolist(), tokens=e.tokens)
      for n, e in energy.items()
  }


def from_json(data: Mapping[str, Any]) -> dict[str, Energy]:
  """`to_json`'s inverse."""
  return {
      n: Energy(np.asarray(v['channel'], np.float64), int(v['tokens']))
      for n, v in data.items()
  }
