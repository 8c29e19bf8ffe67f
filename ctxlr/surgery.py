"""Model surgery on Flax NNX models: find dense layers, swap in factored ones.

    shapes = select_linears(model)     # {'layers.0.attn.q_proj': (576, 576), …}
    k = kernel_matrix(model, 'layers.0.attn.q_proj')          # f[d_in, d_out]
    apply_factors(model, {'layers.0.attn.q_proj': (a, b)})    # in place

Three kinds of layer are handled, each seen as one matrix `K` of shape
`(d_in, d_out)` (docs/method.md §1): `nnx.Linear` (its kernel),
`nnx.LinearGeneral` (contracted input features × output features, its kernel
reshaped) and `nnx.Einsum` (the kernel's contracted letters × its output
letters). The `FactoredLinear` that replaces one computes the same
contraction, to the same output shape, with the replaced layer's `dtype`,
`param_dtype`, `precision` and `dot_general` (or `einsum_op`).

Layers are named by their dotted path in the module tree (list indices as
numbers) and chosen with fnmatch-style patterns on that path. A layer built
stacked (`nnx.vmap` at construction, applied with `nnx.scan` or `nnx.vmap`)
holds one kernel per stacked layer along its leading axes; each is its own
layer named `path[i]` (`path[i,j]` for two stacked axes), with its own
statistics and rank. Other modules that hold a matrix-shaped parameter
(`nnx.Conv`, custom layers, …) are not handled: `select_linears` names them
in one warning and `unhandled_layers` lists them for the report.
"""

import dataclasses
import fnmatch
import functools
import itertools
import logging
import re
import string
from typing import Any, Callable, Iterable, Mapping

from flax import nnx
from flax.nnx.nn import dtypes
import jax
import jax.numpy as jnp
import numpy as np

# Every projection except embeddings and output heads (docs/method.md §1:
# the dense layers that carry most parameters).
DEFAULT_INCLUDE = ('*',)
DEFAULT_EXCLUDE = ('*embed*', '*lm_head*', '*head')

HANDLED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
# Modules whose parameters are not a dense layer's (a lookup, scales), even
# when stacking makes them matrix-shaped.
_NOT_DENSE = (
    nnx.Embed,
    nnx.RMSNorm,
    nnx.LayerNorm,
    nnx.BatchNorm,
    nnx.GroupNorm,
)
_ELLIPSIS = '...'


# ------------------------------------------------------------------ views ---


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """How a layer's kernel is one `(d_in, d_out)` matrix per stacked layer.

  Attributes:
    kind: 'linear', 'linear_general' or 'einsum'.
    in_shape: the contracted input features (the matrix's rows, flattened
      in this order).
    out_shape: the output features (its columns, flattened in this order).
    stack: leading axes of the kernel that stack independent layers (from
      `nnx.vmap` at construction); () for a single layer.
    axis: for 'linear_general', the input axes contracted (as the layer
      has them); else ().
    einsum_str: for 'einsum', the equation; else None.
  """

  kind: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  stack: tuple[int, ...] = ()
  axis: tuple[int, ...] = ()
  einsum_str: str | None = None

  @property
  def d_in(self) -> int:
    return int(np.prod(self.in_shape))

  @property
  def d_out(self) -> int:
    return int(np.prod(self.out_shape))


def _tokens(spec: str) -> list[str]:
  """'...ab' -> ['...', 'a', 'b']: einsum subscripts, ellipsis as one."""
  out, i = [], 0
  while i < len(spec):
    if spec.startswith(_ELLIPSIS, i):
      out.append(_ELLIPSIS)
      i += 3
    else:
      out.append(spec[i])
      i += 1
  return out


