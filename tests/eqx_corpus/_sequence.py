"""Sequence models: a GRU scanned over time and a transformer block with dropout."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import optax

from ._base import Case, data_key, register

# ----------------------------------------------------------------------------------
# The RNN of the train_rnn example: a GRU cell under `lax.scan`, an int field, a
# bare array field, a Linear without bias.


class RNN(eqx.Module):
    hidden_size: int
    cell: eqx.nn.GRUCell
    linear: eqx.nn.Linear
    bias: jax.Array

    def __init__(self, *, key):
        cell_key, linear_key = jr.split(key)
        self.hidden_size = 6
        self.cell = eqx.nn.GRUCell(2, self.hidden_size, key=cell_key)
        self.linear = eqx.nn.Linear(self.hidden_size, 1, use_bias=False, key=linear_key)
        self.bias = jnp.zeros(1)

    def __call__(self, inputs):
        hidden = jnp.zeros((self.hidden_size,))

        def f(carry, inp):
            return self.cell(inp, carry), None

        out, _ = lax.scan(f, hidden, inputs)
        return jax.nn.sigmoid(self.linear(out) + self.bias)

    def classify(self, x):
        """Class predictions for a batch of sequences."""
        return jax.vmap(self)(x) > 0.5


def _rnn_forward(model, x, key):
    del key  # deterministic model
    return jax.vmap(model)(x)


def _rnn_loss(model, state, batch, *, key):
    x, y = batch
    pred = _rnn_forward(model, x, key)
    loss = -jnp.mean(y * jnp.log(pred) + (1 - y) * jnp.log(1 - pred))
    return loss, (state, {})


def _rnn_batch(t, n):
    offset_key, label_key = jr.split(data_key("rnn", t))
    steps = jnp.linspace(0, 2 * jnp.pi, 6)
    offset = jr.uniform(offset_key, (n, 1), maxval=2 * jnp.pi)
    sign = jnp.where(jr.bernoulli(label_key, 0.5, (n, 1)), 1.0, -1.0)
    phase = steps[None, :] + offset
    x = jnp.stack([sign * jnp.sin(phase), jnp.cos(phase)], axis=-1)
    return x, (sign > 0).astype(jnp.float32)


register(
    Case(
        name="rnn",
        pattern="train_rnn example: GRUCell under lax.scan, int and array fields",
        make=RNN,
        forward=_rnn_forward,
        loss_fn=_rnn_loss,
        batch=_rnn_batch,
        method="classify",
    )
)

# ----------------------------------------------------------------------------------
# The attention block of the vision transformer example (LayerNorm, multi-head
# attention with its own dropout, an MLP with dropout), behind a patch embedding and
# in front of a classification head built with `eqx.nn.Sequential`.

TOKENS, FEATURES, CLASSES = 4, 6, 3


class AttentionBlock(eqx.Module):
    layer_norm1: eqx.nn.LayerNorm
    layer_norm2: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    dropout1: eqx.nn.Dropout
    dropout2: eqx.nn.Dropout

    def __init__(self, dim, hidden, heads, dropout_rate, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.layer_norm1 = eqx.nn.LayerNorm(dim)
        self.layer_norm2 = eqx.nn.LayerNorm(dim)
        self.attention = eqx.nn.MultiheadAttention(
            heads, dim, dropout_p=dropout_rate, key=k1
        )
        self.linear1 = eqx.nn.Linear(dim, hidden, key=k2)
        self.linear2 = eqx.nn.Linear(hidden, dim, key=k3)
        self.dropout1 = eqx.nn.Dropout(dropout_rate)
        self.dropout2 = eqx.nn.Dropout(dropout_rate)

    def __call__(self, x, enable_dropout, key):
        attention_key, key1, key2 = jr.split(key, 3)
        inference = not enable_dropout
        h = jax.vmap(self.layer_norm1)(x)
        x = x + self.attention(h, h, h, key=attention_key, inference=inference)
        h = jax.vmap(self.layer_norm2)(x)
        h = jax.nn.gelu(jax.vmap(self.linear1)(h))
        h = self.dropout1(h, inference=inference, key=key1)
        h = jax.vmap(self.linear2)(h)
        return x + self.dropout2(h, inference=inference, key=key2)


class Transformer(eqx.Module):
    embedding: eqx.nn.Linear
    positional: jax.Array
    block: AttentionBlock
    head: eqx.nn.Sequential

    def __init__(self, *, key):
        embed_key, pos_key, block_key, head_key = jr.split(key, 4)
        dim = 8
        self.embedding = eqx.nn.Linear(FEATURES, dim, key=embed_key)
        self.positional = jr.normal(pos_key, (TOKENS, dim))
        self.block = AttentionBlock(dim, 16, 2, 0.1, key=block_key)
        self.head = eqx.nn.Sequential(
            [eqx.nn.LayerNorm(dim), eqx.nn.Linear(dim, CLASSES, key=head_key)]
        )

    def __call__(self, x, enable_dropout, key):
        x = jax.vmap(self.embedding)(x) + self.positional
        x = self.block(x, enable_dropout, key)
        return self.head(x[0])

    def logits(self, x):
        """Logits for a batch, dropout off (no key needed)."""
        return jax.vmap(lambda xi: self(xi, False, jr.key(0)))(x)


def _transformer_forward(model, x, key):
    keys = jr.split(key, x.shape[0])
    return jax.vmap(model, in_axes=(0, None, 0))(x, True, keys)


def _transformer_loss(model, state, batch, *, key):
    x, y = batch
    logits = _transformer_forward(model, x, key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (state, {})


def _transformer_batch(t, n):
    x_key, y_key = jr.split(data_key("transformer", t))
    return jr.normal(x_key, (n, TOKENS, FEATURES)), jr.randint(y_key, (n,), 0, CLASSES)


register(
    Case(
        name="transformer",
        pattern="vision_transformer example: MultiheadAttention with dropout",
        make=Transformer,
        forward=_transformer_forward,
        loss_fn=_transformer_loss,
        batch=_transformer_batch,
        method="logits",
    )
)
