"""Dense perplexity on the held-out sets, forward throughput, sample answers."""
import os
import platform
import time

from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from ctxlr import data
from ctxlr import evaluation
from ctxlr import models
from ctxlr import results
from ctxlr.models import tokenizer as tokenizer_lib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top


def run(config, workdir: str) -> None:
  t0 = time.perf_counter()
  model, tok = models.load_llama(config.model.path,
                                 param_dtype=jnp.dtype(
                                     config.model.param_dtype))
  load_seconds = time.perf_counter() - t0
  path = config.model.path or models.default_path()
  logging.info('Loaded %s in %.1f s: %s', path, load_seconds, model.config)
  common = dict(model=os.path.basename(path),
                param_dtype=config.model.param_dtype,
                num_params=model.config.num_params(), seq_len=config.seq_len,
                batch_size=config.batch_size, split=config.split,
                load_seconds=load_seconds, device=str(jax.devices()[0]),
                cpu_count=os.cpu_count(), machine=platform.machine())
  rows = []
  for corpus in config.corpora:
    seqs = data.sequences(corpus, config.split, tok, seq_len=config.seq_len,
                          num_sequences=config.num_sequences or None)
    result = evaluation.perplexity(model, seqs, batch_size=config.batch_size,
                                   desc=f'{corpus}/{config.split}')
    rows.append(dict(common, corpus=corpus, **result._asdict()))
    logging.info('%s: %s', corpus, result)
  results.write_json(os.path.join(workdir, 'results.json'), rows)

  stop = [i for i in (tok.token_to_id('<|im_end|>'),) if i is not None]
  samples = []
  for question in config.prompts:
    prompt = tok.encode(tokenizer_lib.chatml(question)).ids
    out = evaluation.generate(model, prompt,
                              max_new_tokens=config.max_new_tokens,
                              stop_ids=stop)
    samples.append(dict(prompt=question,
                        answer=tok.decode(out, skip_special_tokens=True)))
  results.write_json(os.path.join(workdir, 'samples.json'), samples)

  summary = summarize(rows, samples)
  results.write_text(os.path.join(workdir, 'summary.md'), summary)
  plot(workdir)
  logging.info('Results in %s:\n%s', workdir, summary)
  print(summary)


def summarize(rows: list[dict], samples: list[dict]) -> str:
  """Markdown: perplexity and throughput per corpus, then greedy answers."""
  columns = ['corpus', 'split', 'num_sequences', 'seq_len', 'num_tokens',
             'perplexity', 'nll', 'tokens_per_second', 'seconds']
  formats = dict(perplexity='.3f', nll='.4f', tokens_per_second='.0f',
                 seconds='.1f')
  first = rows[0]
  text = (f"Model {first['model']} ({first['num_params']:,} parameters, "
          f"{first['param_dtype']} storage, float32 compute) on "
          f"{first['device']} ({first['cpu_count']} CPUs). Perplexity over "
          'non-overlapping windows (first token of each unscored); tokens/s '
          f"of the jit-compiled forward pass at batch {first['batch_size']} "
          'x seq_len, compilation excluded.\n\n')
  text += results.markdown_table(rows, columns, formats)
  text += '\nGreedy answers (ChatML prompt):\n\n'
  text += ''.join(f"- *{s['prompt']}* -> {s['answer']!r}\n" for s in samples)
  return text


def plot(workdir: str) -> None:
  """Perplexity and throughput per corpus, from results.json alone."""
  rows = results.read_json(os.path.join(workdir, 'results.json'))
  names = [r['corpus'] for r in rows]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.5))
  bars = ax1.bar(names, [r['perplexity'] for r in rows], color='tab:blue')
  ax1.bar_label(bars, fmt='%.2f')
  ax1.set_ylabel('perplexity')
  ax1.set_title(f"{rows[0]['model']}, {rows[0]['split']} split")
  bars = ax2.bar(names, [r['tokens_per_second'] for r in rows],
                 color='tab:orange')
  ax2.bar_label(bars, fmt='%.0f')
  ax2.set_ylabel('tokens / s')
  ax2.set_title(f"forward, batch {rows[0]['batch_size']} x "
                f"{rows[0]['seq_len']}")
  for ax in (ax1, ax2):
    ax.set_ylim(0, 1.15 * max(np.max([p.get_height() for p in ax.patches]),
                              1e-9))
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'perplexity.png'), dpi=120)
  plt.close(fig)
