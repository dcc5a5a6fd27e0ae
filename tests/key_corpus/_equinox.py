"""Patterns of Equinox code: its examples (dropout, attention, keys split inside
Modules, scan/while/cond/checkpoint) and its layers, mapped with `eqx_rng.vmap`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax

import eqx_rng

from ._base import B, Call, ones, snippet


class Block(eqx.Module):
    """A Module that splits its key inside, as Equinox's examples do."""

    linear: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, *, key):
        self.linear = eqx.nn.Linear(4, 4, key=key)
        self.dropout = eqx.nn.Dropout(0.5)

    def __call__(self, x, *, key):
        drop_key, noise_key = jr.split(key)
        h = self.dropout(self.linear(x), key=drop_key)
        return h + 0.1 * jr.normal(noise_key, h.shape)


def _attention():
    return eqx.nn.MultiheadAttention(2, 4, dropout_p=0.5, key=jr.key(0))


@snippet("ok", "Equinox: eqx.nn.Dropout given the per-call key=")
def dropout_per_call_key() -> Call:
    layer = eqx.nn.Dropout(0.5)
    return Call(lambda x, *, key: layer(x, key=key), (ones(16),), {"key": jr.key(1)})


@snippet("bug", "Equinox: dropout key given in_axes None (the seed tutorial pitfall)")
def dropout_key_in_axes_none() -> Call:
    layer = eqx.nn.Dropout(0.5)
    fn = lambda x, key: layer(x, key=key)
    return Call(fn, (ones(16), jr.key(1)), options={"in_axes": (0, None)})


@snippet("bug", "Equinox: model called with a key closed over instead of key=")
def dropout_key_closed_over() -> Call:
    layer = eqx.nn.Dropout(0.5)
    key = jr.key(2)
    return Call(lambda x: layer(x, key=key), (ones(16),))


@snippet("ok", "Equinox: MultiheadAttention with dropout, key= per call")
def attention_dropout_per_call() -> Call:
    attn = _attention()
    fn = lambda x, *, key: attn(x, x, x, key=key)
    return Call(fn, (ones(3, 4),), {"key": jr.key(3)})


@snippet("bug", "Equinox: MultiheadAttention dropout key shared by the batch")
def attention_dropout_shared_key() -> Call:
    attn = _attention()
    fn = lambda x, key: attn(x, x, x, key=key)
    return Call(fn, (ones(3, 4), jr.key(3)), options={"in_axes": (0, None)})


@snippet("ok", "Equinox: keys split inside a Module (drop_key, noise_key = split(key))")
def keys_split_inside_module() -> Call:
    block = Block(key=jr.key(4))
    return Call(lambda x, *, key: block(x, key=key), (ones(4),), {"key": jr.key(5)})


@snippet("bug", "Equinox: keys split inside a Module from one unmapped key")
def keys_split_inside_module_unmapped() -> Call:
    block = Block(key=jr.key(4))
    fn = lambda x, key: block(x, key=key)
    return Call(fn, (ones(4), jr.key(5)), options={"in_axes": (0, None)})


@snippet("ok", "Equinox: a key carried through lax.scan, split every step")
def scan_key_carry_per_call() -> Call:
    def fn(x, *, key):
        def step(carry, _):
            h, k = carry
            k, sub = jr.split(k)
            return (h + jr.normal(sub, h.shape), k), None

        return lax.scan(step, (x, key), None, length=3)[0][0]

    return Call(fn, (ones(3),), {"key": jr.key(6)})


@snippet("bug", "Equinox: a key carried through lax.scan from an unmapped key")
def scan_key_carry_unmapped() -> Call:
    def fn(x, key):
        def step(carry, _):
            h, k = carry
            k, sub = jr.split(k)
            return (h + jr.normal(sub, h.shape), k), None

        return lax.scan(step, (x, key), None, length=3)[0][0]

    return Call(fn, (ones(3), jr.key(6)), options={"in_axes": (0, None)})


