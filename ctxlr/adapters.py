"""Fine-tuning adapters `y = x K_res + s (x a) b + bias`, initialised 7 ways.

    stats = calibration.layer_stats(model, batches, layers)   # task inputs
    add_adapters(model, stats, method='coala', rank=8)
    optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE)   # a, b only

An `AdapterLinear` replaces an `nnx.Linear` (same surgery as compression):
the frozen residual `K_res` and bias stay `nnx.Param`s, the factors `a`
(`d_in × r`) and `b` (`r × d_out`) are `nnx.LoRAParam`s (a Param subclass, as
in `flax.nnx.LoRA`), so `wrt=nnx.LoRAParam` trains them and nothing else.

Every initialisation keeps the layer's function at step 0,
`K_res + s a b = K` (to rounding), and differs in which rank-r part of K the
adapter starts from (K float[d_in, d_out], `y = x K`):

* `lora`: `a` uniform in ±1/√d_in (PEFT's kaiming_uniform(√5)), `b = 0`,
  `K_res = K`.
* `pissa`: plain SVD `K = U S Vᵀ`, top r: `a = U_r √S_r`, `b = √S_r V_rᵀ`.
* `milora`: the same with the bottom r singular triplets.
* `corda`: CorDA's instruction-previewed adaptation (IPA), as `iboing/CorDA`
  and PEFT's `corda.py` do it: `svd(W C)` of the damped covariance, top r,
  `V ← (Vᵀ C⁻¹)ᵀ`, `A = √S Vᵀ`, `B = U √S` (`baselines.corda`; W = Kᵀ).
* `coala`: the inversion-free context-aware top r of the task data
  (docs/method.md §2): `R K = U Σ Vᵀ`, `a = K V_r`, `b = V_rᵀ`, so `a b` is the
  rank-r minimiser of `||X_task (K − K')||_F`. With `mu` = μ₀ > 0 (rule
  `mu_rule`: 'energy' or COALA's adaptive 'error_ratio') the regularized
  minimiser of `||X(K − K')||² + μ||K − K'||²` (`methods.coala`).
* `k_star`: K_*, the minimiser of `||X_task (K − K')||_F` closest to K, the
  μ → 0 limit (`methods.k_star`, float64); the `coala` init unless the task
  data leave the top r directions undetermined.
* `coala_kpa`: knowledge-preserving: the context-aware directions of
  *general* data stay frozen. With `R_g K = U Σ Vᵀ` (thin SVD, p =
  min(rows of R_g, d_out) triplets), the adapter takes the bottom r:
  `a = K V_b`, `b = V_bᵀ`, `V_b = V[:, p−r:p]`; then `K_res = K V_t V_tᵀ +
  K (I − V Vᵀ)` keeps the top p − r directions, and `||X_g (K − K_res)||_F²
  = Σ_{i>p−r} σ_i²`: K_res is the best rank-(p−r) fit of K on general data
  plus K's part outside the row space of R_g K.

`split='balanced'` (any method but lora) keeps the product and K_res and
re-splits them as PiSSA does, `a = P √D`, `b = √D Qᵀ` (`balance`).
Everything is computed from streamed statistics (`LayerStats`: R, or the
Gram for CorDA), so any number of calibration tokens works.
"""

import functools
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from ctxlr import baselines
from ctxlr import methods
from ctxlr import stats as stats_lib
from ctxlr import surgery
from ctxlr.linalg import checks
from ctxlr.linalg import solvers

_HIGHEST = jax.lax.Precision.HIGHEST
TRAINABLE = nnx.LoRAParam  # the filter of the adapter factors a, b


class AdapterInit(NamedTuple):
  """Initial weights of one adapter layer; `k_res + a b` equals K."""

  k_res: jax.Array  # shape=(d_in, d_out), frozen residual, kernel dtype
  a: jax.Array  # shape=(d_in, rank), trainable, kernel dtype
  b: jax.Array  # shape=(rank, d_out), trainable, kernel dtype


