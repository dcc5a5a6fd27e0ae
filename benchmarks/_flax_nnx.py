"""The workload in Flax NNX (optional: used only when `flax` imports).

Idiomatic NNX: `nnx.Linear`, `nnx.BatchNorm`, `nnx.Dropout`, noise drawn from the
module's `nnx.Rngs` stream, `nnx.Optimizer`, and the step under `nnx.jit`. The
layers act on the whole batch, and randomness comes from NNX's stateful `Rngs`
counters (a `(batch, hidden)` draw per layer per step, so each example still gets its
own numbers and each step fresh ones) rather than from per-example derived keys.
Single chain only (the sizes with `chains == 1`).
"""

import importlib
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from ._runner import Runner
from ._workload import SEED, Data, Size, linear_bound

nnx: Any
try:
    nnx = importlib.import_module("flax.nnx")
except ImportError:  # pragma: no cover - depends on the environment
    nnx = None

NAME = "Flax NNX"


def available() -> bool:
    return nnx is not None


def runners(size: Size, data: Data, variants=("step",)) -> list[Runner]:
    if nnx is None or size.vmapped or "step" not in variants:
        return []

    def linear(fan_in: int, fan_out: int, rngs):
        # `eqx.nn.Linear`'s initialisation (uniform in +-1/sqrt(fan_in)), so that the
        # first losses are comparable with the other implementations'.
        lim = linear_bound(fan_in)

        def init(key, shape, dtype=jnp.float32):
            return jr.uniform(key, shape, dtype, -lim, lim)

        return nnx.Linear(fan_in, fan_out, kernel_init=init, bias_init=init, rngs=rngs)

    class NNXMLP(nnx.Module):
        def __init__(self, size: Size, rngs):
            h = size.hidden
            self.lin1 = linear(size.in_size, h, rngs)
            self.bn1 = nnx.BatchNorm(
                h, momentum=size.momentum, epsilon=size.eps, rngs=rngs
            )
            self.lin2 = linear(h, h, rngs)
            self.bn2 = nnx.BatchNorm(
                h, momentum=size.momentum, epsilon=size.eps, rngs=rngs
            )
            self.lin3 = linear(h, size.out_size, rngs)
            self.drop1 = nnx.Dropout(size.p, rngs=rngs)
            self.drop2 = nnx.Dropout(size.p, rngs=rngs)
            self.noise_rngs = rngs.fork()
            self.std = size.std

        def __call__(self, x):
            h = self.drop1(jax.nn.relu(self.bn1(self.lin1(x))))
            h = h + self.std * self.noise_rngs.normal(h.shape)
            h = self.drop2(jax.nn.relu(self.bn2(self.lin2(h))))
            h = h + self.std * self.noise_rngs.normal(h.shape)
            return self.lin3(h)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def init():
        model = NNXMLP(size, nnx.Rngs(SEED))
        optimizer = nnx.Optimizer(model, optax.adam(size.lr), wrt=nnx.Param)
        return model, optimizer

    def call(carry, t):
        model, optimizer = carry
        return carry, train_step(model, optimizer, *data.batch(t))

    return [Runner(NAME, "step (nnx.jit)", 1, init, call)]
