"""The reference: the workload written by hand in raw JAX.

Parameters are a dict pytree, BatchNorm is a pure function over the batch axis,
the step is one `jax.jit`, chains are one `jax.vmap`, `steps_per_call` is a
`lax.scan`. Nothing here is clever; it is what a careful JAX user would write.
"""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import optax

from ._runner import Runner
from ._workload import Data, Size, chain_keys, linear_bound

NAME = "raw JAX"


def _linear_init(key, fan_in, fan_out):
    w_key, b_key = jr.split(key)
    lim = linear_bound(fan_in)
    return {
        "weight": jr.uniform(w_key, (fan_out, fan_in), minval=-lim, maxval=lim),
        "bias": jr.uniform(b_key, (fan_out,), minval=-lim, maxval=lim),
    }


def init_params(size: Size, key):
    k1, k2, k3 = jr.split(key, 3)
    h = size.hidden
    bn = {"weight": jnp.ones(h), "bias": jnp.zeros(h)}
    return {
        "lin1": _linear_init(k1, size.in_size, h),
        "bn1": bn,
        "lin2": _linear_init(k2, h, h),
        "bn2": dict(bn),
        "lin3": _linear_init(k3, h, size.out_size),
    }


def init_bn_state(size: Size):
    h = size.hidden
    one = {"mean": jnp.zeros(h), "var": jnp.ones(h)}
    return {"bn1": one, "bn2": dict(one), "count": jnp.zeros((), jnp.int32)}


def _linear(p, x):
    return x @ p["weight"].T + p["bias"]


def _batch_norm(p, x, size: Size):
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mean), axis=0)
    out = (x - mean) / jnp.sqrt(var + size.eps) * p["weight"] + p["bias"]
    return out, (mean, var)


def _update_running(s, stats, size: Size):
    mean, var = stats
    m = size.momentum
    return {"mean": m * s["mean"] + (1 - m) * mean, "var": m * s["var"] + (1 - m) * var}


def _dropout(keys, x, p):
    q = 1 - p
    mask = jax.vmap(lambda k: jr.bernoulli(k, q, x.shape[1:]))(keys)
    return jnp.where(mask, x / q, 0)


def _noise(keys, x, std):
    return x + std * jax.vmap(lambda k: jr.normal(k, x.shape[1:], x.dtype))(keys)


def forward(params, bn_state, x, step_key, size: Size):
    """Logits for a batch `x` of shape `(batch, in)` and the new BatchNorm state."""
    ids = jnp.arange(x.shape[0])
    example_keys = jax.vmap(jr.fold_in, in_axes=(None, 0))(step_key, ids)
    return forward_with_keys(params, bn_state, x, example_keys, size)


def forward_with_keys(params, bn_state, x, example_keys, size: Size):
    """`forward` with the per-example keys (shape `(batch,)`) given, pre-split."""
    role_keys = jax.vmap(lambda k: jr.split(k, 4))(example_keys)  # (batch, 4)
    h = _linear(params["lin1"], x)
    h, stats1 = _batch_norm(params["bn1"], h, size)
    h = jax.nn.relu(h)
    h = _dropout(role_keys[:, 0], h, size.p)
    h = _noise(role_keys[:, 1], h, size.std)
    h = _linear(params["lin2"], h)
    h, stats2 = _batch_norm(params["bn2"], h, size)
    h = jax.nn.relu(h)
    h = _dropout(role_keys[:, 2], h, size.p)
    h = _noise(role_keys[:, 3], h, size.std)
    logits = _linear(params["lin3"], h)
    new_state = {
        "bn1": _update_running(bn_state["bn1"], stats1, size),
        "bn2": _update_running(bn_state["bn2"], stats2, size),
        "count": bn_state["count"] + 1,
    }
    return logits, new_state


def make_step(size: Size):
    optimizer = optax.adam(size.lr)

    def loss_fn(params, bn_state, x, y, step_key):
        logits, bn_state = forward(params, bn_state, x, step_key, size)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, bn_state

    def step(carry, batch):
        params, bn_state, opt_state, key, t = carry
        x, y = batch
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, bn_state), grads = grad_fn(params, bn_state, x, y, jr.fold_in(key, t))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, bn_state, opt_state, key, t + 1), loss

    def init(chain_key):
        init_key, train_key = jr.split(chain_key)
        params = init_params(size, init_key)
        opt_state = optimizer.init(params)
        return (params, init_bn_state(size), opt_state, train_key, jnp.array(0))

    def multi_step(carry, xs, ys):
        return lax.scan(step, carry, (xs, ys))  # losses: (steps,)

    return init, step, multi_step


def runners(size: Size, data: Data, variants=("step", "multi", "loop")) -> list[Runner]:
    """Single step, `scan` over `steps_per_call` steps and, with chains, a Python loop.

    The single step (vmapped over chains when there are several) is the reference.
    """
    init, step, multi_step = make_step(size)
    keys = chain_keys(size.chains)
    spc = size.steps_per_call
    one_step = lambda carry, x, y: step(carry, (x, y))
    out = []
    if not size.vmapped:
        jit_step = jax.jit(one_step)
        jit_multi = jax.jit(multi_step)
        if "step" in variants:
            out.append(
                Runner(
                    NAME,
                    "step",
                    1,
                    lambda: init(keys[0]),
                    lambda c, t: jit_step(c, *data.batch(t)),
                    lambda c, t: (jit_step, (c, *data.batch(t))),
                    reference=True,
                )
            )
        if "multi" in variants:
            out.append(
                Runner(
                    NAME,
                    f"scan x{spc}",
                    spc,
                    lambda: init(keys[0]),
                    lambda c, t: jit_multi(c, data.xs, data.ys),
                    lambda c, t: (jit_multi, (c, data.xs, data.ys)),
                )
            )
        return out

    vinit = lambda: jax.vmap(init)(keys)
    if "step" in variants:
        vstep = jax.jit(jax.vmap(one_step, in_axes=(0, None, None)))
        out.append(
            Runner(
                NAME,
                "vmap chains",
                1,
                vinit,
                lambda c, t: vstep(c, *data.batch(t)),
                lambda c, t: (vstep, (c, *data.batch(t))),
                reference=True,
            )
        )
    if "multi" in variants:
        vmulti = jax.jit(jax.vmap(multi_step, in_axes=(0, None, None)))
        out.append(
            Runner(
                NAME,
                f"vmap chains, scan x{spc}",
                spc,
                vinit,
                lambda c, t: vmulti(c, data.xs, data.ys),
                lambda c, t: (vmulti, (c, data.xs, data.ys)),
            )
        )
    if "loop" in variants:
        loop_step = jax.jit(one_step)

        def loop_call(carries, t):
            x, y = data.batch(t)
            results = [loop_step(c, x, y) for c in carries]
            return [r[0] for r in results], [r[1] for r in results]

        out.append(
            Runner(
                NAME,
                "Python loop over chains",
                1,
                lambda: [init(keys[c]) for c in range(size.chains)],
                loop_call,
            )
        )
    return out
