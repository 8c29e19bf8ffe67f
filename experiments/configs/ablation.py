r"""The training-free levers at kept ratio 0.8, each alone and combined.

  python launch.py --config=experiments/configs/ablation.py
  python launch.py --config=experiments/configs/ablation.py:quick

Rows (each scored on the held-out Wikipedia and State-of-the-Union sets):

* control: coala uniform (the main job's former default), coala with the
  `global` allocator, CorDA;
* weighting: coala's weighting power p (½ = the exact objective; 1 = CorDA's
  `XᵀX K`, inversion-free; with and without CorDA's damping as a ridge);
* allocation: loss-driven ('fisher': exact error curves weighted by the
  loss-gradient energy at each layer's output) and the peers' rules
  'svd_llm_v2' and 'coala_hetero';
* data: a Wikipedia + State-of-the-Union calibration mixture, and 4× the
  tokens (the whole size curve: docs/results/calibration_curve);
* mode: sequential calibration, for coala and for CorDA;
* asvd: the authors' randomized SVD vs the exact SVD of the same scaling;
* mu: the μ rules on calibration sets short of data (128 and 512 tokens);
* combined: the levers that helped, together.

`heal` trains the factors of one row's model for a time budget.
"""

import ml_collections


def _wiki(num_tokens, seq_len=512):
  return dict(
      mixture={'wikipedia': 1.0},
      num_tokens=num_tokens,
      seq_len=min(seq_len, num_tokens),
      batch_size=4,
  )


def _mix(num_tokens, sotu=1.0):
  return dict(
      mixture={'wikipedia': 1.0, 'sotu': sotu},
      num_tokens=num_tokens,
      seq_len=512,
      batch_size=4,
  )


