"""From a kept-parameter ratio to per-layer ranks (docs/method.md §7).

`uniform`: every layer keeps the same fraction of its parameters.
`global_ranks`: one parameter budget for the whole set of layers, spent where
it removes the most relative weighted error. The error of every rank is free
(`error_of_each_rank(σ(R K))`), so this is exact bookkeeping, not a search:
raising layer l from rank k to k+1 removes `σ_{k+1}² / ||X K||²` of its
squared relative error and costs `d_in + d_out` parameters. σ is
non-increasing, so each layer's gains per parameter are non-increasing and
taking the best gains across all layers greedily solves the (relaxed)
budgeted problem `min Σ_l err_l(r_l)² / ||X_l K_l||²`.
"""

from typing import Mapping

import numpy as np

from ctxlr.linalg import solvers

DENSE = None  # the rank of a layer that stays dense


def uniform_ranks(
    shapes: Mapping[str, tuple[int, int]], ratio: float
) -> dict[str, int | None]:
  """`rank_for_ratio` per layer; None where factoring saves nothing.

  With `ratio = 1` every layer stays dense (None): the rank that fits the
  whole parameter count would still drop part of the spectrum (rank 25 of
  32 for a 32 × 128 layer).
  """
  if not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1]; got {ratio}.')
  if ratio == 1:
    return {name: DENSE for name in shapes}
  ranks = {}
  for name, (d_in, d_out) in shapes.items():
    rank = solvers.rank_for_ratio(d_in, d_out, ratio)
    ranks[name] = rank if solvers.saves_parameters(d_in, d_out, rank) else DENSE
  return ranks


def check_budget(
    shapes: Mapping[str, tuple[int, int]],
    ratio: float,
    *,
    counts: Mapping[str, int] | None = None,
) -> None:
  """Raises ValueError if rank 1 in every layer already exceeds the budget
  `ratio · Σ d_in d_out` (no allocation can meet the ratio)."""
  count = lambda name: (counts or {}).get(name, 1)
  budget = ratio * sum(count(n) * a * b for n, (a, b) in shapes.items())
  floor = sum(count(n) * (a + b) for n, (a, b) in shapes.items())
  if floor > budget:
    raise ValueError(
        f'ratio={ratio}: infeasible budget: rank 1 in every layer needs '
        f'{floor} parameters, more than the budget {budget:.0f} of these '
        f'{len(shapes)} layers; the smallest feasible ratio is '
        f'{floor / (budget / ratio):.4g}.'
    )


def max_saving_rank(d_in: int, d_out: int) -> int:
  """Largest rank whose factors store fewer numbers than the dense kernel."""
  return (d_in * d_out - 1) // (d_in + d_out)


def global_ranks(
    shapes: Mapping[str, tuple[int, int]],
    sigmas: Mapping[str, np.ndarray],
    ratio: float,
    *,
    counts: Mapping[str, int] | None = None,
) -> dict[str, int | None]:
  """Ranks that minimise the summed squared relative error within a budget.

  Args:
    shapes: {layer: (d_in, d_out)}.
    sigmas: {layer: σ of R K, descending} (`Factors.sigma`).
    ratio: kept fraction of the layers' total parameters, in (0, 1].
    counts: {layer: n} for an entry that stands for n layers of one shape
      sharing one rank (a stack; its σ² the members' mean relative curve
      times ||·||², any scale): its parameters and gains count n times.

  Returns:
    {layer: rank}, each at least 1 and at most `max_saving_rank`, whose
    factored size fits `ratio · Σ d_in d_out`. With `ratio = 1` every layer
    stays dense (None).
  """
  if not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1]; got {ratio}.')
  if ratio == 1:
    return {name: DENSE for name in shapes}
  check_budget(shapes, ratio, counts=counts)
  names = list(shapes)
  count = lambda name: (counts or {}).get(name, 1)
  budget = ratio * sum(count(n) * a * b for n, (a, b) in shapes.items())
  gains, costs, owners = [], [], []
  spent = 0.0
  for i, name in enumerate(names):
    d_in, d_out = shapes[name]
    cap = max(1, max_saving_rank(d_in, d_out))
    s2 = np.square(np.asarray(sigmas[name], np.float64))[:cap]
    total = s2.sum() if s2.sum() > 0 else 1.0
    # n layers: n times the gain (a mean curve) at n times the cost, so
    # the gain per parameter is the mean curve's
    cost = count(name) * (d_in + d_out)
    spent += cost  # rank 1 for every layer
    gains.append(s2[1:] / total / (d_in + d_out))  # per parameter, k -> k+1
    costs.append(np.full(len(s2) - 1, cost, np.float64))
    owners.append(np.full(len(s2) - 1, i))
  gains, costs, owners = map(np.concatenate, (gains, costs, owners))
  order = np.argsort(-gains, kind='stable')  # ties: layer order
  affordable = np.cumsum(costs[order]) <= budget - spent
  ranks = np.ones(len(names), np.int64)
  np.add.at(ranks, owners[order][affordable], 1)
  return {name: int(r) for name, r in zip(names, ranks)}


