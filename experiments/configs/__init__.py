"""Helpers the config files share (the configs themselves are the modules
next to this one, each with `get_config(arg)`)."""

import ml_collections


def variants(**runs: dict) -> ml_collections.ConfigDict:
  """`config.runs`: {label: variant} in the order given (ConfigDict sorts
  keys otherwise), e.g. `variants(coala=dict(method='coala'),
  coala_global=dict(method='coala', allocation='global'))`. Labels are
  identifiers, so `--config.runs.<label>.<key>=…` can override a key the
  variant sets; experiments/common.py (`check_variants`) has the keys."""
  return ml_collections.ConfigDict(runs, sort_keys=False)


def train(
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    eval_every: int,
) -> dict:
  """A `train` spec: AdamW with warm-up and cosine decay, clip norm 1, no
  weight decay; evaluated and checkpointed every `eval_every` steps."""
  return dict(
      steps=steps,
      batch_size=batch_size,
      learning_rate=learning_rate,
      warmup_steps=warmup_steps,
      clip_norm=1.0,
      weight_decay=0.0,
      eval_every=eval_every,
      checkpoint_every=eval_every,
  )
