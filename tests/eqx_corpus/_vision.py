"""Convolutional models: the MNIST CNN and the DCGAN pair of Equinox's examples."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from ._base import Case, data_key, register

# ----------------------------------------------------------------------------------
# A CNN as in the MNIST example: a *list* of layers mixing Modules and plain
# functions (`jax.nn.relu`, `jnp.ravel`), log-softmax outputs, integer labels.

CLASSES = 4


class CNN(eqx.Module):
    layers: list

    def __init__(self, *, key):
        conv_key, hidden_key, out_key = jr.split(key, 3)
        self.layers = [
            eqx.nn.Conv2d(1, 3, kernel_size=3, key=conv_key),  # (3, 6, 6)
            eqx.nn.MaxPool2d(kernel_size=2),  # stride 1: (3, 5, 5)
            jax.nn.relu,
            jnp.ravel,
            eqx.nn.Linear(75, 16, key=hidden_key),
            jax.nn.sigmoid,
            eqx.nn.Dropout(0.25),
            eqx.nn.Linear(16, CLASSES, key=out_key),
            jax.nn.log_softmax,
        ]

    def __call__(self, x, *, key=None):
        for layer in self.layers:
            if isinstance(layer, eqx.nn.Dropout):
                x = layer(x, key=key)
            else:
                x = layer(x)
        return x

    def predict(self, x):
        """Class predictions for a batch, dropout off."""
        model = eqx.nn.inference_mode(self)
        return jnp.argmax(jax.vmap(model)(x), axis=1)


def _cnn_forward(model, x, key):
    keys = jr.split(key, x.shape[0])
    return jax.vmap(lambda xi, ki: model(xi, key=ki))(x, keys)


def _cross_entropy(y, log_probs):
    picked = jnp.take_along_axis(log_probs, jnp.expand_dims(y, 1), axis=1)
    return -jnp.mean(picked)


def _cnn_loss(model, state, batch, *, key):
    x, y = batch
    log_probs = _cnn_forward(model, x, key)
    accuracy = jnp.mean(jnp.argmax(log_probs, axis=1) == y)
    return _cross_entropy(y, log_probs), (state, {"accuracy": accuracy})


def _cnn_batch(t, n):
    x_key, y_key = jr.split(data_key("cnn", t))
    x = jr.normal(x_key, (n, 1, 8, 8))
    return x, jr.randint(y_key, (n,), 0, CLASSES)


register(
    Case(
        name="cnn",
        pattern="MNIST example: list of layers and functions, dropout, int labels",
        make=CNN,
        forward=_cnn_forward,
        loss_fn=_cnn_loss,
        batch=_cnn_batch,
        method="predict",
    )
)

# ----------------------------------------------------------------------------------
# A DCGAN pair as in the deep convolutional GAN example (fewer layers, to keep the
# compile short): a transposed convolution and BatchNorm in the generator, PReLU
# and BatchNorm in the discriminator, each with its own `eqx.nn.State` built with
# `eqx.nn.State(model)`. `eqx.nn.PReLU`'s slope starts weakly typed and the first
# updates make it (and Adam's moments) strongly typed, so a training loop traces its
# step three times (steps 0, 1 and 2): the corpus covers those retraces too.

LATENT = 4


class Generator(eqx.Module):
    layers: list[eqx.nn.ConvTranspose2d | eqx.nn.BatchNorm | Callable]

    def __init__(self, *, key):
        self.layers = [
            eqx.nn.ConvTranspose2d(
                LATENT, 1, kernel_size=4, stride=1, use_bias=False, key=key
            ),  # (1, 4, 4)
            eqx.nn.BatchNorm(1, axis_name="batch", mode="batch"),
            jax.nn.tanh,
        ]

    def __call__(self, x, state):
        for layer in self.layers:
            if isinstance(layer, eqx.nn.BatchNorm):
                x, state = layer(x, state)
            else:
                x = layer(x)
        return x, state


class Discriminator(eqx.Module):
    layers: list[eqx.nn.Conv2d | eqx.nn.PReLU | eqx.nn.BatchNorm | Callable]

    def __init__(self, *, key):
        first_key, second_key = jr.split(key)
        self.layers = [
            eqx.nn.Conv2d(1, 2, 2, stride=2, use_bias=False, key=first_key),
            eqx.nn.BatchNorm(2, axis_name="batch", mode="batch"),
            eqx.nn.PReLU(0.2),
            eqx.nn.Conv2d(2, 1, 2, use_bias=False, key=second_key),  # (1, 1, 1)
        ]

    def __call__(self, x, state):
        for layer in self.layers:
            if isinstance(layer, eqx.nn.BatchNorm):
                x, state = layer(x, state=state)
            else:
                x = layer(x)
        return x, state


class GAN(eqx.Module):
    generator: Generator
    discriminator: Discriminator

    def __init__(self, *, key):
        g_key, d_key = jr.split(key)
        self.generator = Generator(key=g_key)
        self.discriminator = Discriminator(key=d_key)


def make_gan(*, key) -> tuple[GAN, tuple[eqx.nn.State, eqx.nn.State]]:
    gan = GAN(key=key)
    states = (eqx.nn.State(gan.generator), eqx.nn.State(gan.discriminator))
    return gan, states


def _batched(model: Any) -> Callable:
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def gan_scores(gan, g_state, d_state, real, key):
    """The discriminator's logits on generated and real images; the two States
    are separate arguments, as in the DCGAN example's step functions."""
    noise = jr.normal(key, (real.shape[0], LATENT, 1, 1))
    fake, g_state = _batched(gan.generator)(noise, g_state)
    fake_logits, d_state = _batched(gan.discriminator)(fake, d_state)
    real_logits, d_state = _batched(gan.discriminator)(real, d_state)
    return (fake_logits, real_logits), g_state, d_state


def _gan_forward(gan, states, real, key):
    g_state, d_state = states
    logits, g_state, d_state = gan_scores(gan, g_state, d_state, real, key)
    return logits, (g_state, d_state)


def _gan_loss(gan, states, batch, *, key):
    real, real_labels = batch
    g_state, d_state = states
    scores, g_state, d_state = gan_scores(gan, g_state, d_state, real, key)
    fake_logits, real_logits = scores
    fake_labels = jnp.zeros_like(real_labels)
    loss = (
        optax.sigmoid_binary_cross_entropy(fake_logits.reshape(-1), fake_labels).mean()
        + optax.sigmoid_binary_cross_entropy(
            real_logits.reshape(-1), real_labels
        ).mean()
    ) / 2
    return loss, ((g_state, d_state), {})


def _gan_batch(t, n):
    real = jnp.tanh(jr.normal(data_key("gan", t), (n, 1, 4, 4)))
    return real, jnp.ones((n,))


register(
    Case(
        name="gan",
        pattern="DCGAN example: generator and discriminator, two States",
        make=make_gan,
        forward=_gan_forward,
        loss_fn=_gan_loss,
        batch=_gan_batch,
        stateful=True,
    )
)