def get_config(arg=None):
  """The ablation at kept ratio 0.8; 'quick' is a CI-sized run.

  Rows are (calibration set, pipeline options); results.json, summary.md and
  ablation.png go to the workdir, and a rerun skips finished rows.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'ablation'
  config.model = dict(path='', param_dtype='float32')
  config.eval = dict(
      corpora=('wikipedia', 'sotu'), num_tokens=4096, seq_len=512, batch_size=4
  )
  config.ratio = 0.8
  config.include = ('*_proj',)
  config.exclude = ()
  # Calibrate with the dense-QR fold (compile time; experiments/ablation.py).
  config.dense_fold = True
  config.calibs = dict(
      wiki8k=_wiki(8192),
      mix8k=_mix(8192),
      mix32k=_mix(32768),
      wiki128=_wiki(128),
      wiki512=_wiki(512),
  )
  c = lambda **kw: dict(method='coala', **kw)
  rows = dict(
      coala=c(group='control', calib='wiki8k'),
      coala_global=c(group='control', calib='wiki8k', allocation='global'),
      corda=dict(group='control', calib='wiki8k', method='corda'),
      corda_sequential=dict(
          group='mode', calib='wiki8k', method='corda', mode='sequential'
      ),
      power_0_75=c(group='weighting', calib='wiki8k', options=dict(power=0.75)),
      power_1=c(group='weighting', calib='wiki8k', options=dict(power=1.0)),
      power_1_damped=c(
          group='weighting',
          calib='wiki8k',
          options=dict(power=1.0),
          mu=0.01,
          note="CorDA's damping 0.01·mean diag(XᵀX) as μ",
      ),
      power_1_5=c(group='weighting', calib='wiki8k', options=dict(power=1.5)),
      fisher_factored=c(
          group='allocation',
          calib='wiki8k',
          allocation='fisher_factored',
          note='fisher without the dense step',
      ),
      global_dense=c(
          group='allocation',
          calib='wiki8k',
          allocation='global_dense',
          note="global's weights with fisher's dense step",
      ),
      fisher_power_0_75=c(
          group='combined',
          calib='wiki8k',
          allocation='fisher',
          options=dict(power=0.75),
      ),
      fisher_sequential=c(
          group='combined',
          calib='wiki8k',
          allocation='fisher',
          mode='sequential',
      ),
      fisher_mix8k=c(group='combined', calib='mix8k', allocation='fisher'),
      fisher_mix32k=c(group='combined', calib='mix32k', allocation='fisher'),
      corda_fisher=dict(
          group='allocation',
          calib='wiki8k',
          method='corda',
          allocation='fisher',
          note='the loss-driven allocation under CorDA',
      ),
      svd_llm_v2_own=dict(
          group='control',
          calib='wiki8k',
          method='svd_llm_v2',
          allocation='svd_llm_v2',
          note='SVD-LLM V2 with its own allocation',
      ),
      fisher=c(group='allocation', calib='wiki8k', allocation='fisher'),
      svd_llm_v2_alloc=c(
          group='allocation', calib='wiki8k', allocation='svd_llm_v2'
      ),
      coala_hetero_alloc=c(
          group='allocation', calib='wiki8k', allocation='coala_hetero'
      ),
      asvd=dict(group='asvd', calib='wiki8k', method='asvd'),
      asvd_exact=dict(
          group='asvd', calib='wiki8k', method='asvd', options=dict(svd='exact')
      ),
      asvd_exact_alpha_1=dict(
          group='asvd',
          calib='wiki8k',
          method='asvd',
          options=dict(svd='exact', alpha=1.0),
      ),
      asvd_exact_rms=dict(
          group='asvd',
          calib='wiki8k',
          method='asvd',
          options=dict(svd='exact', scale='rms', alpha=1.0),
      ),
      asvd_exact_fisher=dict(
          group='asvd',
          calib='wiki8k',
          method='asvd',
          options=dict(svd='exact'),
          allocation='fisher',
      ),
      mix8k=c(group='data', calib='mix8k'),
      sequential=c(group='mode', calib='wiki8k', mode='sequential'),
      mix32k=c(group='data', calib='mix32k'),
  )
  for n in ('wiki128', 'wiki512'):  # short of data: the μ rules matter
    rows[f'{n}_energy'] = c(group='mu', calib=n, auto_mu=1e-4)
    rows[f'{n}_error_ratio'] = c(
        group='mu',
        calib=n,
        mu=1.0,
        mu_rule='error_ratio',
        note="COALA's adaptive rule, its μ = 1",
    )
    rows[f'{n}_cholesky'] = c(group='mu', calib=n, mu=1.0, mu_rule='cholesky')
  config.rows = rows
  config.heal = dict(
      enabled=False,
      row='mix32k',
      seconds=600.0,
      steps=0,
      learning_rate=1e-4,
      batch_size=2,
      seq_len=256,
      num_tokens=65536,
      warmup_fraction=0.05,
      eval_every_seconds=120.0,
      mixture={'wikipedia': 1.0, 'sotu': 1.0},
  )
  if arg == 'quick':
    config.eval = dict(
        corpora=('wikipedia', 'sotu'), num_tokens=128, seq_len=64, batch_size=2
    )
    config.include = ('layers.0.*',)
    config.calibs = dict(
        tiny=dict(
            mixture={'wikipedia': 1.0, 'sotu': 1.0},
            num_tokens=256,
            seq_len=64,
            batch_size=2,
        )
    )
    config.rows = dict(
        coala=c(group='control', calib='tiny'),
        power_1=c(group='weighting', calib='tiny', options=dict(power=1.0)),
        fisher=c(group='allocation', calib='tiny', allocation='fisher'),
        v2=c(group='allocation', calib='tiny', allocation='svd_llm_v2'),
        hetero=c(group='allocation', calib='tiny', allocation='coala_hetero'),
        cholesky=c(group='mu', calib='tiny', mu=1.0, mu_rule='cholesky'),
    )
    config.heal = dict(
        enabled=True,
        row='coala',
        seconds=0.0,
        steps=2,
        learning_rate=1e-4,
        batch_size=2,
        seq_len=64,
        num_tokens=256,
        warmup_fraction=0.0,
        eval_every_seconds=0.0,
        mixture={'wikipedia': 1.0},
    )
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; expected "quick" or none.')
  return config
