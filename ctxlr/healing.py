"""Healing: train only the factors of a compressed model, for a time budget.

    history = healing.heal(model, seqs, seconds=600, learning_rate=1e-4)

After compression every factored layer is a `FactoredLinear` with factors
`a`, `b`; healing trains those (`training.factor_filter`), everything else
frozen, on next-token cross-entropy over calibration sequences, with AdamW
after global-norm clipping. The budget is a number of seconds of training
(compilation included), a number of steps, or both (whichever ends first).
The learning rate follows a linear warm-up and a cosine decay over the
fraction of the budget spent, so a time budget needs no step count: the rate
is set before every step (`optax.inject_hyperparams`, no recompilation).
"""

import math
import time
from typing import Any, Callable, Mapping

from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from ctxlr import data
from ctxlr import training


def check_budget(*, seconds: float | None, steps: int | None) -> None:
  """Raises ValueError unless a positive time and/or step budget is given."""
  if seconds is None and steps is None:
    raise ValueError(
        'heal needs a budget: seconds > 0 and/or steps >= 1; ' 'got neither.'
    )
  if seconds is not None and (
      isinstance(seconds, bool)
      or not isinstance(seconds, (int, float))
      or not math.isfinite(seconds)
      or seconds <= 0
  ):
    raise ValueError(
        f'seconds: the time budget must be a finite number > 0; '
        f'got {seconds!r}.'
    )
  if steps is not None and (
      isinstance(steps, bool)
      or not isinstance(steps, (int, np.integer))
      or steps < 1
  ):
    raise ValueError(
        f'steps: the step budget must be an integer >= 1; got ' f'{steps!r}.'
    )


def learning_rate_at(
    fraction: float,
    peak: float,
    *,
    warmup_fraction: float = 0.05,
    end_fraction: float = 0.0,
) -> float:
  """Linear warm-up to `peak` over `warmup_fraction`, then cosine decay."""
  if fraction < warmup_fraction:
    return peak * fraction / warmup_fraction
  rest = (fraction - warmup_fraction) / max(1e-12, 1 - warmup_fraction)
  rest = min(max(rest, 0.0), 1.0)
  cosine = 0.5 * (1 + math.cos(math.pi * rest))
  return peak * (end_fraction + (1 - end_fraction) * cosine)