def _parse_einsum(einsum_str: str):
  """(input, kernel, output tokens, contracted letters, output letters)."""
  lhs, out = einsum_str.replace(' ', '').split('->')
  inp, ker = lhs.split(',')
  inp, ker, out = _tokens(inp), _tokens(ker), _tokens(out)
  if _ELLIPSIS in ker:
    raise ValueError('an ellipsis in the kernel subscripts')
  if len(set(ker)) != len(ker):
    raise ValueError('a repeated kernel subscript')
  both = [c for c in ker if c in inp and c in out]
  if both:
    raise ValueError(
        f'kernel letters {both} are in both the input and the '
        'output (per-index weights, a batch of matrices)'
    )
  alone = [c for c in ker if c not in inp and c not in out]
  if alone:
    raise ValueError(
        f'kernel letters {alone} are summed over by the kernel ' 'alone'
    )
  contracted = [c for c in ker if c in inp]
  outputs = [c for c in ker if c in out]
  if not contracted or not outputs:
    raise ValueError('no contracted or no output letter in the kernel')
  return inp, ker, out, contracted, outputs


def matrix_view(module: Any) -> MatrixView:
  """The matrix view of a handled layer.

  Raises:
    ValueError: saying why, if `module` is not a layer this module handles
      (another type, a `LinearGeneral` with `batch_axis`, an `Einsum` with
      per-index weights or whose equation is given at call time).
  """
  if isinstance(module, FactoredLinear):
    raise ValueError('already factored')
  if isinstance(module, nnx.Linear):
    d_in, d_out = int(module.in_features), int(module.out_features)
    shape = tuple(module.kernel.shape)
    if shape[-2:] != (d_in, d_out):
      raise ValueError(
          f'kernel shape {shape} does not end in (in_features, '
          f'out_features) = ({d_in}, {d_out})'
      )
    return MatrixView('linear', (d_in,), (d_out,), shape[:-2])
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise ValueError(
          f'batch_axis {dict(module.batch_axis)} (one matrix '
          'per batch index)'
      )
    in_shape = tuple(int(s) for s in module.in_features)
    out_shape = tuple(int(s) for s in module.out_features)
    shape = tuple(module.kernel.shape)
    n = len(in_shape) + len(out_shape)
    if shape[len(shape) - n :] != in_shape + out_shape:
      raise ValueError(
          f'kernel shape {shape} does not end in in_features + '
          f'out_features = {in_shape + out_shape}'
      )
    return MatrixView(
        'linear_general',
        in_shape,
        out_shape,
        shape[: len(shape) - n],
        axis=tuple(module.axis),
    )
  if isinstance(module, nnx.Einsum):
    if module.einsum_str is None:
      raise ValueError('einsum_str is given at call time')
    _, ker, _, contracted, outputs = _parse_einsum(module.einsum_str)
    shape = tuple(module.kernel.shape)
    stack = shape[: len(shape) - len(ker)]
    size = dict(zip(ker, shape[len(stack) :]))
    return MatrixView(
        'einsum',
        tuple(size[c] for c in contracted),
        tuple(size[c] for c in outputs),
        stack,
        einsum_str=module.einsum_str.replace(' ', ''),
    )
  raise ValueError(
      f'a {type(module).__name__}, not one of '
      f'{[t.__name__ for t in HANDLED]}'
  )


def kernel_as_matrix(module: Any) -> jax.Array:
  """The layer's kernel as `float[*stack, d_in, d_out]`, its storage dtype."""
  view = matrix_view(module)
  kernel = module.kernel[...]
  s = len(view.stack)
  if view.kind == 'einsum':
    _, ker, _, contracted, outputs = _parse_einsum(view.einsum_str)
    order = [ker.index(c) + s for c in contracted + outputs]
    kernel = jnp.transpose(kernel, list(range(s)) + order)
  return kernel.reshape(view.stack + (view.d_in, view.d_out))


