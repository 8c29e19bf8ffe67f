"""The method registry: one record per method, everything else derived.

A throwaway method registered here (and nowhere else) runs through the whole
pipeline: its statistics are accumulated because its record asks for them,
the options it does not take are refused, the main job's config accepts it.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctxlr import pipeline
from ctxlr import registry
from ctxlr import stats as stats_lib
from ctxlr.linalg import solvers
from experiments import compress as compress_experiment
from experiments.configs import compress as compress_config
from tests import toy_model

_SEEN = {}


def gram_svd(kernel, stats, *, rank, mu=0.0):
  """Toy method: rank-r SVD of XᵀX K (reads the Gram only), projected."""
  del mu
  _SEEN['gram_shape'] = stats.gram.shape
  m = np.asarray(stats.gram, np.float64) @ np.asarray(kernel, np.float64)
  v = np.linalg.svd(m, full_matrices=False)[2][:rank].T  # [d_out, rank]
  a = np.asarray(kernel, np.float64) @ v
  factors = solvers.Factors(
      jnp.asarray(a, kernel.dtype),
      jnp.asarray(v.T, kernel.dtype),
      jnp.zeros((rank,), jnp.float32),
  )
  return factors, registry.solve_info(factors)


def _batches(count=2):
  key = jax.random.key(0)
  return [
      jax.random.randint(jax.random.fold_in(key, i), (2, 12), 0, 64)
      for i in range(count)
  ]


def test_builtin_records():
  assert registry.names() == [
      'asvd',
      'coala',
      'corda',
      'k_star',
      'svd',
      'svd_llm',
      'svd_llm_eps',
      'svd_llm_v2',
  ]
  assert registry.names(takes_mu=True) == ['coala']
  assert registry.names(float64=True) == ['k_star']
  assert registry.get('corda').want == stats_lib.Want(gram=True)
  assert registry.get('asvd').want == stats_lib.Want(abs_sum=True)
  assert not registry.get('svd').context_aware
  with pytest.raises(ValueError, match="method must be one of .*got 'nope'"):
    registry.get('nope')


def test_a_new_method_needs_only_its_function_and_record():
  with registry.registered(gram_svd, needs=('gram',), summary='toy') as rec:
    assert 'gram_svd' in registry.names() and rec.want.gram
    model = toy_model.Toy()
    report = pipeline.compress(model, _batches(), ratio=0.5, method='gram_svd')
    assert _SEEN['gram_shape'] == (16, 16)  # the pipeline accumulated it
    assert report['kept_ratio'] <= 0.5
    assert all(l['rank'] for l in report['layers'].values())
    with pytest.raises(ValueError, match='has no ridge term'):
      pipeline.compress(
          toy_model.Toy(), _batches(), ratio=0.5, method='gram_svd', mu=1e-3
      )
    config = compress_config.get_config('quick')
    config.method = 'gram_svd'
    compress_experiment.validate(config)  # the main job accepts it
    assert compress_experiment.auto_mu(config) == 0.0
  assert 'gram_svd' not in registry.names()


def test_register_refuses_bad_records():
  with pytest.raises(ValueError, match='already registered'):
    registry.register(needs=('r',), name='coala')(gram_svd)
  with pytest.raises(ValueError, match='subset of'):
    registry.register(needs=('hessian',))(gram_svd)


def test_registered_function_checks_its_inputs():
  with registry.registered(gram_svd, needs=('gram',)):
    stats = stats_lib.stats_from_x(jnp.ones((8, 4)), gram=False)
    with pytest.raises(ValueError, match='gram_svd needs stats.gram'):
      registry.solve('gram_svd', jnp.ones((4, 3)), stats, rank=2)


def test_main_job_validation_names_the_field():
  config = compress_config.get_config('quick')
  for field, value, match in [
      ('method', 'nope', 'method: method must be one of'),
      ('ratio', 1.5, r'ratio must be in \(0, 1\]'),
      ('allocation', 'glob', 'allocation: must be one of'),
      ('method', 'k_star', 'float64 reference'),
  ]:
    bad = ml_collections.ConfigDict(config.to_dict())
    bad[field] = value
    with pytest.raises(ValueError, match=match):
      compress_experiment.validate(bad)
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.method, bad.auto_mu = 'svd_llm', 0.1
  with pytest.raises(ValueError, match='auto_mu:'):
    compress_experiment.validate(bad)
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.calib.num_tokens = 8
  with pytest.raises(ValueError, match='calib.num_tokens'):
    compress_experiment.validate(bad)


def test_readme_override_example_is_valid():
  # --config.ratio=0.6 --config.method=svd_llm --config.mode=sequential: the
  # ridge default applies only to methods that have one.
  config = compress_config.get_config()
  config.ratio, config.method, config.mode = 0.6, 'svd_llm', 'sequential'
  compress_experiment.validate(config)
  assert compress_experiment.auto_mu(config) == 0.0
