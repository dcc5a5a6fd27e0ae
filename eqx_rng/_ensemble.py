"""`eqx_rng.ensemble`: build `n` chains of a model in one vectorised call."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from ._custom_types import Key
from ._distinct import check_distinct_keys
from ._typecheck import typecheck
from ._vmap import vmap


@typecheck
def ensemble(
    make: Callable, key: Key, n: int | np.integer, *args: Any, **kwargs: Any
) -> Any:
    """Build `n` chains: chain `c` is `make(*args, **kwargs, key=derive(key, c))`.

    The chains are built as one vectorised call (`make` is traced once, not called
    `n` times), and the result is what `make` returns with a leading chain axis on
    every array leaf; other leaves (activation functions, static fields) are kept
    as they are. Chain `c` depends on `key` and `c` only, so the first chains of a
    larger ensemble are the same, bitwise, as a smaller one's. Works with
    `eqx.nn.make_with_state(Model)`: the chain axis goes on the model and on the
    `State`.

    The build is compiled once per `make`, `n` and non-array arguments (`make` is a
    static argument: pass the same object, e.g. `make = eqx.nn.make_with_state(M)`
    made once, to reuse the compiled build). JAX array arguments are traced; NumPy
    scalars (a width computed as `np.prod(shape)`) are static, so `make` sees their
    values. A `make` that reads the value of a JAX array argument in Python
    (`if scale > 1`) is built without compiling, eagerly, as it would be called.

    What `make` returns is checked with `eqx_rng.debug.check_distinct_keys`: a key
    leaf that holds the same key in two chains (an optimizer state seeded with a
    fixed key, `optax.add_noise(..., key=0)`, say) would give those chains the same
    random numbers, and raises `DuplicateKeyError` naming the leaf. Under `jax.jit`
    the result is traced and cannot be checked.

    **Arguments:**

    - `make`: A callable taking a keyword `key`, e.g. a Module class.
    - `key`: A typed scalar key.
    - `n`: The number of chains, `>= 1`.
    - `*args`, `**kwargs`: Passed unchanged to every call of `make` (shared by
        every chain).

    **Returns:**

    `make`'s output with a leading axis of size `n` on every array leaf.

    **Raises:**

    `ValueError` if `n < 1`; a `TypeError` if `key` is not a typed scalar key;
    `DuplicateKeyError` if two chains of the result hold the same PRNG key.

    !!! Example

        ```python
        key = jr.key(0)
        models = eqx_rng.ensemble(eqx.nn.Linear, key, 4, 3, 2)
        assert models.weight.shape == (4, 2, 3)
        one = eqx.nn.Linear(3, 2, key=eqx_rng.derive(key, 1))
        assert jnp.array_equal(models.weight[1], one.weight)
        ```
    """
    if isinstance(n, bool | np.bool_) or int(n) < 1:
        raise ValueError(
            f"`eqx_rng.ensemble(make, key, n)` needs `n >= 1` chains, got {n!r}."
        )

    n = int(n)
    if not _static_parts_hashable(make, args, kwargs):
        # An unhashable static argument cannot key jit's cache: build eagerly.
        return check_distinct_keys(_build(make, n, args, kwargs, key), 0)
    hidden_args, hidden_kwargs = _hide_numpy_scalars((args, kwargs))
    try:
        chains = _build_jitted(make, n, hidden_args, hidden_kwargs, key)
    except _CONCRETE_VALUE_ERRORS:
        # `make` reads the value of an array argument in Python (`if scale > 1`,
        # `range(width)`), which the compiled build traces: build eagerly, where
        # the arguments keep their values (as before the build was compiled).
        chains = _build(make, n, args, kwargs, key)
    return check_distinct_keys(chains, 0)


def _build(make: Callable, n: int, args: tuple, kwargs: dict, key: Key) -> Any:
    def build(*, key: Key) -> Any:
        return make(*args, **kwargs, key=key)

    build.__qualname__ = getattr(make, "__qualname__", build.__qualname__)
    return vmap(build, axis_size=n)(key=key)


class _NumpyScalar:
    """A NumPy scalar argument, hidden from `eqx.filter_jit` (which would trace it
    as an array) so that it is static: a size computed as `np.prod(shape)` stays a
    concrete number inside `make`. Equal only to a scalar of the same type and
    value, so `np.int32(3)` and `np.int64(3)` compile separate variants."""

    __slots__ = ("value",)

    def __init__(self, value: np.generic):
        self.value = value

    def __hash__(self) -> int:
        return hash((type(self.value), self.value))

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is _NumpyScalar
            and type(other.value) is type(self.value)
            and bool(other.value == self.value)
        )


def _hide_numpy_scalars(tree: Any) -> Any:
    return jtu.tree_map(
        lambda x: _NumpyScalar(x) if isinstance(x, np.generic) else x, tree
    )


def _unhide(tree: Any) -> Any:
    return jtu.tree_map(lambda x: x.value if type(x) is _NumpyScalar else x, tree)


def _build_unhidden(make: Callable, n: int, args: tuple, kwargs: dict, key: Key):
    args, kwargs = _unhide((args, kwargs))
    return _build(make, n, args, kwargs, key)


# The chains are built as one compiled program: run eagerly, every operation of
# `make` under vmap would be compiled on its own (dozens of small XLA compiles for a
# modest model, which cost far more than the one program). `make`, `n`, NumPy
# scalars and the non-array arguments are static (part of the cache key); other
# array arguments are traced.
_build_jitted = eqx.filter_jit(_build_unhidden)

# What `make` raises when it needs the value of a traced argument.
_CONCRETE_VALUE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _static_parts_hashable(make: Callable, args: tuple, kwargs: dict) -> bool:
    try:
        hash(make)
        for leaf in jtu.tree_leaves((args, kwargs)):
            if not eqx.is_array(leaf):
                hash(leaf)
    except TypeError:
        return False
    return True


__all__ = ["ensemble"]
