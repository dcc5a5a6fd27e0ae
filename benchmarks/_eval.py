"""Forward / evaluation dispatch: one jitted forward call, three ways of jitting it.

The training-mode forward of the workload's model (BatchNorm with this batch's
statistics, Dropout, GaussianNoise; one key in, `derive(key, b)` per example), for
one chain, the kind of call a user jits for evaluation, MC-dropout sampling or a
sampler step:

- **eqx_rng.jit**: `eqx_rng.jit(forward)(model, state, x, key)` (its cached
  flat-leaf dispatch);
- **eqx.filter_jit**: the same function under `eqx.filter_jit`;
- **raw JAX** (the reference): parameter dicts and `jax.jit`.

At the tiny size the call is almost all dispatch, so the ratios measure what the
wrapper costs per call; at C=1 (hidden 256, batch 128) the device work dominates.
All three compute the same logits (checked before timing).
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_rng

from . import _eqx_rng, _raw_jax
from ._runner import Runner, max_output_diff
from ._workload import Data, Size, chain_keys, seed_key

VARIANT = "forward"
EQX_RNG_JIT = "eqx_rng.jit"
FILTER_JIT = "eqx.filter_jit"


def _module_forward(model, state, x, key):
    return eqx_rng.vmap(
        lambda x, state, *, key: model(x, state, key=key), axis_name="batch"
    )(x, state, key=key)


def _module_runner(size: Size, x: jax.Array, keys: list, *, fast: bool) -> Runner:
    forward = (eqx_rng.jit if fast else eqx.filter_jit)(_module_forward)
    make_train_state, _, _ = _eqx_rng.make(size)

    def init():  # the training benchmarks' chain 0: model and BatchNorm state
        ts = make_train_state(key=chain_keys(1)[0])
        return ts.model, ts.state

    def call(carry, t):
        model, state = carry
        logits, _ = forward(model, state, x, keys[t % len(keys)])
        return carry, jnp.mean(logits)

    def lowerable(carry, t):
        model, state = carry
        return forward, (model, state, x, keys[t % len(keys)])

    name = EQX_RNG_JIT if fast else FILTER_JIT
    return Runner(name, VARIANT, 1, init, call, lowerable)


def _raw_runner(size: Size, x: jax.Array, keys: list) -> Runner:
    forward = jax.jit(
        lambda p, s, x, k: _raw_jax.forward(p, s, x, k, size)  # size: static
    )
    init_chain, _, _ = _raw_jax.make_step(size)

    def init():
        params, bn, *_ = init_chain(chain_keys(1)[0])
        return params, bn

    def call(carry, t):
        params, bn = carry
        logits, _ = forward(params, bn, x, keys[t % len(keys)])
        return carry, jnp.mean(logits)

    def lowerable(carry, t):
        params, bn = carry
        return forward, (params, bn, x, keys[t % len(keys)])

    return Runner(_raw_jax.NAME, VARIANT, 1, init, call, lowerable, reference=True)


def runners(size: Size, data: Data) -> list[Runner]:
    """Raw `jax.jit` (the reference), `eqx_rng.jit` and `eqx.filter_jit`. Call `t`
    uses step key `derive(seed, t)` from a pool made before timing."""
    x = data.x_list[0]
    keys = [eqx_rng.derive(seed_key(), t) for t in range(len(data.x_list))]
    jax.block_until_ready(keys)
    return [
        _raw_runner(size, x, keys),
        _module_runner(size, x, keys, fast=True),
        _module_runner(size, x, keys, fast=False),
    ]


def same_numbers(timed: list[Runner]) -> float:
    """Largest absolute difference between raw JAX's logits and the others', from
    the runners already timed (their compilations are reused)."""
    return max_output_diff(timed)
