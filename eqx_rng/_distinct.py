"""`check_distinct_keys`: the same PRNG key in two chains is an error.

An object that seeds its own key (`optax.add_noise(..., key=0)` keeps one in its
state) gives every chain of an ensemble the same key, so every chain draws the same
noise. Nothing fails; the chains are just not independent. This check compares, for
every key leaf of a chain-batched pytree, the keys of the chains at each position.
"""

from typing import Any

import jax
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer
from jaxtyping import PyTree

from ._typecheck import typecheck
from ._util import is_legacy_key, is_typed_key


class DuplicateKeyError(ValueError):
    """Two chains of a chain-batched pytree hold the same PRNG key, so they draw
    the same random numbers.

    Raised by `eqx_rng.debug.check_distinct_keys` and by `eqx_rng.ensemble`. The
    message names the key leaf's path and the chains.

    !!! Example

        ```python
        shared = {"key": jnp.stack([jr.key(0), jr.key(0)])}
        try:
            eqx_rng.debug.check_distinct_keys(shared)
        except eqx_rng.DuplicateKeyError as e:
            assert "['key']" in str(e)
        ```
    """


def _key_data(leaf: Any, legacy: bool) -> np.ndarray | None:
    """The raw words of a key leaf, shape `(*key_shape, words)`, or `None` when the
    leaf is not a key (or cannot be read: traced, or not fully addressable)."""
    if isinstance(leaf, Tracer):
        return None
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return None
    if is_typed_key(leaf):
        data = np.asarray(jr.key_data(leaf))
        return data.reshape(*leaf.shape, -1)
    if legacy and is_legacy_key(leaf):
        return np.asarray(leaf)
    return None


def _first_duplicate(data: np.ndarray) -> tuple[int, list[int]] | None:
    """`data` of shape `(n, positions, words)`: the first position at which two
    chains hold the same key, and all chains holding that key there."""
    n, positions, words = data.shape
    # One row per (position, chain): [position, word_0, ..., word_{w-1}]. Sorting
    # the rows puts equal keys at one position next to each other.
    rows = np.concatenate(
        [
            np.repeat(np.arange(positions, dtype=np.uint64), n)[:, None],
            data.transpose(1, 0, 2).reshape(positions * n, words).astype(np.uint64),
        ],
        axis=1,
    )
    order = np.lexsort(rows.T[::-1])
    ordered = rows[order]
    same = np.all(ordered[1:] == ordered[:-1], axis=1)
    if not same.any():
        return None
    first = int(np.argmax(same))
    position = int(ordered[first, 0])
    key_words = ordered[first, 1:]
    chains = np.nonzero(np.all(data[:, position].astype(np.uint64) == key_words, 1))
    return position, [int(c) for c in chains[0]]


def _chains_text(chains: list[int], n: int) -> str:
    if len(chains) == n:
        return f"all {n} chains"
    shown = ", ".join(str(c) for c in chains[:8])
    more = f" and {len(chains) - 8} more" if len(chains) > 8 else ""
    return f"chains {shown}{more} (of {n})"


@typecheck
def check_distinct_keys(tree: PyTree, axis: int = 0, *, legacy: bool = True) -> PyTree:
    """Check that no two chains of a chain-batched pytree hold the same PRNG key.

    For every key leaf, the keys of chain `i` and chain `j` (indices `i != j` along
    `axis`) are compared at each position: a key shared by two chains makes them
    draw the same numbers. Keys at different positions are not compared. The
    comparison is vectorised (one sort per leaf), not a loop over pairs of chains.

    Key leaves are typed key arrays; with `legacy=True` (the default) also legacy
    `uint32[..., 2]` arrays (raw keys from `jax.random.PRNGKey`, which some
    libraries keep in their state), whose last axis is the key data and so is not
    counted in `axis`. Pass `legacy=False` if a `uint32[..., 2]` leaf of your tree
    is not a key.

    Values are needed: a traced leaf (inside `jax.jit`, `vmap`, ...) cannot be
    checked and is skipped silently, as is an array that is not fully addressable
    from this process (multi-host). The check runs where the arrays are concrete,
    for example right after building the chains.

    **Arguments:**

    - `tree`: Any pytree whose key leaves carry the chain axis.
    - `axis`: The chain axis of the key leaves (of the key array's shape, without
        legacy keys' data axis). Negative values count from the end.
    - `legacy`: Whether `uint32[..., 2]` leaves count as keys. (Keyword only
        argument.)

    **Returns:**

    `tree`, unchanged, so the check can be used inline.

    **Raises:**

    `DuplicateKeyError` naming the leaf's path and the chains that share a key;
    `ValueError` for a key leaf without axis `axis`.

    !!! Example

        ```python
        key = jr.key(0)
        states = {"key": eqx_rng.grid_keys(key, (4,)), "w": jnp.zeros((4, 3))}
        eqx_rng.debug.check_distinct_keys(states)  # four distinct keys: fine
        shared = {"key": jnp.stack([key] * 4)}
        try:
            eqx_rng.debug.check_distinct_keys(shared)
        except eqx_rng.DuplicateKeyError as e:
            assert "all 4 chains" in str(e)
        ```
    """
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        data = _key_data(leaf, legacy)
        if data is None:
            continue
        key_ndim = data.ndim - 1
        name = jtu.keystr(path) or "<the tree itself>"
        if not -key_ndim <= axis < key_ndim:
            raise ValueError(
                f"`eqx_rng.debug.check_distinct_keys(tree, axis={axis})`: the key "
                f"leaf at `{name}` has key shape {data.shape[:-1]}, with no axis "
                f"{axis}. Pass the chain axis of the keys, or check a chain-batched "
                "tree."
            )
        chained = np.moveaxis(data, axis % key_ndim, 0)
        n = chained.shape[0]
        if n < 2:
            continue
        found = _first_duplicate(chained.reshape(n, -1, chained.shape[-1]))
        if found is None:
            continue
        position, chains = found
        where = "" if chained[0, ..., 0].size == 1 else f" (key {position} of each)"
        raise DuplicateKeyError(
            f"`eqx_rng.debug.check_distinct_keys`: the PRNG key leaf at `{name}` "
            f"holds the same key{where} in {_chains_text(chains, n)} along axis "
            f"{axis}, so those chains draw the same random numbers. Give each chain "
            "its own key: derive it from the chain's key (`eqx_rng.ensemble` passes "
            "`key=derive(key, c)` to `make`) instead of a fixed seed, e.g. "
            "`optax.add_noise(eta, gamma, key=eqx_rng.derive(key, 'noise'))` inside "
            "`make`."
        )
    return tree


__all__ = ["DuplicateKeyError", "check_distinct_keys"]