def input_as_matrix(view: MatrixView, x: jax.Array) -> jax.Array:
  """A layer's input as the rows X it multiplies: `float[tokens, d_in]`.

  Each row is one vector the layer's matrix view multiplies, its features
  in the order of the matrix's rows, so that the layer's output is
  `X @ K` (`kernel_as_matrix`) reshaped.
  """
  if view.kind == 'linear':
    return x.reshape(-1, view.d_in)
  if view.kind == 'linear_general':
    axis = sorted(a % x.ndim for a in view.axis)  # as LinearGeneral pairs them
    x = jnp.moveaxis(x, axis, list(range(x.ndim - len(axis), x.ndim)))
    return x.reshape(-1, view.d_in)
  inp, _, _, contracted, _ = _parse_einsum(view.einsum_str)
  rest = [t for t in inp if t not in contracted]
  x = jnp.einsum(f"{''.join(inp)}->{''.join(rest)}{''.join(contracted)}", x)
  return x.reshape(-1, view.d_in)


# --------------------------------------------------------------- factored ---


class FactoredLinear(nnx.Module):
  """`y = (x a) b + bias`: a rank-r stand-in for a dense layer.

  `a` and `b` are the factors of the layer's matrix view (`MatrixView`):
  `x`'s contracted features times `a` (d_in × r), times `b` (r × d_out),
  reshaped to the replaced layer's output; with leading stacked axes when
  the layer was a stack. The computation follows the replaced layer:
  inputs and factors are promoted with its `promote_dtype` to its `dtype`
  (None: inferred from the input and the factors, as Flax does), and
  multiplied with its `dot_general` (`einsum_op` for an Einsum) at its
  `precision` and `preferred_element_type`.

  Attributes:
    a: nnx.Param, float[*stack, d_in, rank].
    b: nnx.Param, float[*stack, rank, d_out].
    bias: nnx.Param of the replaced layer's bias shape, or None.
  """

  def __init__(
      self,
      a: jax.Array,
      b: jax.Array,
      bias: jax.Array | None = None,
      *,
      view: MatrixView | None = None,
      dtype: Any = None,
      param_dtype: Any = None,
      precision: Any = None,
      dot_general: Callable | None = None,
      dot_general_cls: Any = None,
      einsum_op: Callable | None = None,
      promote_dtype: Callable = dtypes.promote_dtype,
      preferred_element_type: Any = None,
  ):
    if (
        a.ndim < 2
        or a.ndim != b.ndim
        or a.shape[-1] != b.shape[-2]
        or a.shape[:-2] != b.shape[:-2]
    ):
      raise ValueError(
          f'Factors a {a.shape} and b {b.shape} do not chain '
          '(need a: [*stack, d_in, rank], b: [*stack, rank, '
          'd_out]).'
      )
    stack, d_in, d_out = a.shape[:-2], a.shape[-2], b.shape[-1]
    if view is None:
      view = MatrixView('linear', (d_in,), (d_out,), stack)
    if (view.d_in, view.d_out, view.stack) != (d_in, d_out, stack):
      raise ValueError(
          f'Factors a {a.shape} and b {b.shape} do not fit the '
          f'layer: d_in {view.d_in}, d_out {view.d_out}, '
          f'stacked {view.stack}.'
      )
    if bias is not None and bias.size != int(np.prod(stack)) * d_out:
      raise ValueError(
          f'bias has shape {bias.shape}; expected '
          f'{stack + view.out_shape} ({d_out} outputs per '
          'layer).'
      )
    self.a = nnx.Param(a)
    self.b = nnx.Param(b)
    self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
    self.kind = view.kind
    self.in_shape = view.in_shape
    self.out_shape = view.out_shape
    self.axis = view.axis
    self.einsum_str = view.einsum_str
    self.dtype = dtype
    self.param_dtype = param_dtype if param_dtype is not None else a.dtype
    self.precision = precision
    self.dot_general = dot_general
    self.dot_general_cls = dot_general_cls
    self.einsum_op = einsum_op
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type

  @property
  def in_features(self) -> int:
    return self.a.shape[-2]

  @property
  def out_features(self) -> int:
    return self.b.shape[-1]

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def view(self) -> MatrixView:
    return MatrixView(
        self.kind,
        self.in_shape,
        self.out_shape,
        tuple(self.a.shape[:-2]),
        self.axis,
        self.einsum_str,
    )

  def _dot(self):
    if self.dot_general_cls is not None:
      return self.dot_general_cls()
    return self.dot_general or jax.lax.dot_general

  def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
    bias = self.bias[...] if self.bias is not None else None
    x, a, b, bias = self.promote_dtype(
        (x, self.a[...], self.b[...], bias), dtype=self.dtype
    )
    if a.ndim != 2:
      raise ValueError(
          f'FactoredLinear called with stacked factors {a.shape}:'
          ' apply it through nnx.scan or nnx.vmap over its '
          'stacked axes, as the layer it replaced.'
      )
    kwargs = {}
    if self.preferred_element_type is not None:
      kwargs['preferred_element_type'] = self.preferred_element_type
    return contract(
        self.view_of_call(),
        x,
        a,
        b,
        bias,
        dot_general=self._dot(),
        einsum_op=self.einsum_op,
        precision=self.precision,
        out_sharding=out_sharding,
        **kwargs,
    )

  def view_of_call(self) -> MatrixView:
    """The view inside a call (the factors' stacked axes sliced off)."""
    return MatrixView(
        self.kind, self.in_shape, self.out_shape, (), self.axis, self.einsum_str
    )


