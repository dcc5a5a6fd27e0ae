"""The workload in eqx_rng.

`eqx_rng.nn` layers (Dropout, GaussianNoise, BatchNorm on `eqx.nn.State`),
`eqx_rng.vmap` over examples (`axis_name="batch"`, one key in, `derive(key, b)` per
example), `eqx_rng.ensemble` to build chains, `TrainState` + `make_train_step` for the
step (also with `steps_per_call`), and `eqx_rng.vmap(step)` over chains (outer) around
the batch vmap (inner).
"""

import equinox as eqx
import jax
import jax.random as jr
import optax

import eqx_rng

from ._runner import Runner
from ._workload import Data, Size, seed_key

NAME = "eqx_rng"


class RngMLP(eqx.Module):
    """The workload's model on one example, with eqx_rng's layers."""

    lin1: eqx.nn.Linear
    bn1: eqx_rng.nn.BatchNorm
    lin2: eqx.nn.Linear
    bn2: eqx_rng.nn.BatchNorm
    lin3: eqx.nn.Linear
    dropout: eqx_rng.nn.Dropout
    noise: eqx_rng.nn.GaussianNoise

    def __init__(self, size: Size, *, key):
        k1, k2, k3 = jr.split(key, 3)
        h = size.hidden
        self.lin1 = eqx.nn.Linear(size.in_size, h, key=k1)
        self.bn1 = eqx_rng.nn.BatchNorm(h, momentum=size.momentum, eps=size.eps)
        self.lin2 = eqx.nn.Linear(h, h, key=k2)
        self.bn2 = eqx_rng.nn.BatchNorm(h, momentum=size.momentum, eps=size.eps)
        self.lin3 = eqx.nn.Linear(h, size.out_size, key=k3)
        self.dropout = eqx_rng.nn.Dropout(size.p)
        self.noise = eqx_rng.nn.GaussianNoise(size.std)

    def __call__(self, x, state, *, key):
        drop1, noise1, drop2, noise2 = jr.split(key, 4)
        h, state = self.bn1(self.lin1(x), state)
        h = self.noise(self.dropout(jax.nn.relu(h), key=drop1), key=noise1)
        h, state = self.bn2(self.lin2(h), state)
        h = self.noise(self.dropout(jax.nn.relu(h), key=drop2), key=noise2)
        return self.lin3(h), state


def make(size: Size):
    """`(make_train_state, loss_fn, optimizer)` for this size."""
    optimizer = optax.adam(size.lr)

    def make_train_state(*, key):
        init_key, train_key = jr.split(key)
        model, state = eqx.nn.make_with_state(RngMLP)(size, key=init_key)
        return eqx_rng.TrainState.create(model, optimizer, key=train_key, state=state)

    def loss_fn(model, state, batch, *, key):
        x, y = batch
        per_example = eqx_rng.vmap(
            lambda x, state, *, key: model(x, state, key=key), axis_name="batch"
        )
        logits, state = per_example(x, state, key=key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (state, {"loss": loss})

    return make_train_state, loss_fn, optimizer


def runners(size: Size, data: Data, variants=("step", "multi", "loop")) -> list[Runner]:
    """`make_train_step` (its own fast dispatch, no `eqx.filter_jit` around it), with
    `steps_per_call`, and, with chains, `eqx.filter_jit(eqx_rng.vmap(step))` over an
    `ensemble` of `TrainState`s, or a Python loop calling `step` per chain."""
    make_train_state, loss_fn, optimizer = make(size)
    spc = size.steps_per_call
    step = eqx_rng.make_train_step(loss_fn, optimizer)
    multi = eqx_rng.make_train_step(loss_fn, optimizer, steps_per_call=spc)
    seed = seed_key()

    def single_call(c, t):
        ts, metrics = step(c, data.batch(t))
        return ts, metrics["loss"]

    def multi_call(c, t):
        ts, metrics = multi(c, (data.xs, data.ys))
        return ts, metrics["loss"]

    out = []
    if not size.vmapped:
        init = lambda: make_train_state(key=eqx_rng.derive(seed, 0))
        if "step" in variants:
            out.append(
                Runner(
                    NAME,
                    "make_train_step",
                    1,
                    init,
                    single_call,
                    lambda c, t: (step, (c, data.batch(t))),
                )
            )
        if "multi" in variants:
            out.append(
                Runner(
                    NAME,
                    f"steps_per_call={spc}",
                    spc,
                    init,
                    multi_call,
                    lambda c, t: (multi, (c, (data.xs, data.ys))),
                )
            )
        return out

    chains = size.chains
    in_axes = (eqx.if_array(0), None)
    vstep = eqx.filter_jit(eqx_rng.vmap(step, in_axes=in_axes))
    vmulti = eqx.filter_jit(eqx_rng.vmap(multi, in_axes=in_axes))
    vinit = lambda: eqx_rng.ensemble(make_train_state, seed, chains)

    def vcall(c, t):
        ts, metrics = vstep(c, data.batch(t))
        return ts, metrics["loss"]

    def vmulti_call(c, t):
        ts, metrics = vmulti(c, (data.xs, data.ys))
        return ts, metrics["loss"]

    def loop_call(states, t):
        batch = data.batch(t)
        results = [step(ts, batch) for ts in states]
        return [r[0] for r in results], [r[1]["loss"] for r in results]

    if "step" in variants:
        out.append(
            Runner(
                NAME,
                "vmap chains",
                1,
                vinit,
                vcall,
                lambda c, t: (vstep, (c, data.batch(t))),
            )
        )
    if "multi" in variants:
        out.append(
            Runner(
                NAME,
                f"vmap chains, steps_per_call={spc}",
                spc,
                vinit,
                vmulti_call,
                lambda c, t: (vmulti, (c, (data.xs, data.ys))),
            )
        )
    if "loop" in variants:
        out.append(
            Runner(
                NAME,
                "Python loop over chains",
                1,
                lambda: [
                    make_train_state(key=eqx_rng.derive(seed, c)) for c in range(chains)
                ],
                loop_call,
            )
        )
    return out
