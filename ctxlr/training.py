"""Training a chosen subset of an NNX model's parameters with optax.

    tx = make_tx(learning_rate=1e-4, steps=200, warmup_steps=20)
    history = train(model, seqs, wrt=nnx.LoRAParam, tx=tx, steps=200,
                    batch_size=4, checkpoint_dir='ckpt', eval_fn=ppl)

`wrt` (an NNX filter) picks what is trained: `nnx.LoRAParam` for adapters
(`ctxlr.adapters`), `factor_filter(model)` for the `a`, `b` of compressed
layers (healing). Everything else stays frozen: gradients are taken only
with respect to `wrt` and the optimizer state covers only it.

The loss is next-token cross-entropy (mean over every position but the
first of each sequence). Batches are a pure function of the step
(`batch_at`), and a checkpoint holds the trained parameters, the optimizer
state (step count included) and the history, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would. Each finished
checkpoint gets a record of the SHA-256 and size of its files
(`verified/<step>.json`, written once orbax has finalized the step); a run
resumes from the newest step whose files match their record, and a step
without one (killed before it was recorded) or with a damaged file is named
in a warning and dropped: it is not finished.
"""

import hashlib
import os
import shutil
import time
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from ctxlr import results
from ctxlr import surgery


def make_tx(
    *,
    learning_rate: float,
    steps: int,
    warmup_steps: int = 0,
    clip_norm: float = 1.0,
    weight_decay: float = 0.0,
    end_fraction: float = 0.0,
) -> optax.GradientTransformation:
  """AdamW on a linear warm-up + cosine schedule, after global-norm clipping.

  Args:
    learning_rate: peak learning rate.
    steps: total steps (the cosine reaches `end_fraction · peak` there).
    warmup_steps: linear warm-up from 0, < steps.
    clip_norm: `optax.clip_by_global_norm` threshold (inf: none).
    weight_decay: AdamW's decoupled weight decay.
    end_fraction: final learning rate as a fraction of the peak.

  Returns:
    An optax GradientTransformation.
  """
  if not 0 <= warmup_steps < steps:
    raise ValueError(
        f'Expected 0 <= warmup_steps < steps; got '
        f'{warmup_steps} and {steps}.'
    )
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=steps,
      end_value=learning_rate * end_fraction,
  )
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, weight_decay=weight_decay),
  )


def factor_filter(model: nnx.Module) -> Callable[[tuple, Any], bool]:
  """NNX filter: the `a` and `b` of every `FactoredLinear` in `model`."""
  prefixes = frozenset(
      tuple(p)
      for p, m in nnx.iter_modules(model)
      if isinstance(m, surgery.FactoredLinear)
  )
  if not prefixes:
    raise ValueError('The model has no FactoredLinear layer to train.')

  def is_factor(path: tuple, x: Any) -> bool:
    del x
    return path[-1] in ('a', 'b') and tuple(path[:-1]) in prefixes

  return is_factor


def count_params(model: nnx.Module, wrt: Any) -> int:
  """Number of parameters the filter `wrt` selects in `model`."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, wrt)))


def next_token_loss(model: nnx.Module, ids: jax.Array) -> jax.Array:
  """Mean cross-entropy of `ids[:, 1:]` given the prefix; ids int[b, L]."""
  logits = model(ids)[:, :-1].astype(jnp.float32)  # f32[b, L-1, V]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, ids[:, 1:]
  ).mean()


@nnx.jit
def train_step(
    model: nnx.Module, optimizer: nnx.Optimizer, ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One optimizer step on `optimizer.wrt`; returns (loss, gradient norm)."""
  grad_fn = nnx.value_and_grad(
      next_token_loss, argnums=nnx.DiffState(0, optimizer.wrt)
  )
  loss, grads = grad_fn(model, ids)
  optimizer.update(model, grads)
  return loss, optax.tree.norm(grads)


def batch_at(seqs: np.ndarray, step: int, batch_size: int) -> np.ndarray:
  """Batch number `step`: rows `step·B … step·B + B − 1`, cycling over seqs."""
  n = len(seqs)
  rows = (step * batch_size + np.arange(batch_size)) % n
  return np.asarray(seqs[rows], np.int32)


