"""A tiny NNX transformer-like model for surgery and calibration tests."""

from flax import nnx
import jax
import jax.numpy as jnp


class Block(nnx.Module):
  """q/k/v share an input; gate/up share an input; o and down do not."""

  def __init__(self, d: int, f: int, rngs: nnx.Rngs):
    self.attn = nnx.Dict(
        q_proj=nnx.Linear(d, d, use_bias=False, rngs=rngs),
        k_proj=nnx.Linear(d, d, use_bias=False, rngs=rngs),
        v_proj=nnx.Linear(d, d, use_bias=False, rngs=rngs),
        o_proj=nnx.Linear(d, d, use_bias=True, rngs=rngs),
    )
    self.mlp = nnx.Dict(
        gate_proj=nnx.Linear(d, f, use_bias=False, rngs=rngs),
        up_proj=nnx.Linear(d, f, use_bias=False, rngs=rngs),
        down_proj=nnx.Linear(f, d, use_bias=False, rngs=rngs),
    )
    self.norm = nnx.RMSNorm(d, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    x = self.norm(h)
    q, k, v = self.attn.q_proj(x), self.attn.k_proj(x), self.attn.v_proj(x)
    w = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / q.shape[-1] ** 0.5)
    h = h + self.attn.o_proj(w @ v)
    x = self.norm(h)
    return h + self.mlp.down_proj(
        jax.nn.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)
    )


class Toy(nnx.Module):

  def __init__(self, vocab=64, d=16, f=40, layers=2, *, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.layers = nnx.List([Block(d, f, rngs) for _ in range(layers)])
    self.lm_head = nnx.Linear(d, vocab, rngs=rngs)

  def hidden(self, ids: jax.Array, upto: int | None = None) -> jax.Array:
    h = self.embed(ids)
    for layer in list(self.layers)[:upto]:
      h = layer(h)
    return h

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.lm_head(self.hidden(ids))


class Twice(nnx.Module):
  """`shared` is called on two different inputs per pass; `side` on one."""

  def __init__(self, d: int = 6, *, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.shared = nnx.Linear(d, d, rngs=rngs)
    self.side = nnx.Linear(d, d, rngs=rngs)

  def inputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two inputs `shared` sees (the first is also `side`'s)."""
    return x, jnp.tanh(self.shared(x))

  def __call__(self, x: jax.Array) -> jax.Array:
    first, second = self.inputs(x)
    return self.shared(second) + self.side(first)


class Branchy(nnx.Module):
  """`long` is reached only by inputs longer than 4 steps."""

  def __init__(self, d: int = 6, *, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.proj = nnx.Linear(d, d, rngs=rngs)
    self.long = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.proj(x)
    if x.shape[1] > 4:
      h = h + self.long(jnp.tanh(h))
    return h


class Unhandled(nnx.Module):
  """One Linear, one Conv, one custom layer with a matrix Param."""

  class Custom(nnx.Module):

    def __init__(self, rngs: nnx.Rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (6, 6)))

    def __call__(self, x):
      return x @ self.w[...]

  def __init__(self, *, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.proj = nnx.Linear(6, 6, rngs=rngs)
    self.conv = nnx.Conv(6, 6, kernel_size=(3,), rngs=rngs)
    self.custom = Unhandled.Custom(rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.custom(self.conv(self.proj(x)))


class General(nnx.Module):
  """LinearGeneral and Einsum projections, attention-style shapes."""

  def __init__(self, *, seed: int = 0, **kwargs):
    rngs = nnx.Rngs(seed)
    self.q = nnx.LinearGeneral(8, (2, 4), rngs=rngs, **kwargs)
    self.o = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs, **kwargs)
    self.split = nnx.Einsum(
        'bsd,dnh->bsnh', (8, 2, 3), (2, 3), rngs=rngs, **kwargs
    )
    self.merge = nnx.Einsum('bsnh,nhd->bsd', (2, 3, 8), rngs=rngs, **kwargs)

  def inputs(self, x: jax.Array) -> dict[str, jax.Array]:
    """Each layer's input on `x` float[b, s, 8]."""
    q = jnp.tanh(self.q(x))
    o = self.o(q)
    return dict(q=x, o=q, split=o, merge=jnp.tanh(self.split(o)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.merge(self.inputs(x)['merge'])


class Scanned(nnx.Module):
  """`Toy` with its blocks stacked (`nnx.vmap`) and applied by `nnx.scan`.

  Under `remat=True` each scanned block is also wrapped in `nnx.remat`.
  """

  def __init__(self, vocab=64, d=16, f=40, layers=2, *, seed=0, remat=False):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(vocab, d, rngs=rngs)

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(d, f, rngs)

    self.layers = make(rngs)
    self.lm_head = nnx.Linear(d, vocab, rngs=rngs)
    self.remat = remat
    self.sizes = (vocab, d, f, layers)

  def __call__(self, ids: jax.Array) -> jax.Array:
    def body(h, block):
      return block(h)

    if self.remat:
      body = nnx.remat(body)
    h = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
        self.embed(ids), self.layers
    )
    return self.lm_head(h)

  def unrolled(self) -> Toy:
    """A `Toy` with the same weights, block by block."""
    vocab, d, f, layers = self.sizes
    toy = Toy(vocab, d, f, layers)
    nnx.update(toy.embed, nnx.state(self.embed))
    nnx.update(toy.lm_head, nnx.state(self.lm_head))
    stacked = nnx.state(self.layers)
    for i in range(layers):
      nnx.update(toy.layers[i], jax.tree.map(lambda a: a[i], stacked))
    return toy


class Ensemble(nnx.Module):
  """Three stacked Linear members applied to one input with `nnx.vmap`."""

  def __init__(self, *, seed: int = 0):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(6, 4, rngs=rngs)

    self.members = make(nnx.Rngs(seed))

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(self.members, x)


class Recurrent(nnx.Module):
  """One Linear applied at every step of an `nnx.scan` (the module carried
  when `carry=True`, else broadcast)."""

  def __init__(self, *, carry: bool = True, seed: int = 0):
    self.cell = nnx.Linear(6, 6, rngs=nnx.Rngs(seed))
    self.carry = carry

  def __call__(self, xs: jax.Array) -> jax.Array:  # xs: [steps, b, 6]
    if self.carry:

      def step(carry, x):
        cell, h = carry
        h = jnp.tanh(cell(h) + x)
        return (cell, h), h

      (_, h), _ = nnx.scan(
          step, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0)
      )((self.cell, jnp.zeros_like(xs[0])), xs)
      return h

    def step(h, x, cell):
      h = jnp.tanh(cell(h) + x)
      return h, h

    h, _ = nnx.scan(
        step, in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0)
    )(jnp.zeros_like(xs[0]), xs, self.cell)
    return h
