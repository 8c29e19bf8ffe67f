"""Test-wide setup: 8 forced CPU devices, before any JAX computation.

Multi-device code (TSQR over a mesh) is tested on CPU with 8 host devices; a
single-device test simply runs on the first one.
"""

import atexit
import os
import shutil
import tempfile

import jax

jax.config.update('jax_num_cpu_devices', 8)

# One persistent compilation cache for the session: the experiment tests
# launch fresh processes that compile the same quick programs again (a
# second quick main job took 18% less time with it). Removed at exit.
_CACHE = tempfile.mkdtemp(prefix='ctxlr-tests-jax-cache-')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
for _name, _value in (
    ('jax_compilation_cache_dir', _CACHE),
    ('jax_persistent_cache_min_compile_time_secs', 0),
    ('jax_persistent_cache_min_entry_size_bytes', 0),
):
  jax.config.update(_name, _value)
  os.environ[_name.upper()] = str(_value)  # for the launched processes

# pylint: disable=g-import-not-at-top,g-bad-import-order
import jax.numpy as jnp
import numpy as np
import pytest

from ctxlr import reference
from ctxlr import stats as stats_lib


@pytest.fixture(scope='session')
def ill_conditioned():
  """X 2048 x 256 with cond(X) = 1e6 (controlled SVD), K 256 x 256, float32.

  Returns (x, kernel, LayerStats of x): the contrast case where the Gram
  route loses digits and QR does not.
  """
  rng = np.random.default_rng(0)
  x = reference.activations(rng, 2048, 256, cond=1e6).astype(np.float32)
  kernel = rng.standard_normal((256, 256)).astype(np.float32)
  return x, kernel, stats_lib.stats_from_x(jnp.asarray(x))