def kept_ratio(
    shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int | None]
) -> float:
  """Achieved fraction of parameters kept over these layers."""
  dense = sum(d_in * d_out for d_in, d_out in shapes.values())
  kept = sum(
      d_in * d_out if ranks[n] is DENSE else ranks[n] * (d_in + d_out)
      for n, (d_in, d_out) in shapes.items()
  )
  return kept / dense


# ------------------------------------------ loss-driven and peer rules ---


def _pool_adjacent(gains: np.ndarray, costs: np.ndarray) -> np.ndarray:
  """Per-parameter values made non-increasing (pool adjacent violators).

  The values of the upper concave envelope of the cumulative (cost, gain)
  curve: where a later step gains more per parameter than an earlier one,
  both get their pooled value `Σ gain / Σ cost`. Taking steps in order of
  these values is the greedy solution of the relaxed budgeted problem, and it
  keeps each layer's steps in order (a rank-k solution is a prefix).
  """
  blocks = []  # [gain, cost, count]
  for g, c in zip(gains, costs):
    blocks.append([g, c, 1])
    while len(blocks) > 1 and (
        blocks[-1][0] * blocks[-2][1] > blocks[-2][0] * blocks[-1][1]
    ):
      g2, c2, n2 = blocks.pop()
      blocks[-1][0] += g2
      blocks[-1][1] += c2
      blocks[-1][2] += n2
  return (
      np.concatenate([np.full(n, g / c) for g, c, n in blocks])
      if (blocks)
      else np.zeros(0)
  )


