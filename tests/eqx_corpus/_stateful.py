"""The stateful example: BatchNorm and SpectralNorm threaded through one State."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._base import Case, data_key, register


class Stateful(eqx.Module):
    """Stateful and stateless layers mixed, as in Equinox's stateful example:
    BatchNorm (running averages, `mode="ema"`) and a spectrally normalised Linear
    (power-iteration vectors) keep their state in one `eqx.nn.State`."""

    norm1: eqx.nn.BatchNorm
    spectral_linear: eqx.nn.SpectralNorm[eqx.nn.Linear]
    norm2: eqx.nn.BatchNorm
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.norm1 = eqx.nn.BatchNorm(3, axis_name="batch", mode="ema")
        self.spectral_linear = eqx.nn.SpectralNorm(
            layer=eqx.nn.Linear(3, 8, key=k1), weight_name="weight", key=k2
        )
        self.norm2 = eqx.nn.BatchNorm(8, axis_name="batch", mode="ema")
        self.linear1 = eqx.nn.Linear(8, 8, key=k3)
        self.linear2 = eqx.nn.Linear(8, 3, key=k4)

    def __call__(self, x, state):
        x, state = self.norm1(x, state)
        x, state = self.spectral_linear(x, state)
        x = jax.nn.relu(x)
        x, state = self.norm2(x, state)
        x = jax.nn.relu(self.linear1(x))
        return self.linear2(x), state


def _forward(model, state, xs, key):
    del key  # deterministic model; the key is part of the user's signature
    batch_model = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )
    return batch_model(xs, state)


def _loss(model, state, batch, *, key):
    xs, ys = batch
    pred, state = _forward(model, state, xs, key)
    return jnp.mean((pred - ys) ** 2), (state, {})


def _batch(t, n):
    xs = jr.normal(data_key("stateful", t), (n, 3))
    return xs, jnp.sin(xs) + 1


register(
    Case(
        name="stateful",
        pattern="stateful example: BatchNorm (ema) and SpectralNorm, make_with_state",
        make=eqx.nn.make_with_state(Stateful),
        forward=_forward,
        loss_fn=_loss,
        batch=_batch,
        stateful=True,
    )
)
