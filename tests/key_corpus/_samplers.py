"""Patterns of sampler code (numpyro / blackjax kernels that split a key per step,
SGLD steps), with chains mapped by `eqx_rng.vmap`."""

import jax.numpy as jnp
import jax.random as jr
from jax import lax

import eqx_rng

from ._base import B, Call, snippet


def _logdensity(x):
    return -0.5 * jnp.sum(x**2)


def _rw_step(x, key, scale=0.5):
    """A random-walk Metropolis step, blackjax style: one key in, split inside."""
    move_key, accept_key = jr.split(key)
    proposal = x + scale * jr.normal(move_key, x.shape)
    log_ratio = _logdensity(proposal) - _logdensity(x)
    accept = jnp.log(jr.uniform(accept_key)) < log_ratio
    return jnp.where(accept, proposal, x)


def _run_chain(x, key, steps=4):
    def step(x, k):
        return _rw_step(x, k), None

    return lax.scan(step, x, jr.split(key, steps))[0]


def _starts():
    return jnp.zeros((B, 2))


@snippet("ok", "blackjax: chains mapped over jax.random.split(rng_key, num_chains)")
def blackjax_split_keys_per_chain() -> Call:
    return Call(_run_chain, (_starts(), jr.split(jr.key(20), B)))


@snippet("bug", "blackjax: one rng_key given to every chain (in_axes None)")
def blackjax_one_key_every_chain() -> Call:
    return Call(_run_chain, (_starts(), jr.key(20)), options={"in_axes": (0, None)})


@snippet("ok", "numpyro: chain key = fold_in(rng_key, chain id), split per step")
def numpyro_fold_in_chain_id() -> Call:
    def fn(x, chain, rng_key):
        return _run_chain(x, jr.fold_in(rng_key, chain))

    args = (_starts(), jnp.arange(B), jr.key(21))
    return Call(fn, args, options={"in_axes": (0, 0, None)})


@snippet("ok", "numpyro: per-chain keys from eqx_rng.vmap's key=")
def numpyro_key_kwarg() -> Call:
    return Call(lambda x, *, key: _run_chain(x, key), (_starts(),), {"key": jr.key(22)})


@snippet("bug", "numpyro: a while_loop sampler (rejection) started from one key")
def rejection_sampler_one_key() -> Call:
    def fn(x, key):
        def cond(c):
            return c[2] < 0.5

        def body(c):
            k, _, _ = c
            k, sub = jr.split(k)
            return k, x + jr.normal(sub, x.shape), jr.uniform(sub)

        return lax.while_loop(cond, body, (key, x, jnp.zeros(())))[1]

    return Call(fn, (_starts(), jr.key(23)), options={"in_axes": (0, None)})


@snippet("ok", "SGLD: chain step keys derived from a mapped step key table")
def sgld_step_keys() -> Call:
    def fn(theta, keys):
        def step(theta, k):
            grad = -theta
            return theta + 0.01 * grad + 0.1 * jr.normal(k, theta.shape), None

        return lax.scan(step, theta, keys)[0]

    keys = jr.split(jr.key(24), (B, 5))
    return Call(fn, (_starts(), keys))


@snippet("bug", "SGLD: the noise key of a step shared by every chain")
def sgld_noise_key_shared() -> Call:
    def fn(theta, noise_key):
        return theta - 0.01 * theta + 0.1 * jr.normal(noise_key, theta.shape)

    return Call(fn, (_starts(), jr.key(25)), options={"in_axes": (0, None)})


@snippet(
    "ok", "Bayes by Backprop: one weight sample shared on purpose (eqx_rng.shared)"
)
def bayes_shared_weight_sample() -> Call:
    def fn(x, weight_key, *, key):
        w = jr.normal(weight_key, (2, 2))
        return w @ x + 0.1 * jr.normal(key, (2,))

    args = (_starts(), eqx_rng.shared(jr.key(26)))
    return Call(fn, args, {"key": jr.key(27)})