def weighted_ranks(
    shapes: Mapping[str, tuple[int, int]],
    gains: Mapping[str, np.ndarray],
    ratio: float,
    *,
    allow_dense: bool = True,
    counts: Mapping[str, int] | None = None,
) -> dict[str, int | None]:
  """Ranks that minimise `Σ_l loss_l(r_l)` within a parameter budget.

  Args:
    shapes: {layer: (d_in, d_out)}.
    gains: {layer: float[p]}, entry i the loss removed by the layer's
      (i+1)-th direction (>= 0; e.g. `w_l σ_i(R K)²`, the layer's loss
      weight times its exact squared-error decrements).
    ratio: kept fraction of the layers' total parameters, in (0, 1].
    allow_dense: also offer, after `max_saving_rank`, the step to the dense
      kernel (its remaining gains, at the remaining cost), so that the most
      sensitive layers can stay dense.
    counts: {layer: n} for an entry that stands for n layers of one shape
      sharing one rank (a stack; its gains the members' summed): its
      parameters count n times.

  Returns:
    {layer: rank (>= 1) or None (dense)} fitting `ratio · Σ d_in d_out`.

  Raises:
    ValueError: ratio out of range, a layer without gains, gains negative or
      not finite, or a budget below rank 1 everywhere.
  """
  if isinstance(ratio, bool) or not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1]; got {ratio}.')
  if ratio == 1:
    return {name: DENSE for name in shapes}
  names = list(shapes)
  count = lambda name: (counts or {}).get(name, 1)
  budget = ratio * sum(count(n) * a * b for n, (a, b) in shapes.items())
  floor = sum(count(n) * (a + b) for n, (a, b) in shapes.items())
  check_budget(shapes, ratio, counts=counts)
  values, costs, owners, dense_step = [], [], [], []
  for i, name in enumerate(names):
    d_in, d_out = shapes[name]
    if name not in gains:
      raise ValueError(f'gains has no entry for layer {name!r}.')
    g = np.asarray(gains[name], np.float64)
    if g.ndim != 1 or not np.all(np.isfinite(g)) or np.any(g < 0):
      raise ValueError(
          f'gains[{name!r}] must be a finite vector >= 0; got '
          f'shape {g.shape}, min {np.min(g, initial=0.)}.'
      )
    cap = max(1, max_saving_rank(d_in, d_out))
    step_gains = list(g[1:cap])
    step_costs = [float(count(name) * (d_in + d_out))] * len(step_gains)
    extra = d_in * d_out - cap * (d_in + d_out)
    has_dense = allow_dense and extra > 0
    if has_dense:
      step_gains.append(float(g[cap:].sum()))
      step_costs.append(float(count(name) * extra))
    value = _pool_adjacent(np.asarray(step_gains), np.asarray(step_costs))
    values.append(value)
    costs.append(np.asarray(step_costs))
    owners.append(np.full(len(step_gains), i))
    dense_step.append(has_dense)
  values, costs_all, owners_all = map(np.concatenate, (values, costs, owners))
  order = np.argsort(-values, kind='stable')  # ties: layer order
  affordable = np.cumsum(costs_all[order]) <= budget - floor
  taken = np.zeros(len(names), np.int64)
  np.add.at(taken, owners_all[order][affordable], 1)
  ranks = {}
  for i, name in enumerate(names):
    d_in, d_out = shapes[name]
    cap = max(1, max_saving_rank(d_in, d_out))
    if dense_step[i] and taken[i] == cap:  # the dense step taken
      ranks[name] = DENSE
    else:
      ranks[name] = int(1 + taken[i])
  return ranks


def fisher_ranks(
    shapes: Mapping[str, tuple[int, int]],
    gains: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    ratio: float,
    *,
    allow_dense: bool = True,
    counts: Mapping[str, int] | None = None,
) -> dict[str, int | None]:
  """`weighted_ranks` on each layer's exact error decrements times its weight.

  With `gains[l][i] = σ_i(R_l K_l)²` (the layer objective's decrements,
  docs/method.md §2) and `weights[l]` the mean loss-gradient energy at the
  layer's output (`sensitivity.layer_weights`), `w_l err_l(r)²` estimates
  the loss increase of truncating layer l to rank r, and the ranks minimise
  their sum under the budget.
  """
  bad = {n: w for n, w in weights.items() if not (np.isfinite(w) and w >= 0)}
  if bad:
    raise ValueError(f'weights must be finite and >= 0; got {bad}.')
  missing = [n for n in shapes if n not in weights]
  if missing:
    raise ValueError(f'weights has no entry for {missing[:3]}.')
  return weighted_ranks(
      shapes,
      {n: weights[n] * np.asarray(gains[n], np.float64) for n in shapes},
      ratio,
      allow_dense=allow_dense,
      counts=counts,
  )


def module_type(name: str) -> str:
  """The group of a layer for the per-type rules: its last path component."""
  return name.split('.')[-1]


def _ranks_from_ratios(shapes, ratios):
  ranks = {}
  for name, (d_in, d_out) in shapes.items():
    rho = ratios[name]
    if rho >= 1:
      ranks[name] = DENSE
      continue
    rank = max(
        1,
        solvers.rank_for_ratio(d_in, d_out, max(rho, 1e-12)) if rho > 0 else 1,
    )
    ranks[name] = (
        rank if solvers.saves_parameters(d_in, d_out, rank) else (DENSE)
    )
  return ranks


