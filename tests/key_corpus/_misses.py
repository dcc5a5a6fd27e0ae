"""Bugs the check cannot see, each with the reason (documented in docs/key-check.md).

The analysis follows where values come from, not what they are: a mapped argument
is assumed to differ per call, and a draw it cannot trace is not judged.
"""

import jax.numpy as jnp
import jax.random as jr

from ._base import B, Call, ones, snippet


@snippet(
    "bug",
    "blackjax-style: one key broadcast to a (num_chains,) array and mapped",
    miss="the keys are mapped, so the analysis assumes they differ per call; "
    "that they hold the same value is a fact about data, not flow "
    "(`eqx_rng.debug.check_distinct_keys` catches it on the values)",
)
def mapped_but_identical_keys() -> Call:
    keys = jnp.broadcast_to(jr.key(40), (B,))
    return Call(lambda x, k: x + jr.normal(k, x.shape), (ones(3), keys))


@snippet(
    "bug",
    "Flax-style: dropout rng folded with a mapped class label (repeats)",
    miss="a mapped label varies per call as far as data flow can tell; rows with "
    "the same label draw the same numbers (fold in a unique example id instead)",
)
def fold_in_mapped_label() -> Call:
    labels = jnp.zeros((B,), jnp.int32)  # every example of the batch in class 0

    def fn(x, label, key):
        return x + jr.normal(jr.fold_in(key, label), x.shape)

    return Call(fn, (ones(3), labels, jr.key(41)), options={"in_axes": (0, 0, None)})


@snippet(
    "bug",
    "a draw turned into a Python number (`int(...)`) from an unmapped key",
    miss="the function needs the key's concrete value, so it cannot be traced "
    "with the key abstract; the check is skipped and the real call runs",
)
def concrete_draw_from_unmapped_key() -> Call:
    def fn(x, key):
        n = int(jr.randint(key, (), 1, 1000))
        return x * n

    return Call(fn, (ones(3), jr.key(42)), options={"in_axes": (0, None)})
