"""Keys derived from names and indices, never from call order: `as_key`,
`string_hash` and `derive`, with the 32-bit range checks of seeds and path items.

Every function here is built from `jax.random.fold_in`, so what it returns does not
depend on `jax_threefry_partitionable`, on the batch size, on the number of chains or
devices, or on `PYTHONHASHSEED`. Arrays of keys are in `_key_grids.py`, keys for
the leaves of a pytree in `_key_trees.py`.
"""

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.core import Tracer

from ._custom_types import Key
from ._derive_reuse import active_scope
from ._typecheck import typecheck
from ._util import describe, is_typed_key

_U32 = 2**32


def as_key(x: Any) -> Key:
    """Turn a seed or a key of any common form into a typed scalar PRNG key.

    **Arguments:**

    - `x`: A Python or NumPy integer seed (not `bool`), a typed scalar key (returned
        unchanged), or a legacy `uint32[2]` key from `jax.random.PRNGKey` (NumPy or
        JAX), which becomes a typed key with the same bits.

    **Returns:**

    A typed scalar key, `jax.random.key(seed)` for an integer seed.

    **Raises:**

    `TypeError` for anything else (a string, a float, an array of another shape or
    dtype), naming what was received; `ValueError` for a batch of keys, or for an
    integer seed outside `[-2**31, 2**32)` (a larger seed would silently wrap: use
    `derive(as_key(0), *id_halves(seed))` for 64-bit seeds). A negative seed is an
    `int32` read as two's complement: `as_key(-1) == as_key(2**32 - 1)`, as
    `jax.random.key(-1)` is with 64-bit mode off.

    !!! Example

        ```python
        k = eqx_rng.as_key(0)
        assert eqx_rng.as_key(k) is k
        legacy = jax.random.PRNGKey(0)
        assert (jr.key_data(eqx_rng.as_key(legacy)) == legacy).all()
        ```
    """
    if isinstance(x, bool | np.bool_):
        raise TypeError(
            f"`as_key` takes an integer seed or a PRNG key, got the bool {x!r}; "
            "pass an int such as `as_key(0)`."
        )
    if isinstance(x, int | np.integer):
        return jr.key(np.uint32(_check_u32(int(x), "`as_key` seed", _SEED_FIX)))
    if is_typed_key(x):
        if x.shape != ():
            raise ValueError(
                f"`as_key` takes one key, got a batch of keys of shape {x.shape}; "
                "index one (`keys[0]`) or map over them with `eqx_rng.vmap`."
            )
        return x
    if isinstance(x, jax.Array | np.ndarray) and x.dtype == np.uint32:
        if x.shape == (2,):
            return jr.wrap_key_data(jnp.asarray(x))
        if x.ndim >= 2 and x.shape[-1] == 2:
            raise ValueError(
                f"`as_key` takes one key, got a batch of legacy keys of shape "
                f"{x.shape}; index one (`keys[0]`) or convert them all with "
                "`jax.random.wrap_key_data(keys)`."
            )
    raise TypeError(
        f"`as_key` takes an integer seed, a typed PRNG key or a legacy uint32[2] key, "
        f"got {describe(x)}; pass for example `as_key(0)` or `jax.random.key(0)`."
    )


def string_hash(name: str) -> int:
    """The stable 32-bit hash `derive` folds in for a string path item.

    The first 4 bytes, read as a little-endian `uint32`, of
    `hashlib.blake2b(name.encode("utf-8"), digest_size=4)`. It never uses Python's
    `hash`, so it does not change with `PYTHONHASHSEED`, and it is fixed forever:
    changing it would change every named draw.

    **Arguments:**

    - `name`: Any string.

    **Returns:**

    An `int` in `[0, 2**32)`.

    !!! Example

        ```python
        assert eqx_rng.string_hash("dropout") == eqx_rng.string_hash("dropout")
        ```
    """
    if not isinstance(name, str):
        raise TypeError(
            f"`string_hash` takes a str, got {describe(name)}. Pass the name as text "
            "(decode bytes first); integers go to `derive` directly."
        )
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _check_u32(value: int, what: str, fix: str) -> int:
    """`value` as a `uint32` value (negative int32 values wrap, as two's complement),
    or a `ValueError` naming `what`, the value, the range and `fix`."""
    if not -(2**31) <= value < _U32:
        raise ValueError(
            f"{what} is {value}, outside [-2**31, 2**32): it is folded in as a uint32 "
            f"and would silently wrap around to {value % _U32}. {fix}"
        )
    return value % _U32


