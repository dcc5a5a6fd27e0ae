"""Modules whose leaves are not all arrays, and weights tied with `eqx.nn.Shared`."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._base import Case, data_key, register

# ----------------------------------------------------------------------------------
# A Module holding an activation function, a Python float, a string, a static
# tuple, an integer array (a permutation: an array, not trained) and a Lambda layer.


class Fields(eqx.Module):
    linear: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    out: eqx.nn.Lambda
    perm: jax.Array
    activation: Callable
    scale: float
    name: str
    sizes: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        scale: float = 0.5,
        name: str = "head",
        activation: Callable = jax.nn.softplus,
        *,
        key,
    ):
        linear_key, perm_key = jr.split(key)
        self.sizes = (5, 3)
        self.linear = eqx.nn.Linear(self.sizes[0], self.sizes[1], key=linear_key)
        self.dropout = eqx.nn.Dropout(0.2)
        self.out = eqx.nn.Lambda(jnp.tanh)
        self.perm = jr.permutation(perm_key, self.sizes[0])
        self.activation = activation
        self.scale = scale
        self.name = name

    def __call__(self, x, *, key):
        h = self.activation(self.linear(x[self.perm])) * self.scale
        h = self.dropout(h, key=key)
        if self.name == "head":
            h = self.out(h)
        return h

    def features(self, x):
        """The hidden features of a batch, dropout off."""
        return jax.vmap(lambda xi: self.activation(self.linear(xi[self.perm])))(x)


def _fields_forward(model, x, key):
    keys = jr.split(key, x.shape[0])
    return jax.vmap(lambda xi, ki: model(xi, key=ki))(x, keys)


def _fields_loss(model, state, batch, *, key):
    x, y = batch
    return jnp.mean((_fields_forward(model, x, key) - y) ** 2), (state, {})


def _fields_batch(t, n):
    x = jr.normal(data_key("fields", t), (n, 5))
    return x, jnp.tanh(x[:, :3])


register(
    Case(
        name="fields",
        pattern="non-array fields: function, float, str, static tuple, int array",
        make=Fields,
        forward=_fields_forward,
        loss_fn=_fields_loss,
        batch=_fields_batch,
        method="features",
    )
)

# ----------------------------------------------------------------------------------
# An embedding and an output projection sharing one weight through `eqx.nn.Shared`
# (Equinox's documented way to tie weights).

VOCAB, DIM = 12, 6


def _output_weight(pair):
    return pair[1].weight


def _embedding_weight(pair):
    return pair[0].weight


class Tied(eqx.Module):
    shared: eqx.nn.Shared

    def __init__(self, *, key):
        embed_key, out_key = jr.split(key)
        embedding = eqx.nn.Embedding(VOCAB, DIM, key=embed_key)
        linear = eqx.nn.Linear(DIM, VOCAB, use_bias=False, key=out_key)
        self.shared = eqx.nn.Shared(
            (embedding, linear), _output_weight, _embedding_weight
        )

    def __call__(self, tokens):
        embedding, linear = self.shared()
        h = jnp.mean(jax.vmap(embedding)(tokens), axis=0)
        return jax.nn.log_softmax(linear(h))

    def next_token(self, tokens):
        """The most likely next token of each sequence of a batch."""
        return jnp.argmax(jax.vmap(self)(tokens), axis=1)


def _tied_forward(model, tokens, key):
    del key  # deterministic model
    return jax.vmap(model)(tokens)


def _tied_loss(model, state, batch, *, key):
    tokens, target = batch
    log_probs = _tied_forward(model, tokens, key)
    picked = jnp.take_along_axis(log_probs, target[:, None], axis=1)
    return -jnp.mean(picked), (state, {})


def _tied_batch(t, n):
    tokens = jr.randint(data_key("tied", t), (n, 5), 0, VOCAB)
    return tokens, tokens[:, -1]


register(
    Case(
        name="tied",
        pattern="weights tied with eqx.nn.Shared (Embedding and output Linear)",
        make=Tied,
        forward=_tied_forward,
        loss_fn=_tied_loss,
        batch=_tied_batch,
        method="next_token",
    )
)