def contract(
    view: MatrixView,
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    bias: jax.Array | None,
    *,
    dot_general: Callable | None = None,
    einsum_op: Callable | None = None,
    precision: Any = None,
    out_sharding: Any = None,
    **kwargs,
) -> jax.Array:
  """`x`'s contracted features times `a` (d_in × r) times `b` (r × d_out).

  The dense layer's output shape and layout (`view`), with `dot_general`
  (`einsum_op` for an einsum view) at `precision`; inputs already promoted
  to the compute dtype. `kwargs` go to every product (e.g.
  `preferred_element_type`).
  """
  rank = a.shape[-1]
  a = a.reshape(view.in_shape + (rank,))
  b = b.reshape((rank,) + view.out_shape)
  if view.kind == 'einsum':
    op = einsum_op or jnp.einsum
    inp, _, out, contracted, outputs = _parse_einsum(view.einsum_str)
    z = next(c for c in string.ascii_letters if c not in view.einsum_str)
    rest = ''.join(t for t in inp if t not in contracted)
    h = op(
        f"{''.join(inp)},{''.join(contracted)}{z}->{rest}{z}",
        x,
        a,
        precision=precision,
        **kwargs,
    )
    y = op(
        f"{rest}{z},{z}{''.join(outputs)}->{''.join(out)}",
        h,
        b,
        precision=precision,
        out_sharding=out_sharding,
        **kwargs,
    )
    if bias is not None:
      size = dict(zip(outputs, view.out_shape))
      shape = []
      for t in out:
        if t == _ELLIPSIS:
          shape += [1] * (y.ndim - len(out) + 1)
        else:
          shape.append(size.get(t, 1))
      y = y + jnp.reshape(bias, shape)
    return y
  dot = dot_general or jax.lax.dot_general
  if view.kind == 'linear':
    axis = (x.ndim - 1,)
  else:
    axis = tuple(sorted(ax % x.ndim for ax in view.axis))
  h = dot(
      x,
      a,
      ((axis, tuple(range(len(axis)))), ((), ())),
      precision=precision,
      **kwargs,
  )  # [*rest, rank]
  y = dot(
      h,
      b,
      (((h.ndim - 1,), (0,)), ((), ())),
      precision=precision,
      out_sharding=out_sharding,
      **kwargs,
  )  # [*rest, *out]
  if bias is not None:
    y = y + jnp.reshape(bias, (1,) * (h.ndim - 1) + view.out_shape)
  return y


