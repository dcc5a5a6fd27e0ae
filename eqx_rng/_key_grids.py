"""Arrays of derived keys in one vectorised call: `grid_keys` (element `[i, j]` is
`derive(key, i, j)`), `example_keys` (one key per global example id) and `id_halves`
(the two 32-bit halves of 64-bit ids)."""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Integer

from ._custom_types import Key, KeyGrid
from ._keys import _U32
from ._typecheck import typecheck
from ._util import describe


def _check_shape(shape: Any, fn: str) -> tuple[int, ...]:
    if isinstance(shape, int | np.integer) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise ValueError(
            f"`{fn}` takes `shape` as a tuple of non-negative ints, got "
            f"{describe(shape)}."
        )
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(
                f"`{fn}` takes `shape` as a tuple of non-negative ints, got "
                f"{tuple(shape)!r}."
            )
    return tuple(int(n) for n in shape)


def _check_start(start: Any, shape: tuple[int, ...]) -> tuple[Any, ...]:
    if start is None:
        return (0,) * len(shape)
    if isinstance(start, int | np.integer | jax.Array | np.ndarray):
        start = (start,)
    if not isinstance(start, Sequence) or len(start) != len(shape):
        n = len(start) if isinstance(start, Sequence) else "?"
        raise ValueError(
            f"`grid_keys` needs one `start` offset per dimension of `shape` "
            f"{shape}: expected {len(shape)}, got {n} ({start!r})."
        )
    out = []
    for d, s in enumerate(start):
        if isinstance(s, bool) or not isinstance(
            s, int | np.integer | jax.Array | np.ndarray
        ):
            raise ValueError(
                f"`grid_keys` `start[{d}]` must be an int or integer scalar array, "
                f"got {describe(s)}."
            )
        if isinstance(s, jax.Array | np.ndarray) and (
            s.shape != () or not jnp.issubdtype(s.dtype, jnp.integer)
        ):
            raise ValueError(
                f"`grid_keys` `start[{d}]` must be an integer scalar, got "
                f"{describe(s)}."
            )
        if not isinstance(s, Tracer):
            # Concrete offsets are checked; a traced one wraps modulo 2**32.
            _check_grid_start(int(s), d, shape[d])
        out.append(s)
    return tuple(out)


def _check_grid_start(s: int, d: int, n: int) -> None:
    if s < 0:
        raise ValueError(
            f"`grid_keys` `start[{d}]` must be >= 0, got {s}; pass the offset of the "
            "block's first element."
        )
    if s + n > _U32:
        raise ValueError(
            f"`grid_keys` indices must stay below 2**32 (they are folded in as "
            f"uint32 and would silently wrap): `start[{d}]` = {s} plus `shape[{d}]` "
            f"= {n} goes past it. Derive a sub-key for the block instead, e.g. "
            "`grid_keys(derive(key, block), shape)`."
        )


def _fold_in_u32(key: Key, i: Array) -> Key:
    return jr.fold_in(key, i)