def training_sequences(
    tokenizer,
    mixture: Mapping[str, float],
    *,
    seq_len: int,
    num_tokens: int,
    skip_tokens: int = 0,
) -> np.ndarray:
  """`num_tokens` of calibration-split sequences, after `skip_tokens` of them.

  From one corpus (`data.sequences`) or a mixture (`data.mixture_sequences`);
  the held-out splits are never read.
  """
  mixture = dict(mixture)
  skip = skip_tokens // seq_len
  n = max(1, num_tokens // seq_len)
  if len(mixture) == 1:
    (corpus,) = mixture
    seqs = data.sequences(
        corpus, 'calib', tokenizer, seq_len=seq_len, num_sequences=skip + n
    )
  else:
    seqs = data.mixture_sequences(
        mixture, 'calib', tokenizer, seq_len=seq_len, num_sequences=skip + n
    )
  return seqs[skip:]


def heal(
    model: nnx.Module,
    seqs: np.ndarray,
    *,
    seconds: float | None = None,
    steps: int | None = None,
    learning_rate: float = 1e-4,
    batch_size: int = 2,
    warmup_fraction: float = 0.05,
    weight_decay: float = 0.0,
    clip_norm: float = 1.0,
    eval_fn: Callable[[nnx.Module], dict] | None = None,
    eval_every_seconds: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
  """Trains the factors of `model` in place within a time and/or step budget.

  Args:
    model: a compressed model (at least one `FactoredLinear`) mapping int32
      ids [b, L] to logits.
    seqs: int[n, L] training sequences; step s uses `training.batch_at`.
    seconds: training time budget (compilation included; evaluations not).
    steps: step budget.
    learning_rate: peak AdamW learning rate.
    batch_size: sequences per step.
    warmup_fraction: share of the budget spent warming up.
    weight_decay: AdamW's decoupled weight decay.
    clip_norm: global-norm gradient clipping.
    eval_fn: `eval_fn(model) -> {name: float}`, run before the first step,
      every `eval_every_seconds` of training and at the end.
    eval_every_seconds: None: only at the start and the end.
    progress: show a progress bar.

  Returns:
    dict(train=[dict(step, loss, learning_rate, seconds)], eval=[dict(step,
    seconds, **eval_fn(model))], steps, seconds, trainable).

  Raises:
    ValueError: no budget, a budget <= 0, a bad learning rate or batch size,
      bad sequences, or a model without factors — before any training.
  """
  check_budget(seconds=seconds, steps=steps)
  if not (
      isinstance(learning_rate, (int, float))
      and math.isfinite(learning_rate)
      and learning_rate > 0
  ):
    raise ValueError(
        f'learning_rate must be a finite number > 0; got ' f'{learning_rate!r}.'
    )
  if (
      isinstance(batch_size, bool)
      or not isinstance(batch_size, int)
      or (batch_size < 1)
  ):
    raise ValueError(f'batch_size must be an int >= 1; got {batch_size!r}.')
  if not 0 <= warmup_fraction < 1:
    raise ValueError(
        f'warmup_fraction must be in [0, 1); got ' f'{warmup_fraction!r}.'
    )
  if eval_every_seconds is not None and not eval_every_seconds > 0:
    raise ValueError(
        f'eval_every_seconds must be > 0 or None; got '
        f'{eval_every_seconds!r}.'
    )
  seqs = np.asarray(seqs)
  if (
      seqs.ndim != 2
      or not np.issubdtype(seqs.dtype, np.integer)
      or (len(seqs) == 0 or seqs.shape[1] < 2)
  ):
    raise ValueError(
        f'seqs must be int[n >= 1, L >= 2]; got shape '
        f'{seqs.shape} and dtype {seqs.dtype}.'
    )
  wrt = training.factor_filter(model)
  tx = optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.inject_hyperparams(optax.adamw)(
          learning_rate=0.0, weight_decay=weight_decay
      ),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  rate = optimizer.opt_state[1].hyperparams['learning_rate']
  history = dict(train=[], eval=[], trainable=training.count_params(model, wrt))
  spent = 0.0

  def evaluate(step):
    if eval_fn is not None:
      history['eval'].append(dict(step=step, seconds=spent, **eval_fn(model)))

  def fraction(step):
    parts = []
    if seconds is not None:
      parts.append(spent / seconds)
    if steps is not None:
      parts.append(step / steps)
    return max(parts)

  evaluate(0)
  next_eval = eval_every_seconds
  step = 0
  bar = tqdm.tqdm(total=steps, desc='heal', unit='step', disable=not progress)
  while fraction(step) < 1:
    lr = learning_rate_at(
        fraction(step), learning_rate, warmup_fraction=warmup_fraction
    )
    rate[...] = jnp.asarray(lr, jnp.float32)
    t = time.perf_counter()
    loss, _ = training.train_step(
        model, optimizer, jnp.asarray(training.batch_at(seqs, step, batch_size))
    )
    loss = float(loss)
    spent += time.perf_counter() - t
    step += 1
    if not math.isfinite(loss):
      raise FloatingPointError(f'heal: loss is {loss} at step {step}.')
    history['train'].append(
        dict(step=step, loss=loss, learning_rate=lr, seconds=spent)
    )
    bar.update(1)
    bar.set_postfix(loss=f'{loss:.3f}', s=f'{spent:.0f}')
    if next_eval is not None and spent >= next_eval and fraction(step) < 1:
      evaluate(step)
      next_eval += eval_every_seconds
  bar.close()
  evaluate(step)
  history.update(steps=step, seconds=spent)
  return history
