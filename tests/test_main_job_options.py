"""The main job's new options are checked before anything is loaded."""

import pytest

from experiments import compress
from experiments.configs import compress as compress_config


def _config(**changes):
  config = compress_config.get_config('quick')
  for key, value in changes.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return config


def test_defaults_validate():
  compress.validate(compress_config.get_config())
  compress.validate(compress_config.get_config('quick'))


@pytest.mark.parametrize(
    'changes,match',
    [
        ({'calib.mixture': 'wikipedia:1,news:1'}, "calib.mixture: .*'news'"),
        (
            {'calib.mixture': 'wikipedia:0,sotu:1'},
            'expected a finite number > 0',
        ),
        ({'calib.mixture': 'wikipedia:-1'}, 'expected a finite number > 0'),
        ({'calib.mixture': 'wikipedia'}, "expected 'corpus:weight"),
        ({'calib.mixture': 'sotu:1,sotu:2'}, 'appears twice'),
        ({'calib.corpus': 'sotu'}, "calib.corpus: expected '' when calib.mix"),
        ({'calib.mixture': ''}, 'calib.corpus: expected a corpus'),
        ({'power': 0.0}, 'power: the weighting power'),
        ({'power': -1.0}, 'power: the weighting power'),
        ({'heal.enabled': True}, 'heal.*needs a budget'),
        ({'heal.enabled': True, 'heal.seconds': 0.0}, 'heal.seconds'),
        ({'heal.enabled': True, 'heal.seconds': -3.0}, 'heal.seconds'),
        ({'heal.enabled': True, 'heal.steps': 0}, 'heal.steps'),
        ({'allocation': 'best'}, 'allocation: must be one of'),
        ({'mu_rule': 'best'}, 'mu_rule must be one of'),
        ({'auto_mu_rule': 'best'}, 'auto_mu_rule must be one of'),
    ],
)
def test_bad_options(changes, match):
  with pytest.raises(ValueError, match=match):
    compress.validate(_config(**changes))


def test_mixture_parsing():
  config = _config(**{'calib.mixture': 'wikipedia:3, sotu:1'})
  assert compress.mixture(config.calib) == {'wikipedia': 3.0, 'sotu': 1.0}
  config = _config(**{'calib.mixture': 'files:/data/*.jsonl:1,sotu:0.5'})
  assert compress.mixture(config.calib) == {
      'files:/data/*.jsonl': 1.0,
      'sotu': 0.5,
  }
  assert compress.mixture(_config().calib) == {'wikipedia': 1.0, 'sotu': 1.0}
  one = _config(**{'calib.mixture': '', 'calib.corpus': 'sotu'})
  compress.validate(one)
  assert compress.mixture(one.calib) is None
  assert compress.method_options(_config(power=1.0)) == dict(power=1.0)
  assert compress.method_options(_config()) == {}
