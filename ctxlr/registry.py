"""One record per low-rank method: the only place a method is declared.

Every method has the same call, `fn(kernel, stats, *, rank, mu=0.) ->
(Factors, SolveInfo)`. Its record says what the rest of the project needs to
know about it: which calibration statistics it reads (so the pipeline
accumulates only those), whether it takes the ridge μ (so configs can refuse
or default it), and whether it computes in float64 from float64 statistics.
Calibration requests, config validation and every experiment's method list
are derived from here.

    @registry.register(needs=('gram',), summary='my Gram method')
    def my_method(kernel, stats, *, rank, mu=0.0): ...

registers `'my_method'` (docs/adding_a_method.md). The registered function
checks its arguments (shapes, finiteness, the statistics it needs) before
running, so a direct call is as safe as one through the pipeline.
"""

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ctxlr import stats as stats_lib
from ctxlr.linalg import checks

STATISTICS = ('r', 'gram', 'abs_sum')


class SolveInfo(NamedTuple):
  """How a method fared; filled by every method, all zero/False if easy."""

  retries: int  # how many times a factorisation was retried
  eps: float  # final jitter / shift / damping added (0.0 if none)
  failed: bool  # gave up (raised internally or exhausted retries)
  nonfinite: bool  # factors contain NaN/Inf