def _manager(directory: str, every: int) -> ocp.CheckpointManager:
  # Two steps kept: the newest may be finalized but not yet recorded when a
  # run is killed; the one before it is then the newest finished one.
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=2, save_interval_steps=every, create=True
      ),
  )


def _record_path(directory: str, step: int) -> str:
  return os.path.join(os.path.abspath(directory), 'verified', f'{step}.json')


def _file_table(folder: str) -> dict[str, dict[str, Any]]:
  table = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      h = hashlib.sha256()
      with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
      table[os.path.relpath(path, folder)] = dict(
          sha256=h.hexdigest(), size=os.path.getsize(path)
      )
  return dict(sorted(table.items()))


def _record_step(directory: str, step: int) -> None:
  """Writes the checksums of a finalized step (after orbax has finished)."""
  folder = os.path.join(os.path.abspath(directory), str(step))
  results.write_json(_record_path(directory, step), _file_table(folder))
  kept = {f'{s}.json' for s in _steps_on_disk(directory)}
  for entry in os.listdir(os.path.dirname(_record_path(directory, step))):
    if entry not in kept:  # steps orbax has deleted
      os.remove(
          os.path.join(os.path.dirname(_record_path(directory, step)), entry)
      )


def _steps_on_disk(directory: str) -> list[int]:
  root = os.path.abspath(directory)
  return sorted(
      int(e)
      for e in os.listdir(root)
      if e.isdigit() and os.path.isdir(os.path.join(root, e))
  )


def _step_problem(directory: str, step: int) -> str | None:
  """Why checkpoint `step` is not finished, or None if its files verify."""
  path = _record_path(directory, step)
  if not os.path.isfile(path):
    return 'no checksum record (killed before it was recorded)'
  try:
    record = results.read_json(path)
  except ValueError as e:
    return str(e)
  folder = os.path.join(os.path.abspath(directory), str(step))
  actual = _file_table(folder)
  bad = sorted(
      rel
      for rel in set(record) | set(actual)
      if record.get(rel) != actual.get(rel)
  )
  if bad:
    return f'files that do not match their record: {bad[:5]}'
  return None


def latest_finished_step(directory: str) -> int | None:
  """The newest training checkpoint in `directory` whose files verify.

  Newer steps that do not verify are named in a warning and deleted (they
  are not finished: the run redoes them).
  """
  if not os.path.isdir(directory):
    return None
  for step in reversed(_steps_on_disk(directory)):
    problem = _step_problem(directory, step)
    if problem is None:
      return step
    logging.warning(
        'Training checkpoint %s/%d is not finished (%s): ' 'dropping it.',
        directory,
        step,
        problem,
    )
    shutil.rmtree(os.path.join(os.path.abspath(directory), str(step)))
    if os.path.exists(_record_path(directory, step)):
      os.remove(_record_path(directory, step))
  return None


def _train_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
  return dict(
      params=nnx.state(model, optimizer.wrt), optimizer=nnx.state(optimizer)
  )