def factored_from(module: Any, a: jax.Array, b: jax.Array) -> FactoredLinear:
  """A FactoredLinear that stands in for `module` (a handled layer).

  The factors are stored in the kernel's dtype; the bias, the contraction
  and the output shape, `dtype`, `param_dtype`, `precision`,
  `dot_general` / `dot_general_cls` / `einsum_op`, `promote_dtype` and
  `preferred_element_type` are the layer's.

  Args:
    module: an `nnx.Linear`, `nnx.LinearGeneral` or `nnx.Einsum`.
    a: float[*stack, d_in, rank], the left factor of its matrix view.
    b: float[*stack, rank, d_out].
  """
  view = matrix_view(module)
  dtype = module.kernel.dtype
  bias = module.bias[...] if module.bias is not None else None
  return FactoredLinear(
      jnp.asarray(a).astype(dtype),
      jnp.asarray(b).astype(dtype),
      bias,
      view=view,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
      precision=module.precision,
      dot_general=getattr(module, 'dot_general', None),
      dot_general_cls=getattr(module, 'dot_general_cls', None),
      einsum_op=getattr(module, 'einsum_op', None),
      promote_dtype=module.promote_dtype,
      preferred_element_type=module.preferred_element_type,
  )


def factored_from_linear(
    linear: nnx.Linear, a: jax.Array, b: jax.Array
) -> FactoredLinear:
  """`factored_from` for an `nnx.Linear` (kept for existing callers)."""
  return factored_from(linear, a, b)


# -------------------------------------------------------------- the tree ---


def path_name(path: tuple[Any, ...]) -> str:
  """('layers', 0, 'attn', 'q_proj') -> 'layers.0.attn.q_proj'."""
  return '.'.join(str(p) for p in path)


