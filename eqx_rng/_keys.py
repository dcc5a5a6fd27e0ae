"""Keys derived from names and indices, never from call order.

Every function here is built from `jax.random.fold_in`, so what it returns does not
depend on `jax_threefry_partitionable`, on the batch size, on the number of chains or
devices, or on `PYTHONHASHSEED`.
"""

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Integer, PyTree

from ._custom_types import Key, KeyGrid
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


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


@typecheck
def split_like(
    key: Key,
    tree: PyTree,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
) -> PyTree:
    """One key per array leaf of `tree`, derived from the leaf's key path.

    The key of a leaf at path `p` is `derive(key, jax.tree_util.keystr(p))`, so it
    does not change when other leaves are added, removed or reordered. Array leaves
    are JAX and NumPy arrays; every other leaf (Python scalars, functions, `None`
    subtrees) gets `None`.

    **Arguments:**

    - `key`: A typed scalar key.
    - `tree`: Any pytree, for example an `eqx.Module`.
    - `is_leaf`: Optional, as in `jax.tree_util.tree_flatten`. (Keyword only
        argument.)

    **Returns:**

    A pytree of the same structure with a key or `None` at each leaf.

    !!! Example

        ```python
        keys = eqx_rng.split_like(jr.key(0), {"w": jnp.ones(3), "n": 2})
        assert keys["n"] is None
        ```
    """
    leaves_with_path, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    keys = [
        derive(key, jtu.keystr(path)) if _is_array(leaf) else None
        for path, leaf in leaves_with_path
    ]
    return jtu.tree_unflatten(treedef, keys)


@typecheck
def tree_normal(key: Key, tree: PyTree) -> PyTree:
    """Standard normal noise shaped and typed like each floating-point leaf.

    Leaf `x` with `split_like` key `k` gets `jax.random.normal(k, x.shape, x.dtype)`
    (complex leaves get complex normal noise; a NumPy float64 leaf gets float32
    noise unless x64 is on, as JAX would make of it); other leaves get `None`. Draws for
    different leaves are independent, and a leaf's draw does not change when other
    leaves are added.

    **Arguments:**

    - `key`: A typed scalar key.
    - `tree`: Any pytree.

    **Returns:**

    A pytree of the same structure: noise for inexact array leaves, else `None`.

    !!! Example

        ```python
        params = {"w": jnp.ones((2, 3)), "step": jnp.array(0)}
        noise = eqx_rng.tree_normal(jr.key(0), params)
        assert noise["w"].shape == (2, 3) and noise["step"] is None
        ```
    """
    keys = split_like(key, tree)

    def draw(leaf: Any, k: Any) -> Any:
        if k is None or not jnp.issubdtype(leaf.dtype, jnp.inexact):
            return None
        # A NumPy float64 leaf without x64 gets float32 noise, as `jnp.asarray(leaf)`
        # would, without JAX's truncation warning.
        return jr.normal(k, leaf.shape, jax.dtypes.canonicalize_dtype(leaf.dtype))

    leaves, treedef = jtu.tree_flatten(tree)
    key_leaves = treedef.flatten_up_to(keys)
    return jtu.tree_unflatten(
        treedef, [draw(leaf, k) for leaf, k in zip(leaves, key_leaves, strict=True)]
    )


__all__ = [
    "as_key",
    "derive",
    "example_keys",
    "grid_keys",
    "id_halves",
    "split_like",
    "string_hash",
    "tree_normal",
]