def svd_llm_v2_ranks(
    shapes: Mapping[str, tuple[int, int]],
    sigmas: Mapping[str, np.ndarray],
    ratio: float,
) -> dict[str, int | None]:
  """SVD-LLM V2's heterogeneous allocation (arXiv:2503.12340, §3.1).

  As the paper describes it (its code is not released): the matrices are
  grouped by type (all q_proj, all k_proj, …); each matrix's theoretical
  truncation loss at the target ratio is `L_i = ||X(K − K_r)||_F =
  sqrt(Σ_{j>r} σ_j²)` (the minimum, from σ(R K)); within a group of n
  matrices with removed fraction `R_d = 1 − ratio`, matrix i removes
  `R_i = n R_d (1 / log L_i) / Σ_j (1 / log L_j)`, so matrices with a larger
  loss are compressed less. `R_i` is turned into a rank with
  `rank_for_ratio(1 − R_i)` (rank 1 where `R_i >= 1`). `L` is not
  scale-free (it grows with the token count); the rule needs every
  `L_i > 1`.

  Raises:
    ValueError: ratio out of range or a loss `L_i <= 1` (log <= 0: the rule
      is undefined), naming the layer.
  """
  if isinstance(ratio, bool) or not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1]; got {ratio}.')
  if ratio == 1:
    return {name: DENSE for name in shapes}
  groups: dict[str, list[tuple[str, float]]] = {}
  for name, (d_in, d_out) in shapes.items():
    s2 = np.square(np.asarray(sigmas[name], np.float64))
    r = solvers.rank_for_ratio(d_in, d_out, ratio)
    loss = float(np.sqrt(s2[r:].sum()))
    if not loss > 1:
      raise ValueError(
          f'svd_llm_v2 allocation: layer {name!r} has truncation loss '
          f'{loss:.3g} <= 1, where 1/log(L) is undefined or flips sign.'
      )
    groups.setdefault(module_type(name), []).append((name, loss))
  ratios = {}
  for items in groups.values():
    inv = np.array([1 / np.log(loss) for _, loss in items])
    share = len(items) * (1 - ratio) * inv / inv.sum()
    for (name, _), removed in zip(items, share):
      ratios[name] = 1 - removed
  return _ranks_from_ratios(shapes, ratios)


def coala_hetero_ranks(
    shapes: Mapping[str, tuple[int, int]],
    sigmas: Mapping[str, np.ndarray],
    ratio: float,
) -> dict[str, int | None]:
  """COALA's heterogeneous allocation, as urparkina/COALA's code does it.

  Reproduces `coala/Injector.py`, `calculate_theoretical_error` and
  `heterogeneous_compression` (config `adaptive_rank: True`): per matrix
  `s = σ(W X)² / Σ σ²` (here σ(R K)), `r = floor(ratio · m n / (m + n))`
  capped at min(m, n), loss `= Σ_{i>=r} s_i²` (the normalised energies
  squared once more, as their code does); within each module type (group of
  n matrices) the removed fraction of matrix i is `n (1 − ratio)
  (1 / log loss_i) / Σ_j (1 / log loss_j)`; their `ceil` of the rank is
  `rank_for_ratio`'s floor here so that the budget holds. All losses are
  below 1, so all logs share a sign: a matrix whose normalised tail is larger
  (log closer to 0) is compressed *more*.

  Raises:
    ValueError: ratio out of range, or a group whose losses are all 0.
  """
  if isinstance(ratio, bool) or not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1]; got {ratio}.')
  if ratio == 1:
    return {name: DENSE for name in shapes}
  groups: dict[str, list[tuple[str, float]]] = {}
  for name, (d_in, d_out) in shapes.items():
    s2 = np.square(np.asarray(sigmas[name], np.float64))
    s = s2 / s2.sum() if s2.sum() > 0 else s2
    r = min(int(np.floor(ratio * d_in * d_out / (d_in + d_out))), d_in, d_out)
    groups.setdefault(module_type(name), []).append(
        (name, float(np.sum(np.square(s[r:]))))
    )
  ratios = {}
  for group, items in groups.items():
    with np.errstate(divide='ignore'):
      inv = np.array(
          [1 / np.log(loss) if loss > 0 else 0.0 for _, loss in items]
      )
    if not inv.any():
      raise ValueError(
          f'coala_hetero allocation: every loss of group '
          f'{group!r} is 0; nothing to allocate by.'
      )
    share = len(items) * (1 - ratio) * inv / inv.sum()
    for (name, _), removed in zip(items, share):
      ratios[name] = 1 - removed
  return _ranks_from_ratios(shapes, ratios)
