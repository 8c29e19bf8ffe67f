"""A Llama decoder in Flax NNX, built so that model surgery can find its parts.

Every projection is its own `nnx.Linear` (kernel `(d_in, d_out)`, `y = x @ K`,
no fused qkv) at a path a user recognises:

    model.layers[i].attn.{q_proj, k_proj, v_proj, o_proj}
    model.layers[i].mlp.{gate_proj, up_proj, down_proj}

so that replacing one is an attribute assignment on its parent. The model runs
piecewise for block-by-block calibration:

    h = model.embed(ids)          # float32[batch, seq, hidden]
    for block in model.layers:
      h = block(h)                # each block makes its own RoPE and mask
    logits = model.head(h)        # float32[batch, seq, vocab]

and `model(ids)` is exactly that. Weights are stored in `param_dtype` (float32
by default, bf16 optional); all arithmetic runs in float32.

RoPE is the half-split ("NeoX", Hugging Face) form: q/k rows in the Hugging
Face order. GGUF files store them permuted for interleaved RoPE;
`gguf_io` undoes that permutation when it loads them.

One class covers the Llama family as `transformers` implements it: Llama
2/3.x (grouped-query attention, Llama-3 or linear RoPE scaling, tied or untied
head), Qwen2/2.5 (biases on q/k/v), Qwen3 (RMS norms on each q/k head before
RoPE) and Mistral (sliding-window attention). A bias, where the checkpoint
has one, is the `bias` of the same `nnx.Linear`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_F32 = jnp.float32


MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')
ROPE_TYPES = ('linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (`transformers`' `rope_scaling` / `rope_type`).

  Attributes:
    rope_type: 'linear' (every frequency divided by `factor`) or 'llama3'
      (Llama 3.1+: long wavelengths divided by `factor`, short ones kept,
      a smooth blend between).
    factor: the scaling factor (> 0).
    low_freq_factor: 'llama3' only: wavelengths above
      `original_max_position / low_freq_factor` are divided by `factor`.
    high_freq_factor: 'llama3' only: wavelengths below
      `original_max_position / high_freq_factor` are kept.
    original_max_position: 'llama3' only: the pretraining context length
      (`original_max_position_embeddings`).
  """

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(
          f'RopeScaling.rope_type={self.rope_type!r}; expected '
          f'one of {ROPE_TYPES}.'
      )
    if not self.factor > 0:
      raise ValueError(f'RopeScaling.factor must be > 0; got {self.factor}.')
    if self.rope_type == 'llama3' and not (
        0 < self.low_freq_factor < self.high_freq_factor
        and self.original_max_position >= 1
    ):
      raise ValueError(
          'RopeScaling (llama3) needs 0 < low_freq_factor < high_freq_factor '
          f'and original_max_position >= 1; got {self.low_freq_factor}, '
          f'{self.high_freq_factor}, {self.original_max_position}.'
      )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes and constants of a Llama decoder (Hugging Face names in comments).

  Attributes:
    vocab_size: number of token ids (`vocab_size`).
    hidden_size: width of the residual stream (`hidden_size`).
    intermediate_size: width of the SwiGLU MLP (`intermediate_size`).
    num_layers: number of decoder blocks (`num_hidden_layers`).
    num_heads: query heads (`num_attention_heads`).
    num_kv_heads: key/value heads, dividing `num_heads` (grouped-query).
    head_dim: width of one head; even (RoPE rotates pairs).
    rope_theta: RoPE base frequency.
    rms_eps: epsilon inside the RMS norms (`rms_norm_eps`).
    tie_embeddings: whether the output head reuses the token embedding.
    max_position: context length the model was trained for (informational;
      longer inputs run but are outside the training distribution).
    model_type: the `transformers` family the model is exported as: 'llama',
      'mistral', 'qwen2' or 'qwen3'. The forward pass depends on the fields
      below only, never on this name.
    qkv_bias: q/k/v projections have a bias (Qwen2; Llama `attention_bias`).
    o_bias: the output projection has a bias (Llama `attention_bias`).
    mlp_bias: gate/up/down projections have a bias (Llama `mlp_bias`).
    qk_norm: an RMS norm (weight `[head_dim]`) on every query and key head
      before RoPE (Qwen3).
    rope_scaling: RoPE frequency scaling, or None.
    sliding_window: each query attends to itself and the `sliding_window - 1`
      tokens before it (Mistral), or None: to all tokens before it.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  max_position: int = 2048
  model_type: str = 'llama'
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  rope_scaling: RopeScaling | None = None
  sliding_window: int | None = None

  def __post_init__(self):
    for name in (
        'vocab_size',
        'hidden_size',
        'intermediate_size',
        'num_layers',
        'num_heads',
        'num_kv_heads',
        'head_dim',
        'max_position',
    ):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'LlamaConfig.{name} must be an int; got {value!r}.')
      if value < 1:
        raise ValueError(f'LlamaConfig.{name} must be >= 1; got {value}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'LlamaConfig.num_heads={self.num_heads} is not a '
          f'multiple of num_kv_heads={self.num_kv_heads}.'
      )
    if self.head_dim % 2:
      raise ValueError(
          f'LlamaConfig.head_dim={self.head_dim} must be even '
          '(RoPE rotates pairs of features).'
      )
    if not self.rope_theta > 0 or not self.rms_eps > 0:
      raise ValueError(
          'LlamaConfig.rope_theta and rms_eps must be > 0; got '
          f'{self.rope_theta} and {self.rms_eps}.'
      )
    if self.model_type not in MODEL_TYPES:
      raise ValueError(
          f'LlamaConfig.model_type={self.model_type!r}; '
          f'expected one of {MODEL_TYPES}.'
      )
    for name in ('tie_embeddings', 'qkv_bias', 'o_bias', 'mlp_bias', 'qk_norm'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(
            f'LlamaConfig.{name} must be a bool; got '
            f'{getattr(self, name)!r}.'
        )
    if self.rope_scaling is not None and not isinstance(
        self.rope_scaling, RopeScaling
    ):
      raise ValueError(
          'LlamaConfig.rope_scaling must be a RopeScaling or '
          f'None; got {self.rope_scaling!r}.'
      )
    window = self.sliding_window
    if window is not None and (
        isinstance(window, bool)
        or not isinstance(window, (int, np.integer))
        or window < 1
    ):
      raise ValueError(
          'LlamaConfig.sliding_window must be None or an int '
          f'>= 1; got {window!r}.'
      )

  def num_params(self) -> int:
    """Number of stored parameters (the tied head counted once)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    attn = d * (2 * q + 2 * kv)
    attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
    attn += 2 * hd * self.qk_norm
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    block = attn + mlp + 2 * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.num_layers * block + d + head


def _linear(
    d_in: int,
    d_out: int,
    param_dtype: Any,
    rngs: nnx.Rngs,
    init: Any,
    bias: bool = False,
):
  kwargs = {} if init is None else dict(kernel_init=init, bias_init=init)
  return nnx.Linear(
      d_in,
      d_out,
      use_bias=bias,
      dtype=_F32,
      param_dtype=param_dtype,
      rngs=rngs,
      **kwargs,
  )


def _rms_norm(
    width: int, config: LlamaConfig, param_dtype: Any, rngs: nnx.Rngs
):
  return nnx.RMSNorm(
      width,
      epsilon=config.rms_eps,
      dtype=_F32,
      param_dtype=param_dtype,
      rngs=rngs,
  )


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> np.ndarray:
  """RoPE inverse frequencies, float64[head_dim // 2], scaling applied.

  The same formulas as `transformers`' `ROPE_INIT_FUNCTIONS` ('default',
  'linear', 'llama3'); the attention factor is 1 for all three.
  """
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv_freq
  if scaling.rope_type == 'linear':
    return inv_freq / scaling.factor
  # 'llama3'
  old = scaling.original_max_position
  low_wavelen = old / scaling.low_freq_factor
  high_wavelen = old / scaling.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def rope_tables(
    seq_len: int,
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
) -> tuple[jax.Array, jax.Array]:
  """cos and sin of RoPE angles, float32[seq_len, head_dim // 2] each."""
  inv_freq = rope_inv_freq(head_dim, theta, scaling)
  angles = (
      jnp.arange(seq_len, dtype=_F32)[:, None]
      * jnp.asarray(inv_freq, _F32)[None, :]
  )
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Half-split RoPE: feature i pairs with i + head_dim/2.

  Args:
    x: float32[batch, seq, heads, head_dim].
    cos: float32[seq, head_dim // 2].
    sin: float32[seq, head_dim // 2].

  Returns:
    float32[batch, seq, heads, head_dim], rotated.
  """
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  c, s = cos[:, None, :], sin[:, None, :]  # [seq, 1, half]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention_mask(seq_len: int, sliding_window: int | None) -> jax.Array:
  """bool[seq, seq]: query s sees key t iff t <= s (and s - t < window)."""
  s = jnp.arange(seq_len)[:, None]
  t = jnp.arange(seq_len)[None, :]
  mask = t <= s
  if sliding_window is not None:
    mask &= s - t < sliding_window
  return mask


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(
      self,
      config: LlamaConfig,
      *,
      param_dtype: Any = _F32,
      rngs: nnx.Rngs,
      init: Any = None,
  ):
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = config.head_dim
    self.rope_theta = config.rope_theta
    self.rope_scaling = config.rope_scaling
    self.sliding_window = config.sliding_window
    d, hd = config.hidden_size, config.head_dim
    qkv = config.qkv_bias
    self.q_proj = _linear(
        d, config.num_heads * hd, param_dtype, rngs, init, qkv
    )
    self.k_proj = _linear(
        d, config.num_kv_heads * hd, param_dtype, rngs, init, qkv
    )
    self.v_proj = _linear(
        d, config.num_kv_heads * hd, param_dtype, rngs, init, qkv
    )
    self.o_proj = _linear(
        config.num_heads * hd, d, param_dtype, rngs, init, config.o_bias
    )
    if config.qk_norm:
      self.q_norm = _rms_norm(hd, config, param_dtype, rngs)
      self.k_norm = _rms_norm(hd, config, param_dtype, rngs)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """float32[batch, seq, hidden] -> float32[batch, seq, hidden]."""
    b, s, _ = x.shape
    kv, hd = self.num_kv_heads, self.head_dim
    group = self.num_heads // kv
    cos, sin = rope_tables(
        s, hd, self.rope_theta, self.rope_scaling
    )  # positions 0..s-1
    q = self.q_proj(x).reshape(b, s, kv * group, hd)
    k = self.k_proj(x).reshape(b, s, kv, hd)
    if self.q_norm is not None:  # per head, pre-RoPE
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, cos, sin).reshape(b, s, kv, group, hd)
    k = apply_rope(k, cos, sin)  # query head j*group+g uses kv head j
    v = self.v_proj(x).reshape(b, s, kv, hd)
    scores = jnp.einsum('bskgd,btkd->bkgst', q, k) / np.sqrt(hd).astype(
        np.float32
    )  # [b, kv, g, s, s]
    mask = attention_mask(s, self.sliding_window)
    scores = jnp.where(mask, scores, jnp.finfo(_F32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bkgst,btkd->bskgd', probs, v)  # [b, s, kv, g, hd]
    return self.o_proj(out.reshape(b, s, kv * group * hd))


class MLP(nnx.Module):
  """SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

  def __init__(
      self,
      config: LlamaConfig,
      *,
      param_dtype: Any = _F32,
      rngs: nnx.Rngs,
      init: Any = None,
  ):
    d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
    self.gate_proj = _linear(d, f, param_dtype, rngs, init, bias)
    self.up_proj = _linear(d, f, param_dtype, rngs, init, bias)
    self.down_proj = _linear(f, d, param_dtype, rngs, init, bias)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder block: `h + attn(norm(h))`, then `h + mlp(norm(h))`."""

  def __init__(
      self,
      config: LlamaConfig,
      *,
      param_dtype: Any = _F32,
      rngs: nnx.Rngs,
      init: Any = None,
  ):
    self.attn_norm = _rms_norm(config.hidden_size, config, param_dtype, rngs)
    self.attn = Attention(config, param_dtype=param_dtype, rngs=rngs, init=init)
    self.mlp_norm = _rms_norm(config.hidden_size, config, param_dtype, rngs)
    self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs, init=init)

  def __call__(self, h: jax.Array) -> jax.Array:
    """float32[batch, seq, hidden] -> float32[batch, seq, hidden]."""
    h = h.astype(_F32)
    h = h + self.attn(self.attn_norm(h))
    return h + self.mlp(self.mlp_norm(h))


class Llama(nnx.Module):
  """Llama decoder-only language model.

  >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
  ...                      num_layers=2, num_heads=4, num_kv_heads=2,
  ...                      head_dim=4)
  >>> model = Llama(config, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 5), jnp.int32)).shape
  (2, 5, 64)
  """

  def __init__(
      self,
      config: LlamaConfig,
      *,
      param_dtype: Any = _F32,
      rngs: nnx.Rngs,
      init: Any = None,
  ):
    """Builds the model with randomly initialised weights.

    Args:
      config: sizes.
      param_dtype: storage dtype of every parameter; compute is float32.
      rngs: random keys for the initialisers.
      init: initializer of every kernel and the embedding (default: Flax's
        `nnx.Linear` / `nnx.Embed` defaults). Loaders pass one that returns
        `jax.ShapeDtypeStruct`s and fill the values in afterwards.
    """
    self.config = config
    self.param_dtype = jnp.dtype(param_dtype)
    kwargs = {} if init is None else dict(embedding_init=init)
    self.embed_tokens = nnx.Embed(
        config.vocab_size,
        config.hidden_size,
        dtype=_F32,
        param_dtype=param_dtype,
        rngs=rngs,
        **kwargs,
    )
    self.layers = nnx.List(
        [
            Block(config, param_dtype=param_dtype, rngs=rngs, init=init)
            for _ in range(config.num_layers)
        ]
    )
    self.norm = _rms_norm(config.hidden_size, config, param_dtype, rngs)
    if not config.tie_embeddings:
      self.lm_head = _linear(
          config.hidden_size, config.vocab_size, param_dtype, rngs, init
      )

  def embed(self, ids: jax.Array) -> jax.Array:
    """int[batch, seq] token ids -> float32[batch, seq, hidden]."""
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(
          f'ids must be int[batch, seq]; got {ids.dtype}' f'{list(ids.shape)}.'
      )
    return self.embed_tokens(ids).astype(_F32)

  def head(self, h: jax.Array) -> jax.Array:
    """Final norm and output head: float32[batch, seq, hidden] -> logits.

    Returns:
      float32[batch, seq, vocab_size].
    """
    h = self.norm(h.astype(_F32))
    if self.config.tie_embeddings:
      return self.embed_tokens.attend(h).astype(_F32)
    return self.lm_head(h)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """int[batch, seq] token ids -> float32[batch, seq, vocab_size] logits."""
    h = self.embed(ids)
    for block in self.layers:
      h = block(h)
    return self.head(h)


def abstract_llama(config: LlamaConfig, *, param_dtype: Any = _F32) -> Llama:
  """A `Llama` whose parameters are shapes only (no memory, no RNG work).

  Loaders fill it with `set_value`; see `hf_io.from_hf_tensors`.
  """

  def shape_only(key, shape, dtype=_F32):
    del key
    return jax.ShapeDtypeStruct(shape, dtype)

  return Llama(
      config, param_dtype=param_dtype, rngs=nnx.Rngs(0), init=shape_only
  )
