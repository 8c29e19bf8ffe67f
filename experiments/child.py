"""Runs one part of a benchmark in a fresh Python process.

A fresh process gets its own JAX device count, BLAS threads and allocator
settings (fixed at start-up) and its own peak memory. The parent calls
`run`; the benchmark module ends with `serve` under `__main__`. Light on
purpose: the child imports this module too, so nothing heavy is imported.
"""

import json
import os
import subprocess
import sys
from typing import Any, Callable, Mapping

from ctxlr import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(
    module: str,
    part: str,
    cfg: dict,
    workdir: str,
    *,
    env: Mapping[str, str],
    timeout_s: float,
    blas_threads: int = 0,
) -> Any:
  """`python -m module part <cfg as JSON> <out>` under `env`; its JSON result.

  `blas_threads` > 0 sets OpenBLAS/OpenMP threads (LAPACK, i.e. QR on CPU);
  0 keeps the library default.
  """
  env = dict(env, PYTHONPATH=ROOT)
  if blas_threads:
    env['OPENBLAS_NUM_THREADS'] = env['OMP_NUM_THREADS'] = str(blas_threads)
  out = os.path.join(workdir, f'.{part}_{os.getpid()}.json')
  subprocess.run(
      [sys.executable, '-m', module, part, json.dumps(cfg), out],
      env=env,
      cwd=ROOT,
      check=True,
      timeout=timeout_s,
  )
  value = results.read_json(out)
  os.remove(out)
  return value


def serve(parts: Mapping[str, Callable[[dict], Any]]) -> None:
  """The child's side of `run`: runs the part named in argv, writes JSON."""
  part, cfg, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
  results.write_json(out, parts[part](cfg))
