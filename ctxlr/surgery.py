"""Model surgery on Flax NNX models: find dense layers, swap in factored ones.

    >>> spec = select_linears(model)                  # {'layers.0.attn.q_proj': (576, 576), …}
    >>> replace_module(model, 'layers.0.attn.q_proj', FactoredLinear(a, b, bias))

Layers are named by their dotted path in the module tree (list indices as
numbers), and chosen with fnmatch-style patterns on that path.
"""
import fnmatch
from typing import Any, Iterable

from flax import nnx
import jax
import jax.numpy as jnp

# Every projection except embeddings and output heads (docs/method.md
# §1: the dense layers that carry most parameters).
DEFAULT_INCLUDE = ('*',)
DEFAULT_EXCLUDE = ('*embed*', '*lm_head*', '*head')


class FactoredLinear(nnx.Module):
  """`y = (x a) b + bias`: a rank-r stand-in for an `nnx.Linear`.

  The factors keep their storage dtype (e.g. bf16); the product is computed
  in float32 at least.

  Attributes:
    a: nnx.Param, float[d_in, rank].
    b: nnx.Param, float[rank, d_out].
    bias: nnx.Param float[d_out], or None.
  """

  def __init__(self, a: jax.Array, b: jax.Array,
               bias: jax.Array | None = None):
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
      raise ValueError(f'Factors a {a.shape} and b {b.shape} do not chain '
                       '(need a: [d_in, rank], b: [rank, d_out]).')
    if bias is not None and bias.shape != (b.shape[1],):
      raise ValueError(f'bias has shape {bias.shape}; expected '
                       f'({b.shape[1]},).')
    self.a = nnx.Param(a)
    self.b = nnx.Param(b)
    self.bias = nnx.Param(bias) if bias is not None else None

  @property
  def in_features(self) -> int:
    return self.a.shape[0]

  @property
  def out_features(self) -> int:
    return self.b.shape[1]

  @property
  def rank(self) -> int:
    return self.a.shape[1]

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = jnp.result_type(jnp.float32, x.dtype)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.matmul(jnp.matmul(x.astype(dtype), self.a[...].astype(dtype),
                              precision=hi),
                   self.b[...].astype(dtype), precision=hi)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def path_name(path: tuple[Any, ...]) -> str:
  """('layers', 0, 'attn', 'q_proj') -> 'layers.0.attn.q_proj'."""
  return '.'.join(str(p) for p in path)


def _matches(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_linears(model: nnx.Module, include: Iterable[str] = DEFAULT_INCLUDE,
                   exclude: Iterable[str] = DEFAULT_EXCLUDE
                   ) -> dict[str, tuple[int, int]]:
  """The `nnx.Linear` layers whose dotted path matches, with their shapes.

  Args:
    model: any NNX module tree.
    include: fnmatch patterns on the dotted path; a layer is chosen if it
      matches one of them …
    exclude: … and none of these.

  Returns:
    {path: (d_in, d_out)} in module-tree order.

  Raises:
    ValueError: if an include pattern matches no Linear layer.
  """
  include, exclude = tuple(include), tuple(exclude)
  linears = {path_name(p): m for p, m in nnx.iter_modules(model)
             if isinstance(m, nnx.Linear)}
  for pattern in include:
    if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
      raise ValueError(f'Pattern {pattern!r} matches no nnx.Linear layer; '
                       f'layers are e.g. {sorted(linears)[:4]}.')
  chosen = {n: (m.in_features, m.out_features) for n, m in linears.items()
            if _matches(n, include) and not _matches(n, exclude)}
  if not chosen:
    raise ValueError(f'No nnx.Linear layer matches include={include} and '
                     f'exclude={exclude}.')
  return dict(sorted(chosen.items(), key=lambda kv: _order(kv[0])))


def _order(name: str) -> tuple:
  """Sort key: numeric path components compare as numbers."""
  return tuple((0, int(p), '') if p.isdigit() else (1, 0, p)
               for p in name.split('.'))


def get_module(model: nnx.Module, name: str) -> Any:
  """The submodule at dotted path `name`."""
  node = model
  for part in name.split('.'):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


def replace_module(model: nnx.Module, name: str, new: nnx.Module) -> None:
  """Sets the submodule at dotted path `name` to `new`, in place."""
  parent_name, _, last = name.rpartition('.')
  parent = get_module(model, parent_name) if parent_name else model
  if last.isdigit():
    parent[int(last)] = new
  else:
    setattr(parent, last, new)


def factored_from_linear(linear: nnx.Linear, a: jax.Array,
                         b: jax.Array) -> FactoredLinear:
  """A FactoredLinear with `linear`'s bias and storage dtype."""
  dtype = linear.kernel.dtype
  bias = linear.bias[...] if linear.bias is not None else None
  return FactoredLinear(a.astype(dtype), b.astype(dtype), bias)
