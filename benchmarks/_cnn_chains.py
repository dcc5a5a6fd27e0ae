"""Chains of a small conv net: vmapped (grouped convolutions) against unrolled and
`lax.map`.

Each chain is a digits-sized CNN on `(1, 8, 8)` inputs: `Conv2d(1→16, 3x3) → ReLU →
Conv2d(16→32, 3x3) → ReLU → Dropout(0.1) → Linear(32·4·4 → 10)`, trained with one
SGD step per call on its own batch of examples (every chain sees the same batch;
example `b` of chain `c` draws its dropout mask from `derive(key, c, b)`). The
chains are stacked along a leading axis (`eqx_rng.ensemble`), and one training
step of all of them is one `jax.jit` call, written several ways:

- **vmap**: `eqx_rng.vmap` over the chain axis. XLA turns the batched convolutions
  into grouped convolutions, which its CPU backend runs far slower than ordinary
  ones;
- **unrolled**: a Python loop over the chains inside the one `jit` (each chain's
  convolutions are ordinary ones): the reference;
- **lax.map**: `jax.lax.map` over the chain axis; chain `c` gets `derive(key, c)`,
  the key `eqx_rng.vmap` gives it;
- **lax.scan, unroll=True**: the chain loop as a `lax.scan` over the chain axis,
  fully unrolled (the unrolled program, written once); the same keys;
- (with `--cnn-batch-size`) **lax.map, batch_size**: `lax.map(..., batch_size=...)`,
  which vmaps within groups of chains.

All compute the same numbers (checked before timing: the keys are identical,
so only float summation order differs).
"""

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import eqx_rng

from ._runner import Runner

NAME = "CNN chains"
VMAP, UNROLLED, MAP = "vmap", "unrolled", "lax.map"
SCAN = "lax.scan, unroll=True"


class DigitsCNN(eqx.Module):
    """A small conv net on one `(1, 8, 8)` example."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear
    dropout: eqx_rng.nn.Dropout

    def __init__(self, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, key=k2)
        self.head = eqx.nn.Linear(32 * 4 * 4, 10, key=k3)
        self.dropout = eqx_rng.nn.Dropout(0.1)

    def __call__(self, x, *, key):
        h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        return self.head(self.dropout(h, key=key).reshape(-1))


def chain_step(model, x, y, *, key):
    """One SGD step of one chain on the batch `(x, y)`; returns `(model, loss)`."""

    def loss_fn(model):
        logits = eqx_rng.vmap(lambda x, *, key: model(x, key=key))(x, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.05 * g, grads))
    return model, loss


def _vmapped(models, x, y, key):
    return eqx_rng.vmap(chain_step, in_axes=(0, None, None))(models, x, y, key=key)


def _unrolled(models, x, y, key):
    arrays, static = eqx.partition(models, eqx.is_array)
    n = jax.tree.leaves(arrays)[0].shape[0]
    outs = []
    for c in range(n):
        model = eqx.combine(jax.tree.map(lambda a, c=c: a[c], arrays), static)
        new, loss = chain_step(model, x, y, key=eqx_rng.derive(key, c))
        outs.append((eqx.filter(new, eqx.is_array), loss))
    new_arrays, losses = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return eqx.combine(new_arrays, static), losses


def map_chains(models, x, y, key, batch_size=None):
    """`lax.map` over the chain axis, chain `c` with `derive(key, c)`."""
    arrays, static = eqx.partition(models, eqx.is_array)
    n = jax.tree.leaves(arrays)[0].shape[0]

    def one(args):
        arrays_c, c = args
        model = eqx.combine(arrays_c, static)
        new, loss = chain_step(model, x, y, key=eqx_rng.derive(key, c))
        return eqx.filter(new, eqx.is_array), loss

    new_arrays, losses = jax.lax.map(
        one, (arrays, jnp.arange(n)), batch_size=batch_size
    )
    return eqx.combine(new_arrays, static), losses


def scan_chains(models, x, y, key):
    """`lax.scan` over the chain axis, fully unrolled: the unrolled program, with
    the chain loop written once."""
    arrays, static = eqx.partition(models, eqx.is_array)
    n = jax.tree.leaves(arrays)[0].shape[0]

    def one(carry, args):
        arrays_c, c = args
        model = eqx.combine(arrays_c, static)
        new, loss = chain_step(model, x, y, key=eqx_rng.derive(key, c))
        return carry, (eqx.filter(new, eqx.is_array), loss)

    _, (new_arrays, losses) = jax.lax.scan(
        one, None, (arrays, jnp.arange(n)), unroll=True
    )
    return eqx.combine(new_arrays, static), losses


def steps(chains: int, *, batch_size: bool = False) -> dict[str, Callable]:
    """Variant name -> the jitted step `(models, x, y, key) -> (models, losses)`."""
    out: dict[str, Callable] = {
        VMAP: _vmapped,
        UNROLLED: _unrolled,
        MAP: map_chains,
        SCAN: scan_chains,
    }
    if batch_size and chains >= 4:
        out[f"{MAP}, batch_size={chains // 4}"] = functools.partial(
            map_chains, batch_size=chains // 4
        )
    return {name: eqx.filter_jit(fn) for name, fn in out.items()}


def data(batch: int) -> tuple[jax.Array, jax.Array]:
    x_key, y_key = jr.split(jr.key(8))
    x = jr.normal(x_key, (batch, 1, 8, 8), jnp.float32)
    y = jr.randint(y_key, (batch,), 0, 10, jnp.int32)
    return x, y


def init(chains: int) -> DigitsCNN:
    return eqx_rng.ensemble(lambda *, key: DigitsCNN(key=key), jr.key(0), chains)


def runners(step_fns: dict[str, Callable], chains: int, batch: int) -> list[Runner]:
    """One runner per variant; the unrolled one is the reference. Call `t` uses
    `derive(seed, t)` as the step key (made eagerly inside the call: the same
    small cost for every variant)."""
    x, y = data(batch)
    seed = jr.key(1)
    out = []
    for name, step in step_fns.items():

        def call(models, t, step=step):
            return step(models, x, y, eqx_rng.derive(seed, t))

        out.append(
            Runner(
                NAME,
                name,
                1,
                functools.partial(init, chains),
                call,
                reference=name == UNROLLED,
            )
        )
    return out


def same_numbers(step_fns: dict[str, Callable], chains: int, batch: int) -> float:
    """Largest absolute difference of the updated parameters and losses between
    each variant and the unrolled reference, after one step with the first
    timed call's key (so the timed calls reuse these compilations)."""
    x, y = data(batch)
    models, key = init(chains), eqx_rng.derive(jr.key(1), 0)
    results = {name: step(models, x, y, key) for name, step in step_fns.items()}
    ref = jax.tree.leaves(eqx.filter(results[UNROLLED], eqx.is_array))
    worst = 0.0
    for res in results.values():
        leaves = jax.tree.leaves(eqx.filter(res, eqx.is_array))
        for a, b in zip(leaves, ref, strict=True):
            worst = max(worst, float(jnp.max(jnp.abs(a - b))))
    return worst