def _matches(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_param_matrix(value: Any) -> bool:
  return isinstance(value, nnx.Param) and np.ndim(value) >= 2


def _own_matrices(module: nnx.Module) -> list[str]:
  """Attribute names of the matrix-shaped Params held by `module` itself."""
  names = []
  for key, value in vars(module).items():
    if _is_param_matrix(value):
      names.append(key)
    elif isinstance(value, dict):  # e.g. nnx.bridge.ToNNX's Linen params
      for path, leaf in jax.tree_util.tree_flatten_with_path(
          value, is_leaf=lambda v: isinstance(v, nnx.Variable)
      )[0]:
        if _is_param_matrix(leaf):
          names.append(key + jax.tree_util.keystr(path))
  return names


def find_layers(
    model: nnx.Module,
) -> tuple[dict[str, MatrixView], dict[str, str]]:
  """Every dense layer of `model`: the handled ones and the others.

  Returns:
    (handled, unhandled): `handled[module path]` is the layer's MatrixView;
    `unhandled[module path]` says why a module holding a matrix-shaped
    nnx.Param is not handled (embeddings and norms are not dense layers and
    are not listed; already factored layers are neither).
  """
  handled, unhandled = {}, {}
  for path, module in nnx.iter_modules(model):
    name = path_name(path)
    if isinstance(module, (FactoredLinear,) + _NOT_DENSE):
      continue
    if isinstance(module, HANDLED):
      try:
        handled[name] = matrix_view(module)
      except ValueError as e:
        unhandled[name] = f'{type(module).__name__}: {e}'
      continue
    own = _own_matrices(module)
    if own:
      kind = type(module).__name__
      if isinstance(module, nnx.bridge.ToNNX):
        unhandled[name] = (
            f'{kind} (Linen inside; use ctxlr.linen): ' f'{", ".join(own[:4])}'
        )
      else:
        unhandled[name] = f'{kind}: params {", ".join(own[:4])}'
  return handled, unhandled


def stacked_names(name: str, stack: tuple[int, ...]) -> list[str]:
  """The layer names of a module's stacked kernels: 'up' -> ['up[0]', …]."""
  if not stack:
    return [name]
  return [
      f"{name}[{','.join(map(str, i))}]"
      for i in itertools.product(*(range(s) for s in stack))
  ]


_INDEX = re.compile(r'^(.*)\[(\d+(?:,\d+)*)\]$')


def split_name(name: str) -> tuple[str, tuple[int, ...]]:
  """'blocks.up[2]' -> ('blocks.up', (2,)); 'a.b' -> ('a.b', ())."""
  m = _INDEX.match(name)
  if m is None:
    return name, ()
  return m.group(1), tuple(int(i) for i in m.group(2).split(','))


def _order(name: str) -> tuple:
  """Sort key: numeric path components (and stack indices) as numbers."""
  module, index = split_name(name)
  return tuple(
      (0, int(p), '') if p.isdigit() else (1, 0, p) for p in module.split('.')
  ) + (
      (0, index, ''),
  )


def _choose(
    names_of: Mapping[str, list[str]], include, exclude
) -> dict[str, list[str]]:
  """{module: its chosen layer names}, by module path or layer name."""
  out = {}
  for module, names in names_of.items():
    chosen = [
        n
        for n in names
        if (_matches(module, include) or _matches(n, include))
        and not (_matches(module, exclude) or _matches(n, exclude))
    ]
    if chosen:
      out[module] = chosen
  return out


def unhandled_layers(
    model: nnx.Module,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
) -> dict[str, str]:
  """{module path: why not handled} for the modules the patterns choose
  that hold a matrix-shaped Param but are not a handled layer."""
  include, exclude = tuple(include), tuple(exclude)
  _, unhandled = find_layers(model)
  return {
      n: why
      for n, why in unhandled.items()
      if _matches(n, include) and not _matches(n, exclude)
  }


def warn_unhandled(skipped: Mapping[str, str]) -> None:
  """One logged warning naming every layer of a kind not factored."""
  logging.warning(
      '%d layer(s) hold a matrix parameter but are of a kind ctxlr does not '
      'factor; they stay as they are: %s',
      len(skipped),
      '; '.join(f'{n} ({why})' for n, why in sorted(skipped.items())),
  )


def select_linears(
    model: nnx.Module,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
) -> dict[str, tuple[int, int]]:
  """The handled layers whose path matches, with their matrix shapes.

  Handled: `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum` (see
  `matrix_view`). Each stacked kernel of a stacked module is its own layer
  `path[i]`; a pattern matching the module path or the layer name chooses
  it. Modules the patterns choose that hold a matrix-shaped Param but are
  not handled are named in one logged warning (`unhandled_layers`).

  Args:
    model: any NNX module tree.
    include: fnmatch patterns on the dotted path; a layer is chosen if it
      matches one of them …
    exclude: … and none of these.

  Returns:
    {layer: (d_in, d_out)} in module-tree order.

  Raises:
    ValueError: if `include` is a string (not a sequence of patterns), if
      an include pattern matches no handled layer, or if none is chosen.
  """
  if isinstance(include, str) or isinstance(exclude, str):
    raise ValueError(
        'include and exclude must be sequences of patterns, '
        f'e.g. ({include!r},); got a string.'
    )
  include, exclude = tuple(include), tuple(exclude)
  if isinstance(model, nnx.bridge.ToNNX):
    raise ValueError(
        'model is an nnx.bridge.ToNNX (a Linen model inside): '
        'compress it with ctxlr.linen.compress_bridged(model, '
        'batches, ratio=…).'
    )
  handled, _ = find_layers(model)
  names_of = {m: stacked_names(m, v.stack) for m, v in handled.items()}
  every = [n for names in names_of.values() for n in names]
  for pattern in include:
    if not any(fnmatch.fnmatchcase(n, pattern) for n in list(names_of) + every):
      raise ValueError(
          f'Pattern {pattern!r} matches no handled layer '
          f'({", ".join(t.__name__ for t in HANDLED)}); layers '
          f'are e.g. {sorted(every)[:4]}; not handled: '
          f'{sorted(find_layers(model)[1])[:4]}.'
      )
  chosen = {}
  for module, names in _choose(names_of, include, exclude).items():
    view = handled[module]
    chosen.update({n: (view.d_in, view.d_out) for n in names})
  if not chosen:
    raise ValueError(
        f'No handled layer matches include={include} and ' f'exclude={exclude}.'
    )
  skipped = unhandled_layers(model, include, exclude)
  if skipped:
    warn_unhandled(skipped)
  return dict(sorted(chosen.items(), key=lambda kv: _order(kv[0])))


def stack_of(model: nnx.Module, names: Iterable[str]) -> dict[str, str]:
  """{layer: its module path} (the same path for the layers of a stack)."""
  return {n: split_name(n)[0] for n in names}


def _path_of(model: nnx.Module, name: str) -> tuple[Any, ...]:
  """The module-tree path (real keys: ints, strings) of dotted `name`."""
  if name == '':
    return ()
  path = _direct_path(model, name)
  if path is not None:
    return path
  for path, _ in nnx.iter_modules(model):
    if path_name(path) == name:
      return tuple(path)
  module, index = split_name(name)
  if index:
    raise ValueError(
        f'{name!r} is one stacked layer of {module!r}: use '
        'kernel_matrix / apply_factors, or the module path.'
    )
  raise ValueError(f'No module at path {name!r}.')


def _direct_path(model: nnx.Module, name: str) -> tuple[Any, ...] | None:
  """`name`'s path found by walking its parts (one lookup each), or None.

  The graph's keys: attribute names of a module, ints of a list or tuple,
  the keys of a dict. Searching every module per name instead made the
  taps of a 210-layer model cost seconds per calibration call.
  """
  node, path = model, []
  for part in name.split('.'):
    ints = [int(part)] if part.isdigit() and str(int(part)) == part else []
    if isinstance(node, (nnx.List, list, tuple)):
      keys = [i for i in ints if i < len(node)]
    elif isinstance(node, nnx.Dict):  # string keys only
      keys = [part] if part in node else []
    elif isinstance(node, dict):
      keys = [k for k in [part, *ints] if k in node]
    elif isinstance(node, nnx.Module):
      keys = [part] if part in vars(node) else []
    else:
      return None
    if not keys:
      return None
    node = _child(node, keys[0])
    path.append(keys[0])
  return tuple(path) if isinstance(node, nnx.Module) else None


def _child(node: Any, key: Any) -> Any:
  if isinstance(key, int) or isinstance(node, (dict, nnx.Dict)):
    return node[key]
  return getattr(node, key)


def get_module(model: nnx.Module, name: str) -> Any:
  """The submodule at dotted path `name` (a module path, not `path[i]`)."""
  node = model
  for key in _path_of(model, name):
    node = _child(node, key)
  return node


def replace_module(model: nnx.Module, name: str, new: nnx.Module) -> None:
  """Sets the submodule at dotted path `name` to `new`, in place."""
  path = _path_of(model, name)
  if not path:
    raise ValueError('The root module cannot be replaced in place.')
  parent = model
  for key in path[:-1]:
    parent = _child(parent, key)
  key = path[-1]
  if isinstance(key, int) or isinstance(parent, (dict, nnx.Dict)):
    parent[key] = new
  else:
    setattr(parent, key, new)


def kernel_matrix(model: nnx.Module, name: str) -> jax.Array:
  """Layer `name`'s kernel as its matrix view, float[d_in, d_out].

  `name` is a layer of `select_linears` (`path`, or `path[i]` for one
  kernel of a stack); the array is in the kernel's storage dtype.
  """
  module, index = split_name(name)
  layer = get_module(model, module)
  kernel = kernel_as_matrix(layer)
  if len(index) != kernel.ndim - 2:
    raise ValueError(
        f'{name!r}: the layer has stacked axes '
        f'{kernel.shape[:-2]}; name one kernel as '
        f'{stacked_names(module, kernel.shape[:-2])[0]!r}.'
    )
  return kernel[index] if index else kernel


def _exact_factors(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Factors with a b = K exactly, rank min(d_in, d_out)."""
  d_in, d_out = kernel.shape
  if d_out <= d_in:
    return kernel, jnp.eye(d_out, dtype=kernel.dtype)
  return jnp.eye(d_in, dtype=kernel.dtype), kernel


def stack_factors(
    name: str,
    view: MatrixView,
    parts: Mapping[tuple[int, ...], tuple[jax.Array, jax.Array]],
    kernels: Callable[[], jax.Array],
) -> tuple[jax.Array, jax.Array]:
  """One module's factors, `{stack index: (a, b)}`, as stacked arrays.

  The rank is the largest given (smaller ones padded with zeros, which
  changes no product); a stacked layer not given keeps its kernel exactly
  (a b = K at rank min(d_in, d_out), from `kernels()`, the module's
  float[*stack, d_in, d_out]).
  """
  if () in parts:
    if view.stack:
      raise ValueError(
          f'{name!r} is stacked {view.stack}: give its layers '
          f'as {stacked_names(name, view.stack)[0]!r}, ….'
      )
    a, b = parts[()]
  else:
    indices = list(itertools.product(*(range(s) for s in view.stack)))
    bad = [i for i in parts if i not in indices]
    if bad:
      raise ValueError(
          f'{name!r} has stacked axes {view.stack}; got ' f'indices {bad}.'
      )
    full = dict(parts)
    if len(full) < len(indices):
      k = kernels()
      full.update({i: _exact_factors(k[i]) for i in indices if i not in full})
    rank = max(a.shape[1] for a, _ in full.values())
    pad = lambda a, b: (
        jnp.pad(a, ((0, 0), (0, rank - a.shape[1]))),
        jnp.pad(b, ((0, rank - b.shape[0]), (0, 0))),
    )
    padded = [pad(*full[i]) for i in indices]
    a = jnp.stack([p[0] for p in padded]).reshape(
        view.stack + padded[0][0].shape
    )
    b = jnp.stack([p[1] for p in padded]).reshape(
        view.stack + padded[0][1].shape
    )
  if a.shape[-2] != view.d_in or b.shape[-1] != view.d_out:
    raise ValueError(
        f'{name!r}: factors a {a.shape}, b {b.shape} do not '
        f'fit its ({view.d_in}, {view.d_out}) matrix view.'
    )
  return a, b


def apply_factors(
    model: nnx.Module, factors: Mapping[str, Any]
) -> dict[str, int]:
  """Replaces the factored layers by FactoredLinear modules, in place.

  Args:
    model: the model `select_linears` named the layers of.
    factors: {layer: (a, b)} or {layer: dict(a=, b=, …)} with a:
      float[d_in, rank], b: float[rank, d_out]. For a stack, the layers
      given are stacked back into one FactoredLinear; its rank is their
      largest (smaller ranks padded with zeros, which changes no product)
      and a layer of the stack not given keeps its kernel exactly (a b = K
      at rank min(d_in, d_out)).

  Returns:
    {module path: stored rank} of every replaced module.
  """
  by_module: dict[str, dict[tuple[int, ...], tuple]] = {}
  for name, f in factors.items():
    a, b = (f['a'], f['b']) if isinstance(f, Mapping) else f
    module, index = split_name(name)
    by_module.setdefault(module, {})[index] = (jnp.asarray(a), jnp.asarray(b))
  ranks = {}
  for module, parts in by_module.items():
    layer = get_module(model, module)
    view = matrix_view(layer)
    a, b = stack_factors(
        module, view, parts, functools.partial(kernel_as_matrix, layer)
    )
    new = factored_from(layer, a, b)
    replace_module(model, module, new)
    ranks[module] = new.rank
  return ranks


def factored_like(module: Any, rank: int) -> FactoredLinear:
  """A rank-`rank` FactoredLinear for `module` with zero factors.

  The structure to restore saved factors into (`checkpoint.load`): shapes,
  stacking, bias and compute settings are those `factored_from` gives.
  """
  view = matrix_view(module)
  dtype = module.kernel.dtype
  return factored_from(
      module,
      jnp.zeros(view.stack + (view.d_in, rank), dtype),
      jnp.zeros(view.stack + (rank, view.d_out), dtype),
  )
