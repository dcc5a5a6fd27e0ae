"""The workload in plain, idiomatic Equinox (no eqx_rng).

`eqx.nn.Dropout`, `eqx.nn.BatchNorm(mode="batch")` on `eqx.nn.State`, Gaussian
noise written inline, `eqx.filter_vmap(..., axis_name="batch")` over examples with
keys split by hand, `eqx.filter_jit` around the step; chains by a second
`eqx.filter_vmap`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from ._runner import Runner
from ._workload import Data, Size, chain_keys

NAME = "plain Equinox"


class PlainMLP(eqx.Module):
    lin1: eqx.nn.Linear
    bn1: eqx.nn.BatchNorm
    lin2: eqx.nn.Linear
    bn2: eqx.nn.BatchNorm
    lin3: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    std: float = eqx.field(static=True)

    def __init__(self, size: Size, *, key):
        k1, k2, k3 = jr.split(key, 3)
        h = size.hidden
        self.lin1 = eqx.nn.Linear(size.in_size, h, key=k1)
        self.bn1 = eqx.nn.BatchNorm(
            h, "batch", eps=size.eps, momentum=size.momentum, mode="batch"
        )
        self.lin2 = eqx.nn.Linear(h, h, key=k2)
        self.bn2 = eqx.nn.BatchNorm(
            h, "batch", eps=size.eps, momentum=size.momentum, mode="batch"
        )
        self.lin3 = eqx.nn.Linear(h, size.out_size, key=k3)
        self.dropout = eqx.nn.Dropout(size.p)
        self.std = size.std

    def __call__(self, x, state, *, key):
        drop1, noise1, drop2, noise2 = jr.split(key, 4)
        h, state = self.bn1(self.lin1(x), state)
        h = self.dropout(jax.nn.relu(h), key=drop1)
        h = h + self.std * jr.normal(noise1, h.shape, h.dtype)
        h, state = self.bn2(self.lin2(h), state)
        h = self.dropout(jax.nn.relu(h), key=drop2)
        h = h + self.std * jr.normal(noise2, h.shape, h.dtype)
        return self.lin3(h), state


def make_step(size: Size):
    optimizer = optax.adam(size.lr)

    def loss_fn(model, state, x, y, keys):
        batched = eqx.filter_vmap(
            lambda x, s, k: model(x, s, key=k),
            in_axes=(0, None, 0),
            out_axes=(0, None),
            axis_name="batch",
        )
        logits, state = batched(x, state, keys)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, state

    def step(carry, x, y):
        model, state, opt_state, key, t = carry
        keys = jr.split(jr.fold_in(key, t), x.shape[0])
        grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, state), grads = grad_fn(model, state, x, y, keys)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        return (model, state, opt_state, key, t + 1), loss

    def init(chain_key):
        init_key, train_key = jr.split(chain_key)
        model, state = eqx.nn.make_with_state(PlainMLP)(size, key=init_key)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return model, state, opt_state, train_key, jnp.array(0)

    return init, step


def runners(size: Size, data: Data, variants=("step",)) -> list[Runner]:
    """The single-call step (one chain) or the `filter_vmap`ped chains."""
    if "step" not in variants:
        return []
    init, step = make_step(size)
    keys = chain_keys(size.chains)
    if not size.vmapped:
        jit_step = eqx.filter_jit(step)
        return [
            Runner(
                NAME,
                "step",
                1,
                lambda: init(keys[0]),
                lambda c, t: jit_step(c, *data.batch(t)),
                lambda c, t: (jit_step, (c, *data.batch(t))),
            )
        ]

    vstep = eqx.filter_jit(eqx.filter_vmap(step, in_axes=(eqx.if_array(0), None, None)))
    return [
        Runner(
            NAME,
            "vmap chains",
            1,
            lambda: eqx.filter_vmap(init)(keys),
            lambda c, t: vstep(c, *data.batch(t)),
            lambda c, t: (vstep, (c, *data.batch(t))),
        )
    ]
