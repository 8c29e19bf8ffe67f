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
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_F32 = jnp.float32


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

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'intermediate_size',
                 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                 'max_position'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'LlamaConfig.{name} must be an int; got {value!r}.')
      if value < 1:
        raise ValueError(f'LlamaConfig.{name} must be >= 1; got {value}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'LlamaConfig.num_heads={self.num_heads} is not a '
                       f'multiple of num_kv_heads={self.num_kv_heads}.')
    if self.head_dim % 2:
      raise ValueError(f'LlamaConfig.head_dim={self.head_dim} must be even '
                       '(RoPE rotates pairs of features).')
    if not self.rope_theta > 0 or not self.rms_eps > 0:
      raise ValueError('LlamaConfig.rope_theta and rms_eps must be > 0; got '
                       f'{self.rope_theta} and {self.rms_eps}.')

  def num_params(self) -> int:
    """Number of stored parameters (the tied head counted once)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    block = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.num_layers * block + d + head


def _linear(d_in: int, d_out: int, param_dtype: Any, rngs: nnx.Rngs,
            init: Any):
  kwargs = {} if init is None else dict(kernel_init=init)
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=_F32,
                    param_dtype=param_dtype, rngs=rngs, **kwargs)


def _rms_norm(config: LlamaConfig, param_dtype: Any, rngs: nnx.Rngs):
  return nnx.RMSNorm(config.hidden_size, epsilon=config.rms_eps, dtype=_F32,
                     param_dtype=param_dtype, rngs=rngs)


def rope_tables(seq_len: int, head_dim: int,
                theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin of RoPE angles, float32[seq_len, head_dim // 2] each."""
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  angles = jnp.arange(seq_len, dtype=_F32)[:, None] * jnp.asarray(
      inv_freq, _F32)[None, :]
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
  c, s = cos[:, None, :], sin[:, None, :]                 # [seq, 1, half]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, config: LlamaConfig, *, param_dtype: Any = _F32,
               rngs: nnx.Rngs, init: Any = None):
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = config.head_dim
    self.rope_theta = config.rope_theta
    d, hd = config.hidden_size, config.head_dim
    self.q_proj = _linear(d, config.num_heads * hd, param_dtype, rngs, init)
    self.k_proj = _linear(d, config.num_kv_heads * hd, param_dtype, rngs, init)
    self.v_proj = _linear(d, config.num_kv_heads * hd, param_dtype, rngs, init)
    self.o_proj = _linear(config.num_heads * hd, d, param_dtype, rngs, init)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float32[batch, seq, hidden] -> float32[batch, seq, hidden]."""
    b, s, _ = x.shape
    kv, hd = self.num_kv_heads, self.head_dim
    group = self.num_heads // kv
    cos, sin = rope_tables(s, hd, self.rope_theta)       # positions 0..s-1
    q = apply_rope(self.q_proj(x).reshape(b, s, kv * group, hd), cos, sin)
    q = q.reshape(b, s, kv, group, hd)    # query head j*group+g uses kv head j
    k = apply_rope(self.k_proj(x).reshape(b, s, kv, hd), cos, sin)
    v = self.v_proj(x).reshape(b, s, kv, hd)
    scores = jnp.einsum('bskgd,btkd->bkgst', q, k) / np.sqrt(hd).astype(
        np.float32)                                       # [b, kv, g, s, s]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(_F32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bkgst,btkd->bskgd', probs, v)       # [b, s, kv, g, hd]
    return self.o_proj(out.reshape(b, s, kv * group * hd))


class MLP(nnx.Module):
  """SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

  def __init__(self, config: LlamaConfig, *, param_dtype: Any = _F32,
               rngs: nnx.Rngs, init: Any = None):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(d, f, param_dtype, rngs, init)
    self.up_proj = _linear(d, f, param_dtype, rngs, init)
    self.down_proj = _linear(f, d, param_dtype, rngs, init)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder block: `h + attn(norm(h))`, then `h + mlp(norm(h))`."""

  def __init__(self, config: LlamaConfig, *, param_dtype: Any = _F32,
               rngs: nnx.Rngs, init: Any = None):
    self.attn_norm = _rms_norm(config, param_dtype, rngs)
    self.attn = Attention(config, param_dtype=param_dtype, rngs=rngs,
                          init=init)
    self.mlp_norm = _rms_norm(config, param_dtype, rngs)
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

  def __init__(self, config: LlamaConfig, *, param_dtype: Any = _F32,
               rngs: nnx.Rngs, init: Any = None):
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
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size,
                                  dtype=_F32, param_dtype=param_dtype,
                                  rngs=rngs, **kwargs)
    self.layers = nnx.List([
        Block(config, param_dtype=param_dtype, rngs=rngs, init=init)
        for _ in range(config.num_layers)])
    self.norm = _rms_norm(config, param_dtype, rngs)
    if not config.tie_embeddings:
      self.lm_head = _linear(config.hidden_size, config.vocab_size,
                             param_dtype, rngs, init)

  def embed(self, ids: jax.Array) -> jax.Array:
    """int[batch, seq] token ids -> float32[batch, seq, hidden]."""
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f'ids must be int[batch, seq]; got {ids.dtype}'
                       f'{list(ids.shape)}.')
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
  return Llama(config, param_dtype=param_dtype, rngs=nnx.Rngs(0),
               init=shape_only)
