"""Chains x batch forward pass: `eqx_rng.vmap` nested against hand-written `jax.vmap`.

The training-mode forward of the workload's model (BatchNorm with this batch's
statistics, Dropout, GaussianNoise) for C chains x B examples, one jitted call:

- **eqx_rng**: models and states from `eqx_rng.ensemble`, an outer `eqx_rng.vmap`
  over chains around an inner `eqx_rng.vmap(axis_name="batch")` over the examples;
  one key goes in and example `(c, b)` draws from `derive(key, c, b)` inside the
  program.
- **raw JAX**: parameter dicts, `jax.jit(jax.vmap(...))` over chains around the
  batch-level forward, keys pre-split outside the timed call
  (`grid_keys(key, (C, B))`, the same keys, passed in as a `(C, B)` key array): the
  reference.
- **raw JAX, keys derived in jit**: the same, but one step key goes in and the
  program folds in `c` and `b` itself, as eqx_rng does.

All compute the same numbers (checked before timing). eqx_rng against the second
raw runner answers "what does `eqx_rng.vmap` cost inside jit?" (its checks run at
trace time); against the first, what deriving keys on device costs over splitting
them ahead of time.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_rng

from . import _eqx_rng, _raw_jax
from ._runner import Runner, max_output_diff
from ._workload import Data, Size, chain_keys, seed_key

VARIANT = "one key in, nested eqx_rng.vmap"
PRE_SPLIT = "jax.vmap, keys pre-split"
KEYS_IN_JIT = "jax.vmap, keys derived in jit"


def _eqx_rng_runner(size: Size, x: jax.Array, keys: list[jax.Array]) -> Runner:
    def per_chain(model, state, x, *, key):
        def per_example(x, state, *, key):
            return model(x, state, key=key)

        return eqx_rng.vmap(per_example, axis_name="batch")(x, state, key=key)

    forward = eqx.filter_jit(eqx_rng.vmap(per_chain, in_axes=(0, 0, None)))
    make_train_state, _, _ = _eqx_rng.make(size)

    def init():  # the training benchmarks' chains, models and states only
        ts = eqx_rng.ensemble(make_train_state, seed_key(), size.chains)
        return ts.model, ts.state

    def call(carry, t):
        models, states = carry
        logits, _ = forward(models, states, x, key=keys[t % len(keys)])
        return carry, jnp.mean(logits, axis=(1, 2))

    def lowerable(carry, t):
        models, states = carry
        return (
            lambda m, s, x, k: forward(m, s, x, key=k),
            (models, states, x, keys[t % len(keys)]),
        )

    return Runner(_eqx_rng.NAME, VARIANT, 1, init, call, lowerable)


def _grid(step_key: jax.Array, chains: int, batch: int) -> jax.Array:
    """`fold_in(fold_in(step_key, c), b)` for every (c, b), inside the program."""
    per_chain = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        step_key, jnp.arange(chains)
    )
    return jax.vmap(
        lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, jnp.arange(batch))
    )(per_chain)


def _raw_runner(
    size: Size, x: jax.Array, keys: list[jax.Array], *, derive_in_jit: bool
) -> Runner:
    """Raw JAX; `keys` are `(C, B)` grids (pre-split) or, with `derive_in_jit`,
    step keys that the program turns into the grid itself."""

    def per_chain(params, bn_state, x, example_keys):
        return _raw_jax.forward_with_keys(params, bn_state, x, example_keys, size)

    chains = jax.vmap(per_chain, in_axes=(0, 0, None, 0))
    if derive_in_jit:
        forward = jax.jit(
            lambda p, s, x, k: chains(p, s, x, _grid(k, size.chains, size.batch))
        )
    else:
        forward = jax.jit(chains)

    init_chain, _, _ = _raw_jax.make_step(size)

    def init():  # the training benchmarks' chains: parameters and BatchNorm state
        params, bn, *_ = jax.vmap(init_chain)(chain_keys(size.chains))
        return params, bn

    def call(carry, t):
        params, bn = carry
        logits, _ = forward(params, bn, x, keys[t % len(keys)])
        return carry, jnp.mean(logits, axis=(1, 2))

    def lowerable(carry, t):
        params, bn = carry
        return forward, (params, bn, x, keys[t % len(keys)])

    variant = KEYS_IN_JIT if derive_in_jit else PRE_SPLIT
    return Runner(
        _raw_jax.NAME, variant, 1, init, call, lowerable, reference=not derive_in_jit
    )


def runners(size: Size, data: Data) -> list[Runner]:
    """The forward runners at `size`: raw JAX with pre-split keys (the reference),
    raw JAX deriving the same keys inside the program, and eqx_rng.

    Call `t` uses step key `derive(seed, t)` (eqx_rng: that one key; raw JAX: its
    `grid_keys(step_key, (C, B))`), both made before timing, a pool as long as the
    data pool reused cyclically, so neither pays for eager key arithmetic per call.
    """
    x = data.x_list[0]
    step_keys = [eqx_rng.derive(seed_key(), t) for t in range(len(data.x_list))]
    grids = [eqx_rng.grid_keys(k, (size.chains, size.batch)) for k in step_keys]
    jax.block_until_ready((step_keys, grids))
    return [
        _raw_runner(size, x, grids, derive_in_jit=False),
        _raw_runner(size, x, step_keys, derive_in_jit=True),
        _eqx_rng_runner(size, x, step_keys),
    ]


def same_numbers(timed: list[Runner]) -> float:
    """Largest absolute difference between the raw-JAX reference's logits and
    those of the other runners (run after timing them: the compilations are
    reused, and the first-call times are not)."""
    return max_output_diff(timed)
