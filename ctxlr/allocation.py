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

DENSE = None   # the rank of a layer that stays dense


def uniform_ranks(shapes: Mapping[str, tuple[int, int]], ratio: float
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


def max_saving_rank(d_in: int, d_out: int) -> int:
  """Largest rank whose factors store fewer numbers than the dense kernel."""
  return (d_in * d_out - 1) // (d_in + d_out)


def global_ranks(shapes: Mapping[str, tuple[int, int]],
                 sigmas: Mapping[str, np.ndarray], ratio: float
                 ) -> dict[str, int | None]:
  """Ranks that minimise the summed squared relative error within a budget.

  Args:
    shapes: {layer: (d_in, d_out)}.
    sigmas: {layer: σ of R K, descending} (`Factors.sigma`).
    ratio: kept fraction of the layers' total parameters, in (0, 1].

  Returns:
    {layer: rank}, each at least 1 and at most `max_saving_rank`, whose
    factored size fits `ratio · Σ d_in d_out`. With `ratio = 1` every layer
    stays dense (None).
  """
  if not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1]; got {ratio}.')
  if ratio == 1:
    return {name: DENSE for name in shapes}
  names = list(shapes)
  budget = ratio * sum(d_in * d_out for d_in, d_out in shapes.values())
  gains, costs, owners = [], [], []
  spent = 0.
  for i, name in enumerate(names):
    d_in, d_out = shapes[name]
    cap = max(1, max_saving_rank(d_in, d_out))
    s2 = np.square(np.asarray(sigmas[name], np.float64))[:cap]
    total = s2.sum() if s2.sum() > 0 else 1.
    cost = d_in + d_out
    spent += cost                                 # rank 1 for every layer
    gains.append(s2[1:] / total / cost)           # per parameter, k -> k+1
    costs.append(np.full(len(s2) - 1, cost, np.float64))
    owners.append(np.full(len(s2) - 1, i))
  gains, costs, owners = map(np.concatenate, (gains, costs, owners))
  order = np.argsort(-gains, kind='stable')       # ties: layer order
  affordable = np.cumsum(costs[order]) <= budget - spent
  ranks = np.ones(len(names), np.int64)
  np.add.at(ranks, owners[order][affordable], 1)
  return {name: int(r) for name, r in zip(names, ranks)}


def kept_ratio(shapes: Mapping[str, tuple[int, int]],
               ranks: Mapping[str, int | None]) -> float:
  """Achieved fraction of parameters kept over these layers."""
  dense = sum(d_in * d_out for d_in, d_out in shapes.values())
  kept = sum(d_in * d_out if ranks[n] is DENSE else ranks[n] * (d_in + d_out)
             for n, (d_in, d_out) in shapes.items())
  return kept / dense
