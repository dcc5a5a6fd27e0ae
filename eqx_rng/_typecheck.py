"""The `typecheck` decorator: jaxtyping shape contracts checked by beartype.

Checks run when a function is called; under `jax.jit` that is once, at trace time, so
they cost nothing in the compiled program. Set the environment variable
`EQX_RNG_TYPECHECK=0` before importing `eqx_rng` to turn them off.
"""

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from ._custom_types import _LEGACY_KEY_HINT

_T = TypeVar("_T")

_ENABLED: bool = os.environ.get("EQX_RNG_TYPECHECK", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)


def typecheck_enabled() -> bool:
    """Whether `typecheck` checks calls (read once from `EQX_RNG_TYPECHECK` at import).

    !!! Example

        ```python
        assert eqx_rng.typecheck_enabled() in (True, False)
        ```
    """
    return _ENABLED


def _is_legacy_key(x: Any) -> bool:
    if isinstance(x, jax.Array | np.ndarray):
        dtype = x.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return False
        return dtype == np.uint32 and x.ndim >= 1 and x.shape[-1] == 2
    return False


def _mentions_legacy_key(args: tuple, kwargs: dict) -> bool:
    leaves = jax.tree_util.tree_leaves((args, kwargs))
    return any(_is_legacy_key(leaf) for leaf in leaves)


def typecheck(fn: _T) -> _T:
    """Check a function's jaxtyping annotations with beartype when it is called.

    The same as `jaxtyping.jaxtyped(typechecker=beartype)`, plus a pointer to
    `eqx_rng.as_key` when the failing call was given a legacy `uint32[2]` key. Under
    `jax.jit` the check runs once, at trace time. A no-op when `EQX_RNG_TYPECHECK=0`
    was set before import.

    **Arguments:**

    - `fn`: A function, method or dataclass (for example an `eqx.Module`).

    **Returns:**

    The checked function (or `fn` unchanged when checking is off).

    **Raises:**

    A `jaxtyping.TypeCheckError` (a `TypeError`) naming the argument and the
    dimension when a call breaks the annotations.

    !!! Example

        ```python
        from jaxtyping import Array, Float

        @eqx_rng.typecheck
        def total(x: Float[Array, " n"]) -> Float[Array, ""]:
            return jnp.sum(x)

        total(jnp.ones(3))
        ```
    """
    if not _ENABLED:
        return fn
    if isinstance(fn, type):
        return jaxtyped(typechecker=beartype)(fn)
    checked: Callable[..., Any] = jaxtyped(typechecker=beartype)(fn)  # type: ignore[arg-type]

    @functools.wraps(fn)  # type: ignore[arg-type]
    def wrapper(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except TypeCheckError as e:
            if _mentions_legacy_key(args, kwargs):
                raise TypeCheckError(f"{e}\n\n{_LEGACY_KEY_HINT}") from None
            raise

    return wrapper  # type: ignore[return-value]