def all_finite(*arrays: jax.Array) -> jax.Array:
  """True (a JAX bool) iff every array is free of NaN and Inf."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))


def solve_info(
    factors: Any, retries: Any = 0, eps: Any = 0.0, failed: Any = False
) -> SolveInfo:
  """A method's SolveInfo; `nonfinite` is read off the factors (on the host:
  no compile per factor shape)."""
  finite = all(
      np.isfinite(np.asarray(x, np.float32)).all()
      for x in (factors.a, factors.b)
  )
  return SolveInfo(int(retries), float(eps), bool(failed), not finite)


@dataclasses.dataclass(frozen=True)
class Method:
  """What the project knows about one method.

  Attributes:
    name: the name configs and `compress(method=)` use.
    fn: the solver, `fn(kernel, stats, *, rank, mu=0.) -> (Factors,
      SolveInfo)`, with argument checks.
    needs: the statistics it reads, a subset of `STATISTICS` (R is always
      accumulated: reports and rank allocation use it).
    takes_mu: whether it has the ridge term μ ||K − K'||² (docs/method.md §4);
      the others refuse mu > 0.
    float64: whether it computes in float64 and wants float64 statistics
      (a reference, not a method to ship).
    summary: one line for listings.
    options: {name: default} of the method-specific keyword options it takes
      besides `rank` and `mu` (e.g. coala's weighting `power`); any other
      keyword is refused.
    check: `check(options) -> None`, raises ValueError for a bad option value
      (run by `check_options` before any long work), or None.
    nested: whether the rank-r factors are the first r directions of the
      full-rank ones, for every option value (a truncated decomposition);
      then `pipeline.factorize_layers` may solve a layer once for several
      ranks (its `full` cache). False for ASVD's randomized SVD, whose
      subspace depends on the rank it is asked for.
  """

  name: str
  fn: Callable[..., Any]
  needs: tuple[str, ...]
  takes_mu: bool = False
  float64: bool = False
  summary: str = ''
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Callable[[Mapping[str, Any]], None] | None = None
  nested: bool = False

  @property
  def want(self) -> stats_lib.Want:
    """The calibration statistics to accumulate for this method."""
    return stats_lib.Want(
        gram='gram' in self.needs, abs_sum='abs_sum' in self.needs
    )

  @property
  def context_aware(self) -> bool:
    """Whether it reads calibration data at all (plain SVD does not)."""
    return bool(self.needs)


_METHODS: dict[str, Method] = {}


def _load_builtins() -> None:
  # The built-in methods register themselves when their modules load.
  from ctxlr import baselines  # pylint: disable=g-import-not-at-top,unused-import
  from ctxlr import methods  # pylint: disable=g-import-not-at-top,unused-import


def register(
    *,
    needs: tuple[str, ...],
    takes_mu: bool = False,
    float64: bool = False,
    summary: str = '',
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
    nested: bool = False,
) -> Callable[[Callable], Callable]:
  """Decorator: registers `fn` under `name` (default: its `__name__`).

  The returned function is `fn` behind the shared argument checks
  (`check_inputs`, and `check_options` for the method-specific keyword
  `options`, {name: default}). Raises ValueError for a name already taken
  or an unknown statistic.
  """
  unknown = set(needs) - set(STATISTICS)
  if unknown:
    raise ValueError(
        f'needs must be a subset of {STATISTICS}; got ' f'{sorted(unknown)}.'
    )

  def decorate(fn: Callable) -> Callable:
    key = name or fn.__name__
    if key in _METHODS:
      raise ValueError(f'A method named {key!r} is already registered.')

    @functools.wraps(fn)
    def checked(kernel, stats, *, rank, mu=0.0, **kwargs):
      check_inputs(_METHODS[key], kernel, stats, rank, mu)
      check_options(key, kwargs)
      return fn(kernel, stats, rank=rank, mu=mu, **kwargs)

    _METHODS[key] = Method(
        key,
        checked,
        tuple(needs),
        takes_mu,
        float64,
        summary,
        dict(options or {}),
        check,
        nested,
    )
    return checked

  return decorate


def unregister(name: str) -> None:
  """Removes a method (for tests that register a throwaway one)."""
  _METHODS.pop(name)


@contextlib.contextmanager
def registered(fn: Callable, **kwargs) -> Iterator[Method]:
  """Registers `fn` (as `register(**kwargs)` would) for a `with` block."""
  register(**kwargs)(fn)
  key = kwargs.get('name') or fn.__name__
  try:
    yield _METHODS[key]
  finally:
    unregister(key)


def get(name: str) -> Method:
  """The record of `name`; ValueError listing the known names otherwise."""
  _load_builtins()
  if not isinstance(name, str) or name not in _METHODS:
    raise ValueError(f'method must be one of {names()}; got {name!r}.')
  return _METHODS[name]


def names(
    *,
    takes_mu: bool | None = None,
    needs: str | None = None,
    float64: bool | None = None,
) -> list[str]:
  """Registered names, sorted, optionally filtered by record fields."""
  _load_builtins()
  return sorted(
      m.name
      for m in _METHODS.values()
      if (takes_mu is None or m.takes_mu == takes_mu)
      and (needs is None or needs in m.needs)
      and (float64 is None or m.float64 == float64)
  )


def solve(
    name: str,
    kernel: Any,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float = 0.0,
    **options,
) -> tuple[Any, Any]:
  """Rank-`rank` factors of K by the method `name`, the same call for all.

  >>> x = jax.random.normal(jax.random.key(0), (256, 16))
  >>> kernel = jax.random.normal(jax.random.key(1), (16, 24))
  >>> f, info = solve('svd_llm', kernel, stats_lib.stats_from_x(x), rank=4)
  >>> f.a.shape, f.b.shape, info.failed
  ((16, 4), (4, 24), False)

  Args:
    name: a registered method (`names()`).
    kernel: K, float[d_in, d_out]; y = x @ K.
    stats: the layer's `LayerStats`, with the statistics the method needs.
    rank: 1 <= rank <= min(d_in, d_out).
    mu: ridge weight μ >= 0 (methods with `takes_mu` only).
    **options: the method's own keyword options (`Method.options`).

  Returns:
    (Factors(a: [d_in, rank], b: [rank, d_out], sigma), SolveInfo).
  """
  return get(name).fn(kernel, stats, rank=rank, mu=mu, **options)


def check_options(name: str, options: Mapping[str, Any] | None) -> None:
  """Raises ValueError for an option `name` does not take or a bad value.

  Cheap (no data): the pipeline calls it before calibrating.
  """
  method = get(name)
  options = dict(options or {})
  unknown = sorted(set(options) - set(method.options))
  if unknown:
    raise ValueError(
        f'method_options: {name!r} takes '
        f'{sorted(method.options) or "no options"}; got {unknown}.'
    )
  if method.check is not None and options:
    method.check(options)


def check_inputs(
    method: Method, kernel: Any, stats: Any, rank: Any, mu: Any
) -> None:
  """Raises ValueError for bad arguments, naming the method and argument."""
  name = method.name
  checks.check_matrix('kernel', kernel)
  d_in, d_out = kernel.shape
  checks.check_rank(rank, d_in, d_out)
  checks.check_finite('kernel', kernel)
  if not isinstance(stats, stats_lib.LayerStats):
    raise ValueError(
        f'{name}: stats must be a LayerStats (see '
        f'ctxlr.stats.stats_from_x); got {type(stats).__name__}.'
    )
  if jnp.ndim(mu) != 0:
    raise ValueError(f'mu must be a scalar; got shape {jnp.shape(mu)}.')
  checks.check_nonnegative('mu', mu)
  if not method.takes_mu and float(mu) != 0.0:
    raise ValueError(
        f'{name}: mu={float(mu)} but {name} has no ridge term; methods with '
        f'one: {names(takes_mu=True)} (docs/method.md §4).'
    )
  for field in method.needs:
    if getattr(stats, field) is None:
      raise ValueError(
          f'{name} needs stats.{field}, which is None; compute '
          f'it with stats_from_x(x, {field}=True).'
      )
  if 'r' in method.needs:
    checks.check_matrix('stats.r', stats.r, cols=d_in)
    checks.check_finite('stats.r', stats.r)
  if 'gram' in method.needs:
    checks.check_matrix('stats.gram', stats.gram, rows=d_in, cols=d_in)
    checks.check_finite('stats.gram', stats.gram)
  if 'abs_sum' in method.needs:
    if jnp.shape(stats.abs_sum) != (d_in,):
      raise ValueError(
          f'stats.abs_sum has shape {jnp.shape(stats.abs_sum)}; '
          f'expected ({d_in},) for kernel {kernel.shape}.'
      )
    checks.check_finite('stats.abs_sum', stats.abs_sum)
    if bool(jnp.any(jnp.asarray(stats.abs_sum) < 0)):
      raise ValueError(
          'stats.abs_sum has negative entries; it must be ' 'Σ_tokens |x| >= 0.'
      )
    count = stats.count
    if (
        isinstance(count, bool)
        or not isinstance(count, (int, np.integer))
        or (count < 1)
    ):
      raise ValueError(
          f'{name} needs stats.count >= 1 tokens; got ' f'{stats.count!r}.'
      )