class AdapterLinear(nnx.Module):
  """`y = x K_res + scaling · (x a) b + bias`; only `a`, `b` are trained.

  Computes in float32 at least (`Precision.HIGHEST`), whatever the storage
  dtype, like `surgery.FactoredLinear`.

  Attributes:
    k_res: nnx.Param, float[d_in, d_out] (frozen).
    a: nnx.LoRAParam, float[d_in, rank].
    b: nnx.LoRAParam, float[rank, d_out].
    bias: nnx.Param, float[d_out] (frozen), or None.
    scaling: the LoRA scale s (alpha / rank); a Python float.
  """

  def __init__(
      self,
      k_res: jax.Array,
      a: jax.Array,
      b: jax.Array,
      bias: jax.Array | None = None,
      *,
      scaling: float = 1.0,
  ):
    if (
        k_res.ndim != 2
        or a.ndim != 2
        or b.ndim != 2
        or a.shape[1] != b.shape[0]
        or (a.shape[0], b.shape[1]) != k_res.shape
    ):
      raise ValueError(
          f'k_res {k_res.shape}, a {a.shape} and b {b.shape} do '
          'not fit (need [d_in, d_out], [d_in, r], [r, d_out]).'
      )
    if bias is not None and bias.shape != (k_res.shape[1],):
      raise ValueError(
          f'bias has shape {bias.shape}; expected ' f'({k_res.shape[1]},).'
      )
    self.k_res = nnx.Param(k_res)
    self.a = nnx.LoRAParam(a)
    self.b = nnx.LoRAParam(b)
    self.bias = nnx.Param(bias) if bias is not None else None
    self.scaling = float(scaling)

  @property
  def rank(self) -> int:
    return self.a.shape[1]

  def merged_kernel(self) -> jax.Array:
    """`K_res + s a b` in the storage dtype: the dense kernel it computes."""
    dtype = jnp.result_type(jnp.float32, self.k_res.dtype)
    ab = jnp.matmul(
        self.a[...].astype(dtype), self.b[...].astype(dtype), precision=_HIGHEST
    )
    return (self.k_res[...].astype(dtype) + self.scaling * ab).astype(
        self.k_res.dtype
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = jnp.result_type(jnp.float32, x.dtype)
    x = x.astype(dtype)
    y = jnp.matmul(x, self.k_res[...].astype(dtype), precision=_HIGHEST)
    xa = jnp.matmul(x, self.a[...].astype(dtype), precision=_HIGHEST)
    y = y + self.scaling * jnp.matmul(
        xa, self.b[...].astype(dtype), precision=_HIGHEST
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


# ---------------------------------------------------------- initialisers ---


def _finish(kernel: jax.Array, a: jax.Array, b: jax.Array) -> AdapterInit:
  """`K_res = K − a b` in the compute dtype; everything cast to K's dtype."""
  dtype = checks.compute_dtype(kernel.dtype)
  k = kernel.astype(dtype)
  k_res = k - jnp.matmul(a.astype(dtype), b.astype(dtype), precision=_HIGHEST)
  return AdapterInit(
      k_res.astype(kernel.dtype), a.astype(kernel.dtype), b.astype(kernel.dtype)
  )


def lora(
    kernel: jax.Array,
    stats: Any,
    *,
    rank: int,
    key: jax.Array,
    general_stats: Any = None,
) -> AdapterInit:
  """`a` ~ U(±1/√d_in) (PEFT: `kaiming_uniform_(a=√5)`), `b = 0`, K_res = K."""
  del stats, general_stats
  d_in, d_out = kernel.shape
  dtype = checks.compute_dtype(kernel.dtype)
  bound = 1.0 / math.sqrt(d_in)
  a = jax.random.uniform(key, (d_in, rank), dtype, -bound, bound)
  return AdapterInit(
      kernel, a.astype(kernel.dtype), jnp.zeros((rank, d_out), kernel.dtype)
  )


@functools.partial(jax.jit, static_argnames=('rank', 'bottom'))
def _svd_init(kernel: jax.Array, *, rank: int, bottom: bool) -> AdapterInit:
  k = kernel.astype(checks.compute_dtype(kernel.dtype))
  u, s, vt = jnp.linalg.svd(k, full_matrices=False)
  sl = slice(s.shape[0] - rank, None) if bottom else slice(0, rank)
  root = jnp.sqrt(s[sl])
  return _finish(kernel, u[:, sl] * root, root[:, None] * vt[sl])


def pissa(
    kernel: jax.Array,
    stats: Any,
    *,
    rank: int,
    key: Any = None,
    general_stats: Any = None,
) -> AdapterInit:
  """Top-r plain SVD `K = U S Vᵀ`: `a = U_r √S_r`, `b = √S_r V_rᵀ` (PiSSA)."""
  del stats, key, general_stats
  return _svd_init(jnp.asarray(kernel), rank=rank, bottom=False)


def milora(
    kernel: jax.Array,
    stats: Any,
    *,
    rank: int,
    key: Any = None,
    general_stats: Any = None,
) -> AdapterInit:
  """Bottom-r plain SVD (MiLoRA): the r smallest of the thin SVD's triplets."""
  del stats, key, general_stats
  return _svd_init(jnp.asarray(kernel), rank=rank, bottom=True)


def corda(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    key: Any = None,
    general_stats: Any = None,
) -> AdapterInit:
  """CorDA IPA: top-r of `svd(W C)` undone by `C⁻¹`, faithfully (baseline).

  `baselines.corda` reproduces the authors' numerics (float32 Gram, damping
  `0.01 · mean(diag C)` doubled until the explicit inverse passes their
  check, `svd(W C_fix)`, `V ← (Vᵀ C_fix⁻¹)ᵀ`, `A = √S Vᵀ`, `B = U √S`), which
  are exactly CorDA's (and PEFT's `corda_init`) adapter factors; the residual
  is `W − B A`. C is the per-token mean `XᵀX / n`: PEFT averages over
  sequences after dividing each by its largest activation, a positive
  rescaling a Gram cannot reproduce. Any scale of C gives the same product
  `A B` and K_res; it only moves weight between A and B (by √scale).
  """
  del key, general_stats
  if stats is None or stats.gram is None or not stats.count:
    raise ValueError(
        'corda needs task statistics with a Gram matrix '
        '(calibrate with want=Want(gram=True)).'
    )
  mean = stats._replace(gram=jnp.asarray(stats.gram) / stats.count)
  factors, info = baselines.corda(kernel, mean, rank=rank)
  if info.failed or info.nonfinite:
    raise ValueError(f'corda: the damped covariance inverse failed ({info}).')
  return _finish(jnp.asarray(kernel), factors.a, factors.b)


def coala(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    key: Any = None,
    general_stats: Any = None,
    mu: float = 0.0,
    mu_rule: str = 'energy',
) -> AdapterInit:
  """Context-aware top r of the task data: `a = K V_r`, `b = V_rᵀ` (§2).

  `V_r`: top right singular vectors of `R K`, R from the task inputs, so
  `a b` minimises `||X_task (K − K')||_F` over rank r, with no Gram matrix
  and no inverse (`solvers.ctx_factors`). With `mu` = μ₀ > 0 the layer's μ
  comes from μ₀ by `mu_rule` (`solvers.layer_mu`: 'energy' or COALA's
  adaptive 'error_ratio', docs/method.md §4) and `a b` minimises
  `||X(K − K')||² + μ||K − K'||²` instead (`methods.coala`: `regularize_r`,
  then the same SVD).
  """
  del key, general_stats
  if stats is None or stats.r is None:
    raise ValueError('coala needs task statistics with R (calibrate).')
  layer_mu = coala_mu(kernel, stats, rank=rank, mu=mu, mu_rule=mu_rule)
  f, _ = methods.coala(jnp.asarray(kernel), stats, rank=rank, mu=layer_mu)
  return _finish(jnp.asarray(kernel), f.a, f.b)


def coala_mu(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    mu: float,
    mu_rule: str,
) -> float:
  """The layer's μ of the `coala` init: μ₀ = `mu` under `mu_rule`."""
  _check_mu('coala', mu, mu_rule)
  if mu == 0:
    return 0.0
  return float(
      solvers.layer_mu(
          jnp.asarray(kernel), jnp.asarray(stats.r), mu, rank=rank, rule=mu_rule
      )
  )


def k_star(
    kernel: jax.Array,
    stats: stats_lib.LayerStats,
    *,
    rank: int,
    key: Any = None,
    general_stats: Any = None,
) -> AdapterInit:
  """K_*: the minimiser of `||X_task (K − K')||_F` closest to K (§5).

  The μ → 0 limit of the regularized init (`methods.k_star`, float64 from
  R): where the task data determine the top r directions (a gap after
  σ_r(X K)) it is the `coala` init; where they do not (rank X K < r, or a
  tie) it fits the data exactly and spends the remaining ranks on the part
  of K the data do not see. `a = K V_*`, `b = V_*ᵀ`.
  """
  del key, general_stats
  if stats is None or stats.r is None:
    raise ValueError('k_star needs task statistics with R (calibrate).')
  f, _ = methods.k_star(jnp.asarray(kernel), stats, rank=rank)
  return _finish(jnp.asarray(kernel), f.a, f.b)


@functools.partial(jax.jit, static_argnames='rank')
def _kpa(kernel: jax.Array, r: jax.Array, *, rank: int) -> AdapterInit:
  dtype = checks.compute_dtype(kernel.dtype, r.dtype)
  k = kernel.astype(dtype)
  rk = jnp.matmul(r.astype(dtype), k, precision=_HIGHEST)  # f[m, d_out]
  vt = jnp.linalg.svd(rk, full_matrices=False)[2]  # f[p, d_out]
  vt_b = vt[vt.shape[0] - rank :]  # f[rank, d_out]
  a = jnp.matmul(k, vt_b.T, precision=_HIGHEST)  # f[d_in, rank]
  return _finish(kernel, a, vt_b)


def coala_kpa(
    kernel: jax.Array,
    stats: Any,
    *,
    rank: int,
    key: Any = None,
    general_stats: stats_lib.LayerStats | None = None,
) -> AdapterInit:
  """Knowledge-preserving: adapter on the bottom r context-aware directions.

  With `R_g K = U Σ Vᵀ` (R_g from *general* data, thin SVD with p
  triplets), `a = K V_b`, `b = V_bᵀ` for the last r columns V_b of V, so
  the frozen `K_res = K − a b` keeps the p − r directions general data
  uses most: `||X_g (K − K_res)||_F² = Σ_{i>p−r} σ_i²`. The task data are
  not used.
  """
  del stats, key
  if general_stats is None or general_stats.r is None:
    raise ValueError(
        'coala_kpa needs general_stats with R (statistics of '
        'general data, e.g. Wikipedia).'
    )
  kernel, r = jnp.asarray(kernel), jnp.asarray(general_stats.r)
  checks.check_matrix('kernel', kernel)
  checks.check_matrix('general_stats.r', r, cols=kernel.shape[0])
  p = min(r.shape[0], kernel.shape[1])
  if not 1 <= rank <= p:
    raise ValueError(f'rank={rank}: R_g K has {p} singular triplets.')
  checks.check_finite('general_stats.r', r)
  return _kpa(kernel, r, rank=rank)


@jax.jit
def _balance(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  dtype = checks.compute_dtype(a.dtype, b.dtype)
  q, r = jnp.linalg.qr(b.astype(dtype).T)  # bᵀ = Q R
  ar = jnp.matmul(a.astype(dtype), r.T, precision=_HIGHEST)  # a b = (a Rᵀ) Qᵀ
  p, d, et = jnp.linalg.svd(ar, full_matrices=False)  # a Rᵀ = P D Eᵀ
  root = jnp.sqrt(d)
  b_new = root[:, None] * jnp.matmul(et, q.T, precision=_HIGHEST)
  return (p * root).astype(a.dtype), b_new.astype(b.dtype)


def balance(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The same product `a b`, split so that `aᵀa = b bᵀ = diag(D)`.

  With `bᵀ = Q R` and `a Rᵀ = P D Eᵀ`: `a' = P √D`, `b' = √D Eᵀ Qᵀ`, the
  split PiSSA, MiLoRA and CorDA use (`U √S`, `√S Vᵀ`). For ctxlr's
  `a = K V_r`, `b = V_rᵀ` and X = I this is exactly PiSSA's init. QR and SVD
  of r-column matrices only.

  Args:
    a: float[d_in, rank].
    b: float[rank, d_out], rank <= d_out.

  Returns:
    (a', b') of the same shapes and dtypes, a' b' = a b to rounding.
  """
  checks.check_matrix('a', a)
  checks.check_matrix('b', b, rows=a.shape[1])
  return _balance(jnp.asarray(a), jnp.asarray(b))


SPLITS = ('own', 'balanced')

METHODS: dict[str, Callable[..., AdapterInit]] = {
    'lora': lora,
    'pissa': pissa,
    'milora': milora,
    'corda': corda,
    'coala': coala,
    'k_star': k_star,
    'coala_kpa': coala_kpa,
}
# Which statistics a method reads: task R / task Gram / general-data R.
NEEDS = {
    'lora': (),
    'pissa': (),
    'milora': (),
    'corda': ('gram',),
    'coala': ('r',),
    'k_star': ('r',),
    'coala_kpa': ('general',),
}
# Methods that take the ridge μ₀ and its rule (`coala`).
TAKES_MU = ('coala',)


def _check_mu(method: str, mu: Any, mu_rule: Any) -> None:
  if mu_rule not in solvers.MU_RULES:
    raise ValueError(
        f'mu_rule must be one of {solvers.MU_RULES}; got {mu_rule!r}.'
    )
  if (
      isinstance(mu, bool)
      or not isinstance(mu, (int, float))
      or not (math.isfinite(mu) and mu >= 0)
  ):
    raise ValueError(f'mu must be a finite number >= 0; got {mu!r}.')
  if mu and method not in TAKES_MU:
    raise ValueError(
        f'mu: only {TAKES_MU} take a ridge μ₀; got mu={mu} for {method}.'
    )


def init_adapter(
    method: str,
    kernel: jax.Array,
    stats: stats_lib.LayerStats | None = None,
    *,
    rank: int,
    key: jax.Array | None = None,
    general_stats: stats_lib.LayerStats | None = None,
    split: str = 'own',
    mu: float = 0.0,
    mu_rule: str = 'energy',
) -> AdapterInit:
  """Initial (K_res, a, b) of one layer by `method`, one call for all.

  >>> x = jax.random.normal(jax.random.key(0), (256, 16))
  >>> kernel = jax.random.normal(jax.random.key(1), (16, 24))
  >>> init = init_adapter('coala', kernel, stats_lib.stats_from_x(x), rank=4)
  >>> init.k_res.shape, init.a.shape, init.b.shape
  ((16, 24), (16, 4), (4, 24))

  Args:
    method: a key of `METHODS`.
    kernel: K, float[d_in, d_out]; y = x @ K.
    stats: LayerStats of the task inputs of this layer (ctxlr: r; corda:
      gram and count; others: unused, may be None).
    rank: 1 <= rank <= min(d_in, d_out).
    key: PRNG key (lora only; default `jax.random.key(0)`).
    general_stats: LayerStats of general-data inputs (coala_kpa: r).
    split: 'own' (the method's definition; ctxlr and coala_kpa: `a = K V`,
      `b = Vᵀ`) or 'balanced' (`balance`: the same `a b` and K_res, split
      as `P √D`, `√D Qᵀ`; not for lora, whose b is 0).
    mu: the ridge μ₀ >= 0 of `coala` (`TAKES_MU`; 0 for the others).
    mu_rule: how μ₀ becomes the layer's μ (`solvers.MU_RULES`).

  Returns:
    AdapterInit(k_res, a, b) in K's dtype, with `k_res + a b = K` to
    rounding.
  """
  if method not in METHODS:
    raise ValueError(
        f'Unknown method {method!r}; expected one of ' f'{sorted(METHODS)}.'
    )
  if split not in SPLITS or (split == 'balanced' and method == 'lora'):
    raise ValueError(
        f'split must be one of {SPLITS} (lora: own); got '
        f'{split!r} for {method}.'
    )
  _check_mu(method, mu, mu_rule)
  checks.check_matrix('kernel', kernel)
  checks.check_rank(rank, *kernel.shape)
  checks.check_finite('kernel', kernel)
  key = jax.random.key(0) if key is None else key
  options = dict(mu=mu, mu_rule=mu_rule) if method in TAKES_MU else {}
  init = METHODS[method](
      jnp.asarray(kernel),
      stats,
      rank=rank,
      key=key,
      general_stats=general_stats,
      **options,
  )
  if split == 'balanced':
    init = init._replace(**dict(zip('ab', balance(init.a, init.b))))
  return init


def add_adapters(
    model: nnx.Module,
    stats: Mapping[str, stats_lib.LayerStats] | None = None,
    *,
    method: str,
    rank: int,
    include: Iterable[str] = surgery.DEFAULT_INCLUDE,
    exclude: Iterable[str] = surgery.DEFAULT_EXCLUDE,
    key: jax.Array | None = None,
    general_stats: Mapping[str, stats_lib.LayerStats] | None = None,
    scaling: float = 1.0,
    split: str = 'own',
    mu: float = 0.0,
    mu_rule: str = 'energy',
) -> dict[str, dict[str, Any]]:
  """Replaces the chosen `nnx.Linear`s by `AdapterLinear`s, in place.

  Args:
    model: an NNX model.
    stats: {layer: LayerStats} of task inputs (e.g. `calibration.calibrate`
      mapped through its `group_of`); needed by ctxlr and corda.
    method: a key of `METHODS`.
    rank: adapter rank r of every layer.
    include: fnmatch patterns on the layers' dotted paths …
    exclude: … and those to leave alone (`surgery.select_linears`).
    key: PRNG key for lora (folded with each layer's index).
    general_stats: {layer: LayerStats} of general data, for coala_kpa.
    scaling: the LoRA scale s of every adapter (alpha / rank). The inits are
      divided by s in `b` (as PEFT divides S by the scaling), so
      `K_res + s a b = K` for every s.
    split: 'own' or 'balanced' (see `init_adapter`).
    mu: `coala`'s ridge μ₀ (`init_adapter`), each layer's μ by `mu_rule`.
    mu_rule: 'energy' or 'error_ratio' (`solvers.MU_RULES`).

  Returns:
    {layer: dict(d_in, d_out, rank)} of the adapted layers (for `coala`
    with μ₀ > 0 also `mu`, the layer's μ).
  """
  if method not in METHODS:
    raise ValueError(
        f'Unknown method {method!r}; expected one of ' f'{sorted(METHODS)}.'
    )
  if not scaling > 0:
    raise ValueError(f'scaling must be > 0; got {scaling}.')
  _check_mu(method, mu, mu_rule)
  shapes = surgery.select_linears(model, include, exclude)
  key = jax.random.key(0) if key is None else key
  if NEEDS[method]:
    source = 'general_stats' if 'general' in NEEDS[method] else 'stats'
    table = general_stats if source == 'general_stats' else stats
    missing = [n for n in shapes if table is None or n not in table]
    if missing:
      raise ValueError(
          f'{method} needs {source} for layers {missing[:3]}'
          f'{" …" if len(missing) > 3 else ""}.'
      )
  report = {}
  for index, (name, (d_in, d_out)) in enumerate(shapes.items()):
    linear = surgery.get_module(model, name)
    try:
      init = init_adapter(
          method,
          linear.kernel[...],
          None if stats is None else stats.get(name),
          rank=rank,
          key=jax.random.fold_in(key, index),
          general_stats=None
          if general_stats is None
          else general_stats.get(name),
          split=split,
          mu=mu,
          mu_rule=mu_rule,
      )
    except ValueError as e:
      raise ValueError(f'{name}: {e}') from e
    bias = linear.bias[...] if linear.bias is not None else None
    b = init.b if scaling == 1.0 else (init.b / scaling).astype(init.b.dtype)
    surgery.replace_module(
        model, name, AdapterLinear(init.k_res, init.a, b, bias, scaling=scaling)
    )
    report[name] = dict(d_in=d_in, d_out=d_out, rank=rank)
    if mu and stats is not None:
      report[name]['mu'] = coala_mu(
          linear.kernel[...], stats[name], rank=rank, mu=mu, mu_rule=mu_rule
      )
  return report


def _abstract_linear(
    d_in: int, d_out: int, bias: bool, dtype: Any
) -> nnx.Linear:
  """An nnx.Linear of this shape whose weights are shapes only (no init)."""
  return nnx.eval_shape(
      lambda: nnx.Linear(
          d_in, d_out, use_bias=bias, param_dtype=dtype, rngs=nnx.Rngs(0)
      )
  )


def merge_adapters(model: nnx.Module) -> list[str]:
  """Replaces every AdapterLinear by an `nnx.Linear` with its merged kernel.

  Returns:
    The dotted paths of the merged layers.
  """
  names = [
      surgery.path_name(p)
      for p, m in nnx.iter_modules(model)
      if isinstance(m, AdapterLinear)
  ]
  for name in names:
    layer = surgery.get_module(model, name)
    d_in, d_out = layer.k_res.shape
    linear = _abstract_linear(
        d_in, d_out, layer.bias is not None, layer.k_res.dtype
    )
    linear.kernel = nnx.Param(layer.merged_kernel())
    if layer.bias is not None:
      linear.bias = nnx.Param(layer.bias[...])
    surgery.replace_module(model, name, linear)
  return names


def count_trainable(model: nnx.Module) -> int:
  """Number of adapter parameters (`nnx.LoRAParam`) in `model`."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, TRAINABLE)))
