"""`eqx_rng.ensemble`: build `n` chains of a model in one vectorised call."""

from collections.abc import Callable
from typing import Any

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

    def build(*, key: Key) -> Any:
        return make(*args, **kwargs, key=key)

    build.__qualname__ = getattr(make, "__qualname__", build.__qualname__)
    chains = vmap(build, axis_size=int(n))(key=key)
    return check_distinct_keys(chains, 0)


__all__ = ["ensemble"]
