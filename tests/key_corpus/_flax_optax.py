"""Patterns of Flax code ported to Equinox (an `rngs` dict, fold_in by step or by
axis_index) and of optax noise (`optax.add_noise` state inside a vmapped step)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax import lax

import eqx_rng

from ._base import B, Call, ones, snippet


def _dropout(x, key, p=0.5):
    keep = jr.bernoulli(key, 1 - p, x.shape)
    return jnp.where(keep, x / (1 - p), 0.0)


@snippet("bug", "Flax: rngs={'dropout': key} passed to every example unchanged")
def flax_rngs_dict_shared() -> Call:
    def fn(x, rngs):
        return _dropout(x, rngs["dropout"])

    rngs = {"dropout": jr.key(30), "params": jr.key(31)}
    return Call(fn, (ones(8), rngs), options={"in_axes": (0, None)})


@snippet("ok", "Flax: dropout rng folded with lax.axis_index('batch')")
def flax_fold_in_axis_index() -> Call:
    def fn(x, rngs):
        key = jr.fold_in(rngs["dropout"], lax.axis_index("batch"))
        return _dropout(x, key)

    rngs = {"dropout": jr.key(32)}
    return Call(
        fn, (ones(8), rngs), options={"in_axes": (0, None), "axis_name": "batch"}
    )


@snippet("bug", "Flax: dropout rng folded with the training step only")
def flax_fold_in_step_only() -> Call:
    def fn(x, step, rng):
        return _dropout(x, jr.fold_in(rng, step))

    args = (ones(8), jnp.asarray(7), jr.key(33))
    return Call(fn, args, options={"in_axes": (0, None, None)})


@snippet("bug", "eqx_rng: derive(key, 'dropout') by name, no per-call data")
def derive_by_name_only() -> Call:
    def fn(x, key):
        return _dropout(x, eqx_rng.derive(key, "dropout"))

    return Call(fn, (ones(8), jr.key(34)), options={"in_axes": (0, None)})


@snippet("ok", "eqx_rng: derive(key, 'dropout', example id) with a mapped id")
def derive_with_example_id() -> Call:
    def fn(x, i, key):
        return _dropout(x, eqx_rng.derive(key, "dropout", i))

    args = (ones(8), jnp.arange(B), jr.key(35))
    return Call(fn, args, options={"in_axes": (0, 0, None)})


def _noisy_update(params, opt_state, opt):
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 and float
        updates, _ = opt.update(grads, opt_state, params)
    return updates


@snippet("ok", "optax: add_noise state built per chain (ensemble), mapped")
def optax_noise_per_chain() -> Call:
    opt = optax.add_noise(0.1, 0.55, key=0)

    def make(*, key):
        params = jnp.zeros(3)
        state = opt.init(params)
        return params, eqx.tree_at(lambda s: s.rng_key, state, key)

    params, opt_state = eqx_rng.ensemble(make, jr.key(36), B)
    return Call(lambda p, s: _noisy_update(p, s, opt), (params, opt_state))


@snippet("bug", "optax: one add_noise state shared by every chain (in_axes None)")
def optax_noise_state_shared() -> Call:
    opt = optax.add_noise(0.1, 0.55, key=0)
    params = jnp.zeros((B, 3))
    opt_state = opt.init(params[0])
    fn = lambda p, s: _noisy_update(p, s, opt)
    return Call(fn, (params, opt_state), options={"in_axes": (0, None)})


@snippet(
    "ok",
    "Flax-style: an unmapped key only passed through (not drawn from)",
    rows_equal=True,
)
def key_passed_through() -> Call:
    fn = lambda x, key: (x, jr.key_data(key))
    return Call(fn, (ones(2), jr.key(37)), options={"in_axes": (0, None)})