@typecheck
def grid_keys(key: Key, shape: Any, *, start: Any = None) -> KeyGrid:
    """A grid of keys, element `[i, j, ...]` equal to `derive(key, i, j, ...)`.

    Built with one vectorised `fold_in` per dimension (no Python loop over elements).
    With `start`, element `[i, j, ...]` is `derive(key, i + start[0], j + start[1],
    ...)`, so a block of a larger grid can be made on its own (a device's shard, say).

    Invariances: a key depends on its global index alone, so
    `grid_keys(k, (4, 8))[:2, :3]` equals `grid_keys(k, (2, 3))` bitwise (the grid is
    prefix-invariant: chain `c` keeps its keys when chains are added, example `b`
    when the batch grows), and `grid_keys(k, (C, B))[c, b] == derive(k, c, b)`.

    **Arguments:**

    - `key`: A typed scalar key.
    - `shape`: A tuple of non-negative ints (an int means a 1-D grid).
    - `start`: Optional offsets, one int or integer scalar array per dimension.
        (Keyword only argument.)

    **Returns:**

    A key array of shape `shape`.

    **Raises:**

    `ValueError` for a negative or non-integer shape, a `start` whose length is
    not the number of dimensions, or a concrete `start` (int, NumPy or JAX scalar)
    that is negative or whose last index `start[d] + shape[d] - 1` reaches `2**32`
    (it would silently wrap). A traced `start` cannot be checked: its indices wrap
    modulo `2**32`.

    !!! Example

        ```python
        k = jr.key(0)
        keys = eqx_rng.grid_keys(k, (4, 8))
        assert keys.shape == (4, 8)
        assert (jr.key_data(keys[1, 2]) == jr.key_data(eqx_rng.derive(k, 1, 2))).all()
        ```
    """
    shape = _check_shape(shape, "grid_keys")
    offsets = _check_start(start, shape)
    if all(isinstance(s, int | np.integer) for s in offsets):
        # Python-int offsets go in as a NumPy uint32 array (no device op, no int32
        # overflow above 2**31 - 1).
        offset_array: Any = np.asarray(offsets, dtype=np.uint32)
    else:
        offset_array = jnp.stack([jnp.asarray(s).astype(jnp.uint32) for s in offsets])
    # One compiled program per shape, the offsets an argument: an eager call is one
    # dispatch (not a few per dimension), and new offsets never recompile.
    return _grid(key, shape, offset_array)


@functools.partial(jax.jit, static_argnums=1)
def _grid(key: Key, shape: tuple[int, ...], offsets: Array) -> KeyGrid:
    keys = key
    for d, n in enumerate(shape):
        idx = jnp.arange(n, dtype=jnp.uint32) + offsets[d]
        fold = jax.vmap(_fold_in_u32, in_axes=(None, 0))
        for _ in range(d):
            fold = jax.vmap(fold, in_axes=(0, None))
        keys = fold(keys, idx)
    return keys


def id_halves(x: Any) -> tuple[Any, Any]:
    """The high and low 32-bit halves of a 64-bit integer id, to fold in as two items.

    `fold_in` takes 32 bits, and eqx_rng refuses larger integers rather than wrap
    them. A 64-bit id (a hashed example id, a 64-bit seed) goes in as its two halves:
    `derive(key, *id_halves(i))` is `derive(key, hi, lo)`, and distinct ids in
    `[-2**63, 2**64)` give distinct paths. A negative id is an `int64` read as two's
    complement (`id_halves(-1) == id_halves(2**64 - 1)`), so Python's `hash` values
    and NumPy `int64` hashes can be passed as they are. `example_keys(key, ids,
    bits=64)` does the same for an array of ids.

    **Arguments:**

    - `x`: A Python or NumPy integer in `[-2**63, 2**64)`, or an integer scalar
        array (a traced one too; without 64-bit mode JAX arrays hold 32 bits).

    **Returns:**

    `(hi, lo)`: Python ints for an integer, `uint32` scalar arrays for an array.

    **Raises:**

    `ValueError` for an integer outside `[-2**63, 2**64)`; `TypeError` for anything
    that is not an integer.

    !!! Example

        ```python
        user_id = 0x1234_5678_9ABC_DEF0  # a 64-bit hash
        hi, lo = eqx_rng.id_halves(user_id)
        assert (hi, lo) == (0x1234_5678, 0x9ABC_DEF0)
        key = eqx_rng.derive(jr.key(0), "user", *eqx_rng.id_halves(user_id))
        ```
    """
    if isinstance(x, bool | np.bool_):
        raise TypeError(f"`id_halves` takes an integer id, got the bool {x!r}.")
    if isinstance(x, int | np.integer):
        value = int(x)
        if not -(2**63) <= value < 2**64:
            raise ValueError(
                f"`id_halves` takes an id in [-2**63, 2**64), got {value}; hash a "
                "larger id to 64 bits first (e.g. `hashlib.blake2b(data, "
                "digest_size=8)`)."
            )
        value %= 2**64
        return value >> 32, value % _U32
    if isinstance(x, jax.Array | np.ndarray) and x.shape == ():
        if jnp.issubdtype(x.dtype, jnp.integer):
            return _halves(x)
    raise TypeError(
        f"`id_halves` takes an integer id (an int, a NumPy integer or an integer "
        f"scalar array), got {describe(x)}."
    )


