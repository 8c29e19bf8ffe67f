"""Timing for the benchmarks: round-robin calls, one pinned core, flops.

A library shared by bench_tsqr and bench_solvers. Light on purpose: their
child processes import it before JAX starts (JAX is imported inside the
functions), so that pinning and thread settings apply to JAX's own pools.
"""

import os
import time
from typing import Any, Callable, Mapping

import numpy as np


def time_calls(
    calls: Mapping[Any, tuple[Callable, tuple]],
    *,
    repeats: int,
    min_seconds: float,
    warmup: bool = True,
) -> dict[Any, dict[str, float]]:
  """Seconds per call of each `name: (fn, args)`, timed round-robin.

  After one untimed warm-up call each (skipped with `warmup=False`, when
  the caller made it), each round calls every function once (compiled,
  blocking), so a change in the machine's load hits all of them alike;
  rounds go on until each has at least `repeats` calls and `min_seconds`
  of them. Per name: `min`,
  `median`, `mean`, `cpu` (the process CPU time per call over all threads:
  `cpu / mean` = cores the call kept busy) and `calls`.
  """
  import jax  # pylint: disable=g-import-not-at-top

  for fn, args in calls.values() if warmup else ():
    jax.block_until_ready(fn(*args))  # compile, warm up
  times = {name: [] for name in calls}
  cpu = dict.fromkeys(calls, 0.0)
  while any(len(t) < repeats or sum(t) < min_seconds for t in times.values()):
    for name, (fn, args) in calls.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
      cpu[name] += time.process_time() - start_cpu
  return {
      name: dict(
          min=float(np.min(t)),
          median=float(np.median(t)),
          mean=float(np.mean(t)),
          cpu=cpu[name] / len(t),
          calls=len(t),
      )
      for name, t in times.items()
  }


def pin_to_one_core() -> int:
  """Pins this process to its lowest allowed core (call before JAX starts
  its thread pools, so XLA's matmuls and LAPACK share that core); returns
  the core."""
  core = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {core})
  return core


def fold_flop_ratio(b: int, d: int) -> float:
  """Flops of one fold `R ← qr_r([R; X_b])` (b × d block, d × d R) over
  those of the Gram update `X_bᵀX_b`, 2bd² (docs/method.md §3)."""
  return (2 * (b + d) * d**2 - 2 * d**3 / 3) / (2 * b * d**2)
