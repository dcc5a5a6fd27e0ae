"""Type aliases shared across the package.

`Key` is a typed scalar PRNG key (`jax.random.key(0)`); a legacy `uint32[2]` key made
by `jax.random.PRNGKey` does not pass it. Arrays of keys are written with jaxtyping
directly, for example `jaxtyping.Key[Array, "chains batch"]`.
"""

from typing import TypeAlias

import jaxtyping
import numpy as np
from jaxtyping import Array

Key: TypeAlias = jaxtyping.Key[Array, ""]
"""A typed scalar PRNG key, as made by `jax.random.key(seed)` or `eqx_rng.as_key`."""

KeyGrid: TypeAlias = jaxtyping.Key[Array, "*shape"]
"""An array of typed PRNG keys of any shape."""

Rate: TypeAlias = float | int | np.floating | np.integer | Array
"""A rate or scale argument of the `eqx_rng.nn` layers (`Dropout(p)`,
`GaussianNoise(std)`, ...): a Python or NumPy real number, stored as a Python
`float` (static under `eqx.filter_jit`: a new value recompiles), or a JAX scalar
array of floating dtype, stored as is (traced, so a vmapped ensemble may give each
member its own rate). Booleans and arrays of other shapes or dtypes are a
`TypeError` naming the layer and the argument.
"""

_LEGACY_KEY_FIX = (
    "Convert the key with `eqx_rng.as_key(key)`, or make a typed one with "
    "`jax.random.key(seed)`."
)
"""The first line of every legacy-key error: the fix."""


_LEGACY_KEYS_FIX = (
    "Convert the keys with `jax.random.wrap_key_data(keys)`, or make typed ones with "
    "`jax.random.split(jax.random.key(seed), n)`."
)
"""The fix for an array of legacy keys (`uint32[n, 2]`)."""


def _legacy_key_message(call: str, shape: tuple[int, ...], arg: str = "key") -> str:
    """The error for a legacy key (or array of them) given to `call` as `arg`: the
    fix on the first line, then what `call` received (the form of the `typecheck`
    legacy-key error)."""
    fix = _LEGACY_KEY_FIX if len(shape) <= 1 else _LEGACY_KEYS_FIX
    dims = ", ".join(str(d) for d in shape)
    return (
        f"{fix}\n`{call}` got a legacy `uint32[{dims}]` key (from "
        f"`jax.random.PRNGKey`) for `{arg}`; eqx_rng takes typed PRNG keys."
    )