@snippet("ok", "Equinox: a key carried through lax.while_loop, split every step")
def while_key_carry_per_call() -> Call:
    def fn(x, *, key):
        def body(c):
            h, k, i = c
            k, sub = jr.split(k)
            return h + jr.uniform(sub, h.shape), k, i + 1

        return lax.while_loop(lambda c: c[2] < 3, body, (x, key, 0))[0]

    return Call(fn, (ones(3),), {"key": jr.key(7)})


@snippet("ok", "Equinox: lax.cond choosing between two noisy branches, key= per call")
def cond_branches_per_call() -> Call:
    def fn(x, *, key):
        return lax.cond(
            x[0] > 0,
            lambda k: x + jr.normal(k, x.shape),
            lambda k: x - jr.uniform(k, x.shape),
            key,
        )

    return Call(fn, (ones(3),), {"key": jr.key(8)})


@snippet("bug", "Equinox: lax.cond whose branch draws from an unmapped key")
def cond_branch_unmapped() -> Call:
    def fn(x, key):
        return lax.cond(x[0] > 0, lambda k: x + jr.normal(k, x.shape), lambda k: x, key)

    return Call(fn, (ones(3), jr.key(8)), options={"in_axes": (0, None)})


@snippet("ok", "Equinox: a noisy layer under jax.checkpoint (remat), key= per call")
def checkpoint_per_call() -> Call:
    block = Block(key=jr.key(9))
    fn = jax.checkpoint(lambda x, key: block(x, key=key))
    return Call(lambda x, *, key: fn(x, key), (ones(4),), {"key": jr.key(10)})


@snippet("bug", "Equinox: a Module holding a key as a field, mapped over the batch")
def module_key_field() -> Call:
    class NoiseWithKey(eqx.Module):
        key: jax.Array

        def __call__(self, x):
            return x + jr.normal(self.key, x.shape)

    return Call(NoiseWithKey(jr.key(11)), (ones(3),))


@snippet("ok", "Equinox: a key table split once, indexed by a mapped example id")
def key_table_mapped_id() -> Call:
    def fn(x, i, key):
        table = jr.split(key, 100)
        return x + jr.normal(table[i], x.shape)

    ids = jnp.arange(10, 10 + B)
    return Call(fn, (ones(3), ids, jr.key(12)), options={"in_axes": (0, 0, None)})


@snippet("bug", "Equinox: a key table indexed by a constant instead of the id")
def key_table_constant_index() -> Call:
    def fn(x, key):
        return x + jr.normal(jr.split(key, 100)[0], x.shape)

    return Call(fn, (ones(3), jr.key(12)), options={"in_axes": (0, None)})


@snippet("ok", "Equinox: ensemble init, eqx.filter_vmap over split keys, ported")
def ensemble_init_mapped_keys() -> Call:
    keys = jr.split(jr.key(13), B)
    return Call(lambda k: eqx.nn.Linear(3, 2, key=k).weight, (keys,))


@snippet("ok", "eqx_rng: Sequential of eqx_rng.nn layers with BatchNorm, key= per call")
def eqx_rng_sequential() -> Call:
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(4, 4, key=jr.key(14)),
            eqx_rng.nn.BatchNorm(4, axis_name="batch"),
            eqx_rng.nn.Dropout(0.5),
            eqx_rng.nn.GaussianNoise(0.1),
        ]
    )
    xs = jr.normal(jr.key(15), (B, 4))

    def fn(x, state, *, key):
        return model(x, state, key=key)[0]

    return Call(fn, (xs, state), {"key": jr.key(16)}, {"axis_name": "batch"})


@snippet("bug", "Equinox: jax.random.PRNGKey(0) made inside the forward pass")
def fixed_seed_inside_forward() -> Call:
    layer = eqx.nn.Dropout(0.5)
    return Call(lambda x: layer(x, key=jr.PRNGKey(0)), (ones(16),))


@snippet("bug", "Equinox: a custom_vjp noisy op given an unmapped key")
def custom_vjp_unmapped() -> Call:
    @jax.custom_vjp
    def noisy(x, key):
        return x + jr.normal(key, x.shape)

    noisy.defvjp(lambda x, key: (noisy(x, key), None), lambda _, g: (g, None))
    return Call(noisy, (ones(3), jr.key(17)), options={"in_axes": (0, None)})