def _halves(ids: Any) -> tuple[Any, Any]:
    """`(hi, lo)` uint32 halves of an integer array, two's complement mod 2**64."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    if ids.dtype.itemsize > 4:
        hi = (ids >> 32).astype(xp.uint32)  # arithmetic shift: sign-extends
    elif jnp.issubdtype(ids.dtype, jnp.signedinteger):
        hi = xp.where(ids < 0, xp.uint32(_U32 - 1), xp.uint32(0))
    else:
        hi = xp.zeros(ids.shape, xp.uint32)
    return hi, ids.astype(xp.uint32)


def _check_ids(ids: Any) -> None:
    """Refuse concrete ids outside [-2**31, 2**32) (only wide dtypes can hold them;
    traced ids cannot be checked and wrap modulo 2**32)."""
    if ids.dtype.itemsize <= 4 or isinstance(ids, Tracer) or ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < -(2**31) or high >= _U32:
        bad = low if low < -(2**31) else high
        raise ValueError(
            f"`example_keys` ids must lie in [-2**31, 2**32) (they are folded in as "
            f"uint32 and would silently wrap), got {bad} among ids of dtype "
            f"{ids.dtype}. For 64-bit ids (hashes) pass "
            "`example_keys(key, ids, bits=64)`, which folds in both 32-bit halves."
        )


@typecheck
def example_keys(
    key: Key, ids: Integer[Array | np.ndarray, " n"], *, bits: int = 32
) -> KeyGrid:
    """One key per global example id: `derive(key, id)` for each id.

    A key depends on the example's id alone, so it is the same whatever the batch
    size, the shuffling, or the position of the example in its batch.

    Integer range: with `bits=32`, ids are folded in as `uint32` (negative ids as
    `int32` two's complement, as in `derive`); concrete ids outside
    `[-2**31, 2**32)` are a `ValueError`, never a silent wrap. With `bits=64`, key
    `i` is `derive(key, *id_halves(ids[i]))` (both 32-bit halves folded in), for
    64-bit ids such as hashes. Traced ids cannot be checked: with `bits=32` they
    wrap modulo `2**32`.

    **Arguments:**

    - `key`: A typed scalar key.
    - `ids`: A 1-D integer array (JAX or NumPy, signed or unsigned) of example ids.
    - `bits`: `32` (default) or `64`: how many bits of each id to fold in.
        (Keyword only argument.)

    **Returns:**

    A key array of shape `ids.shape`.

    **Raises:**

    `ValueError` for a concrete id out of range with `bits=32`, or `bits` other
    than 32 or 64.

    !!! Example

        ```python
        k = jr.key(0)
        keys = eqx_rng.example_keys(k, jnp.array([7, 3]))
        assert (jr.key_data(keys[0]) == jr.key_data(eqx_rng.derive(k, 7))).all()
        hashed = np.array([2**40 + 7, -5], dtype=np.int64)
        wide = eqx_rng.example_keys(k, hashed, bits=64)
        one = eqx_rng.derive(k, *eqx_rng.id_halves(2**40 + 7))
        assert (jr.key_data(wide[0]) == jr.key_data(one)).all()
        ```
    """
    if bits == 32:
        _check_ids(ids)
        return _example_keys(key, ids)
    if bits == 64:
        hi, lo = _halves(ids)
        return _example_keys64(key, hi, lo)
    raise ValueError(f"`example_keys(..., bits=...)` is 32 or 64, got {bits!r}.")


@jax.jit
def _example_keys(key: Key, ids: Array) -> KeyGrid:
    return jax.vmap(_fold_in_u32, in_axes=(None, 0))(key, ids.astype(jnp.uint32))


@jax.jit
def _example_keys64(key: Key, hi: Array, lo: Array) -> KeyGrid:
    def one(h: Array, l: Array) -> Key:
        return jr.fold_in(jr.fold_in(key, h), l)

    return jax.vmap(one)(hi, lo)


__all__ = ["example_keys", "grid_keys", "id_halves"]
