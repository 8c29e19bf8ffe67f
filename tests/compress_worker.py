"""Runs `compress` on the toy model in a subprocess, for the resume test.

  python -m tests.compress_worker CHECKPOINT_DIR OUT.npz [KILL_AFTER_LAYERS]

With KILL_AFTER_LAYERS = k, the process SIGKILLs itself right after the k-th
layer is saved (no clean-up, like a crash or a pre-empted job).
"""

import os
import signal
import sys

import jax.numpy as jnp
import numpy as np

from ctxlr import pipeline
from ctxlr import store
from ctxlr import surgery
from tests import toy_model


def batches():
  rng = np.random.default_rng(0)
  for _ in range(3):
    yield jnp.asarray(rng.integers(0, 64, (2, 12)))


def main(checkpoint_dir, out, kill_after=None):
  if kill_after is not None:
    save_layer = store.RunStore.save_layer
    saved = []

    def save_then_die(self, name, result):
      save_layer(self, name, result)
      saved.append(name)
      if len(saved) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

    store.RunStore.save_layer = save_then_die
  model = toy_model.Toy()
  report = pipeline.compress(
      model,
      batches(),
      ratio=0.5,
      method='coala',
      checkpoint_dir=checkpoint_dir,
      data_id={'seed': 0},
  )
  factors = {}
  for name in report['layers']:
    layer = surgery.get_module(model, name)
    factors[name + '/a'] = np.asarray(layer.a[...])
    factors[name + '/b'] = np.asarray(layer.b[...])
  np.savez(out, **factors)


if __name__ == '__main__':
  main(
      sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None
  )
