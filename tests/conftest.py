"""Test-wide setup: 8 forced CPU devices, before any JAX computation.

Multi-device code (TSQR over a mesh) is tested on CPU with 8 host devices; a
single-device test simply runs on the first one.
"""

import jax

jax.config.update('jax_num_cpu_devices', 8)

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
