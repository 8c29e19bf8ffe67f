"""Names the `>>>` examples of ctxlr's docstrings may use without importing.

`make test` runs them with `pytest --doctest-modules ctxlr`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  import ctxlr  # pylint: disable=g-import-not-at-top

  doctest_namespace.update(ctxlr=ctxlr, jax=jax, jnp=jnp, np=np)