_SEED_FIX = (
    "Pass a seed in [0, 2**32); for a 64-bit seed or hashed id use "
    "`eqx_rng.derive(eqx_rng.as_key(0), *eqx_rng.id_halves(seed))`."
)
_PATH_FIX = (
    "Fold a larger index in as its two 32-bit halves: "
    "`derive(key, *eqx_rng.id_halves(i))`."
)


def _path_item_to_u32(item: Any, position: int) -> Any:
    if isinstance(item, str):
        return np.uint32(string_hash(item))
    if isinstance(item, bool | np.bool_):
        raise TypeError(
            f"`derive` path item {position} is the bool {item!r}; path items are "
            "ints, integer scalar arrays or strings."
        )
    if isinstance(item, int | np.integer):
        what = f"`derive` path item {position}"
        return np.uint32(_check_u32(int(item), what, _PATH_FIX))
    if isinstance(item, jax.Array | np.ndarray):
        if item.shape != () or not jnp.issubdtype(item.dtype, jnp.integer):
            raise TypeError(
                f"`derive` path item {position} must be an integer scalar; got "
                f"{describe(item)}. For many indices use `grid_keys` or "
                "`example_keys`."
            )
        if isinstance(item, jax.Array) and (
            isinstance(item, Tracer) or item.dtype.itemsize <= 4
        ):
            # A traced value cannot be checked: it is converted modulo 2**32. A
            # concrete JAX array of 32 bits or fewer is always in range, and is
            # converted on device (no host sync).
            return item.astype(jnp.uint32)
        what = f"`derive` path item {position}"
        return np.uint32(_check_u32(int(item), what, _PATH_FIX))
    raise TypeError(
        f"`derive` path items are ints, integer scalar arrays or strings; item "
        f"{position} is {describe(item)}."
    )


@typecheck
def derive(key: Key, *path: Any) -> Key:
    """Derive a key from a name or index path, in order, with `fold_in`.

    `derive(k, a, b)` is `fold_in(fold_in(k, a), b)`. Ints and integer scalar arrays
    are folded in as `uint32`; strings as `string_hash(s)`, which does not depend on
    `PYTHONHASHSEED`. The result depends only on the key and the path: never on call
    order, batch size or JAX flags.

    Integer range: a concrete integer (Python, NumPy or a concrete JAX scalar) must
    lie in `[-2**31, 2**32)`, else `ValueError`, never a silent wrap. A negative
    value is an `int32` read as two's complement, so `-1` means `2**32 - 1` (as
    `jnp.int32(-1).astype(jnp.uint32)` does). A traced integer cannot be checked: it
    is converted to `uint32` modulo `2**32`. A 64-bit id (a hash, say) goes in as
    its two halves: `derive(k, *eqx_rng.id_halves(i))`.

    Inside `eqx_rng.debug.key_reuse()`, deriving the same path twice from the same
    key returns the same key object, so two draws from it raise
    `jax.errors.KeyReuseError`.

    **Arguments:**

    - `key`: A typed scalar key.
    - `*path`: Ints in `[-2**31, 2**32)`, integer scalar arrays, or strings.

    **Returns:**

    A typed scalar key; `key` itself when `path` is empty.

    **Raises:**

    `TypeError` for a float, bool or non-scalar path item; `ValueError` for an int
    out of range.

    !!! Example

        ```python
        k = jr.key(0)
        step_key = eqx_rng.derive(k, "train", 7)
        assert eqx_rng.derive(k) is k
        ```
    """
    scope = active_scope()
    for position, item in enumerate(path):
        item_u32 = _path_item_to_u32(item, position)
        if scope is None:
            key = jr.fold_in(key, item_u32)
        else:
            # Inside `debug.key_reuse()`: the same (key, item) gives the same key
            # object, so JAX's checker sees two draws from it as reuse.
            key = scope.derive_one(key, item, item_u32)
    return key


__all__ = ["as_key", "derive", "string_hash"]