def train(
    model: nnx.Module,
    seqs: np.ndarray,
    *,
    wrt: Any,
    tx: optax.GradientTransformation,
    steps: int,
    batch_size: int,
    eval_fn: Callable[[nnx.Module], dict] | None = None,
    eval_every: int = 0,
    eval_at_start: bool = True,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    log_every: int = 10,
    desc: str = 'train',
) -> dict[str, list]:
  """Trains the `wrt` parameters of `model` in place for `steps` steps.

  Args:
    model: an NNX model mapping int32[b, L] ids to logits [b, L, V].
    seqs: int[n, L] training sequences; step s uses `batch_at(seqs, s, B)`.
    wrt: NNX filter of the parameters to train (e.g. `nnx.LoRAParam`).
    tx: the optax transformation (`make_tx`).
    steps: number of optimizer steps in all (a resumed run counts the steps
      already done).
    batch_size: sequences per step.
    eval_fn: `eval_fn(model) -> {name: float}`, run at step 0 (unless a
      checkpoint has it), every `eval_every` steps and at the end.
    eval_every: 0: only at the start and the end.
    eval_at_start: evaluate before the first step (False when the caller
      already knows the step-0 numbers, e.g. adapters that keep the model's
      function).
    checkpoint_dir: if given, orbax checkpoints of (trained parameters,
      optimizer state, history) are written there every `checkpoint_every`
      steps and at the end, and a run finding one there resumes from it.
    checkpoint_every: steps between checkpoints (0: only at the end).
    log_every: steps between absl log lines of the loss.
    desc: tqdm label.

  Returns:
    {'train': [dict(step, loss, grad_norm, seconds)],
     'eval': [dict(step, **eval_fn(model))]}; `step` counts finished steps.
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(
        f'steps and batch_size must be >= 1; got {steps} and ' f'{batch_size}.'
    )
  if np.ndim(seqs) != 2 or not np.issubdtype(
      np.asarray(seqs).dtype, np.integer
  ):
    raise ValueError(
        f'seqs must be integer token ids int[n, L]; got shape '
        f'{np.shape(seqs)} and dtype {np.asarray(seqs).dtype}.'
    )
  if len(seqs) == 0 or np.shape(seqs)[1] < 2:
    raise ValueError(
        f'seqs must hold at least one sequence of >= 2 tokens '
        f'(the loss predicts token t+1 from 1..t); got shape '
        f'{np.shape(seqs)}.'
    )
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  history = dict(train=[], eval=[])
  start = 0
  manager = None
  if checkpoint_dir is not None:
    finished = latest_finished_step(checkpoint_dir)  # before orbax looks
    manager = _manager(checkpoint_dir, max(checkpoint_every, 1))
    if finished is not None:
      start = finished
      restored = manager.restore(
          start,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(_train_state(model, optimizer)),
              history=ocp.args.JsonRestore(),
          ),
      )
      nnx.update(model, restored.state['params'])
      nnx.update(optimizer, restored.state['optimizer'])
      history = restored.history
      logging.info('%s: resumed from the checkpoint of step %d.', desc, start)

  def evaluate(step):
    if eval_fn is not None and not any(
        r['step'] == step for r in history['eval']
    ):
      row = dict(step=step, **eval_fn(model))
      history['eval'].append(row)
      logging.info('%s eval %s', desc, row)

  def save(step, force=False):
    if manager is not None and manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_train_state(model, optimizer)),
            history=ocp.args.JsonSave(history),
        ),
        force=force,
    ):
      manager.wait_until_finished()  # finalized: now record it
      _record_step(checkpoint_dir, step)

  if eval_at_start and start == 0:
    evaluate(0)
  bar = tqdm.tqdm(
      range(start, steps), desc=desc, unit='step', initial=start, total=steps
  )
  for step in bar:
    t0 = time.perf_counter()
    loss, gnorm = train_step(
        model, optimizer, jnp.asarray(batch_at(seqs, step, batch_size))
    )
    loss, gnorm = float(loss), float(gnorm)
    history['train'].append(
        dict(
            step=step + 1,
            loss=loss,
            grad_norm=gnorm,
            seconds=time.perf_counter() - t0,
        )
    )
    bar.set_postfix(loss=f'{loss:.4f}')
    if not np.isfinite(loss):
      raise FloatingPointError(f'{desc}: loss is {loss} at step {step + 1}.')
    if log_every and (step + 1) % log_every == 0:
      logging.info(
          '%s step %d loss %.4f grad_norm %.3f', desc, step + 1, loss, gnorm
      )
    if eval_every and (step + 1) % eval_every == 0:
      evaluate(step + 1)
    if checkpoint_every and (step + 1) % checkpoint_every == 0:
      save(step + 1)
  bar.close()
  evaluate(steps)
  if manager is not None:
    if manager.latest_step() != steps:
      save(steps, force=True)
    manager.wait_until_finished()
    manager.close()
  return history
