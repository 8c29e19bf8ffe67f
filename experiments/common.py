"""Pieces the model experiments share: model, data, evaluation, one method."""
import os
import time
from typing import Any, Callable, Mapping

from flax import nnx
import jax.numpy as jnp

from ctxlr import data
from ctxlr import evaluation
from ctxlr import models
from ctxlr import pipeline
from ctxlr import results
from ctxlr import surgery


def load_model(model_config):
  """(model, tokenizer) from `config.model` (path '' = bundled SmolLM2)."""
  dtype = jnp.dtype(model_config.param_dtype)
  return models.load_llama(model_config.path or None, param_dtype=dtype)


def token_sequences(corpus: str, split: str, tokenizer, spec):
  """int32[num_tokens // seq_len, seq_len] from a corpus split."""
  n = max(1, spec.num_tokens // spec.seq_len)
  return data.sequences(corpus, split, tokenizer, seq_len=spec.seq_len,
                        num_sequences=n)


def calibration_batches(tokenizer, calib_config) -> list:
  seqs = token_sequences(calib_config.corpus, 'calib', tokenizer,
                         calib_config)
  return list(data.batches(seqs, min(calib_config.batch_size, len(seqs))))


def evaluate(model, tokenizer, eval_config, label: str) -> dict[str, dict]:
  """Perplexity on the held-out split of every corpus in `eval_config`."""
  out = {}
  for corpus in eval_config.corpora:
    seqs = token_sequences(corpus, 'eval', tokenizer, eval_config)
    p = evaluation.perplexity(model, seqs, batch_size=eval_config.batch_size,
                              desc=f'{label} {corpus}')
    out[corpus] = dict(perplexity=p.perplexity, tokens=p.num_tokens,
                       tokens_per_second=p.tokens_per_second)
  return out


def compress_copy(dense: nnx.Module, stats: Mapping[str, Any], *,
                  method: str, ratio: float, allocation: str = 'uniform',
                  mu: float = 0.0, mu_rule: str = 'energy'
                  ) -> tuple[nnx.Module, dict[str, Any]]:
  """A compressed copy of `dense` from precomputed one-shot statistics.

  Every method sees exactly the same statistics (`stats[layer]`), so a sweep
  over methods and ratios calibrates once.
  """
  model = nnx.clone(dense)
  shapes = {n: surgery.get_module(model, n).kernel.shape for n in stats}
  kernels = {n: surgery.get_module(model, n).kernel[...] for n in stats}
  t = time.perf_counter()
  ranks = pipeline.assign_ranks(shapes, kernels, stats, ratio=ratio,
                                    rule=allocation)
  solved = pipeline.factorize_layers(kernels, stats, ranks, method=method,
                                         mu=mu, mu_rule=mu_rule)
  pipeline.apply_factors(model, solved)
  report = pipeline.make_report(
      shapes, ranks, solved, seconds=dict(solve=time.perf_counter() - t),
      params_before=pipeline.count_params(dense),
      params_after=pipeline.count_params(model))
  return model, report


def resume_sweep(workdir: str, config) -> tuple[dict, Any, Any]:
  """(results so far, model, tokenizer) for a sweep that keeps its rows.

  `results.json` in `workdir` holds `dense` perplexities and finished `rows`;
  a rerun continues from them (the dense evaluation is done once).
  """
  path = os.path.join(workdir, 'results.json')
  out = results.read_json(path) if os.path.exists(path) else dict(rows=[])
  model, tokenizer = load_model(config.model)
  if 'dense' not in out:
    out['dense'] = {c: v['perplexity'] for c, v in evaluate(
        model, tokenizer, config.eval, 'dense').items()}
  return out, model, tokenizer


def finish(workdir: str, summary: str, plot: Callable[[str], None]) -> None:
  """Writes summary.md, draws the figures from results.json, prints."""
  results.write_text(os.path.join(workdir, 'summary.md'), summary)
  plot(workdir)
  print(summary)
