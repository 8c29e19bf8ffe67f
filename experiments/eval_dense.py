"""Dense perplexity on the held-out sets, forward throughput, sample answers.

Config and commands: experiments/configs/eval_dense.py. results.json: one
row per corpus; samples.json: the greedy answers; summary.md and
perplexity.png are drawn from them.
"""

import os
import platform
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ctxlr import data
from ctxlr import evaluation
from ctxlr import models
from ctxlr import results
from ctxlr.models import tokenizer as tokenizer_lib
from experiments import common


def validate(config) -> None:
  """Raises ValueError('<field>: expected …, got …') for any option error."""
  common.check_model_spec(config.model)
  common.check_names(config.corpora, 'corpora', choices=data.CORPORA)
  common.check_choice(config.split, data.SPLITS, 'split')
  common.check_int(config.seq_len, 'seq_len', minimum=2)
  common.check_int(config.batch_size, 'batch_size')
  common.check_int(config.num_sequences, 'num_sequences', minimum=0)
  common.check_names(config.prompts, 'prompts', allow_empty=True)
  common.check_int(config.max_new_tokens, 'max_new_tokens')


def run(config, workdir: str) -> None:
  """Loads the model, measures perplexity and throughput per corpus, and
  answers the prompts greedily. Writes results.json, samples.json,
  summary.md and perplexity.png; no resume (minutes)."""
  validate(config)
  t0 = time.perf_counter()
  model, tok = models.load_llama(
      config.model.path, param_dtype=jnp.dtype(config.model.param_dtype)
  )
  load_seconds = time.perf_counter() - t0
  path = config.model.path or models.default_path()
  logging.info('Loaded %s in %.1f s: %s', path, load_seconds, model.config)
  shared = dict(
      model=os.path.basename(path),
      param_dtype=config.model.param_dtype,
      num_params=model.config.num_params(),
      seq_len=config.seq_len,
      batch_size=config.batch_size,
      split=config.split,
      load_seconds=load_seconds,
      device=str(jax.devices()[0]),
      cpu_count=os.cpu_count(),
      machine=platform.machine(),
  )
  rows = []
  for corpus in config.corpora:
    seqs = data.sequences(
        corpus,
        config.split,
        tok,
        seq_len=config.seq_len,
        num_sequences=config.num_sequences or None,
    )
    result = evaluation.perplexity(
        model,
        seqs,
        batch_size=config.batch_size,
        desc=f'{corpus}/{config.split}',
    )
    rows.append(dict(shared, corpus=corpus, **result._asdict()))
    logging.info('%s: %s', corpus, result)
  common.write_results(workdir, rows)

  stop = [i for i in (tok.token_to_id('<|im_end|>'),) if i is not None]
  samples = []
  for question in config.prompts:
    prompt = tok.encode(tokenizer_lib.chatml(question)).ids
    out = evaluation.generate(
        model, prompt, max_new_tokens=config.max_new_tokens, stop_ids=stop
    )
    samples.append(
        dict(prompt=question, answer=tok.decode(out, skip_special_tokens=True))
    )
  results.write_json(os.path.join(workdir, 'samples.json'), samples)
  common.finish(workdir, summarize(rows, samples), plot)


def summarize(rows: list[dict], samples: list[dict]) -> str:
  """Markdown: perplexity and throughput per corpus, then greedy answers."""
  columns = [
      'corpus',
      'split',
      'num_sequences',
      'seq_len',
      'num_tokens',
      'perplexity',
      'nll',
      'tokens_per_second',
      'seconds',
  ]
  formats = dict(
      perplexity='.3f', nll='.4f', tokens_per_second='.0f', seconds='.1f'
  )
  first = rows[0]
  text = (
      f"Model {first['model']} ({first['num_params']:,} parameters, "
      f"{first['param_dtype']} storage, float32 compute) on "
      f"{first['device']} ({first['cpu_count']} CPUs). Perplexity over "
      'non-overlapping windows (first token of each unscored); tokens/s '
      f"of the jit-compiled forward pass at batch {first['batch_size']} "
      'x seq_len, compilation excluded.\n\n'
  )
  text += results.markdown_table(rows, columns, formats)
  text += '\nGreedy answers (ChatML prompt):\n\n'
  text += ''.join(f"- *{s['prompt']}* -> {s['answer']!r}\n" for s in samples)
  return text


def plot(workdir: str) -> None:
  """perplexity.png from results.json alone: perplexity and throughput per
  corpus."""
  rows = common.read_results(workdir, None)
  names = [r['corpus'] for r in rows]
  fig, axes = common.subplots(1, 2, figsize=(8, 3.5))
  ax1, ax2 = axes[0]
  bars = ax1.bar(names, [r['perplexity'] for r in rows], color='tab:blue')
  ax1.bar_label(bars, fmt='%.2f')
  ax1.set_ylabel('perplexity')
  ax1.set_title(f"{rows[0]['model']}, {rows[0]['split']} split")
  bars = ax2.bar(
      names, [r['tokens_per_second'] for r in rows], color='tab:orange'
  )
  ax2.bar_label(bars, fmt='%.0f')
  ax2.set_ylabel('tokens / s')
  ax2.set_title(
      f"forward, batch {rows[0]['batch_size']} x " f"{rows[0]['seq_len']}"
  )
  for ax in (ax1, ax2):
    ax.set_ylim(
        0, 1.15 * max(np.max([p.get_height() for p in ax.patches]), 1e-9)
    )
  common.save_figure(fig, workdir, 'perplexity.png')
