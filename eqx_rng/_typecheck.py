"""The `typecheck` decorator: jaxtyping shape contracts checked by beartype.

Checks run when a function is called; under `jax.jit` that is once, at trace time, so
they cost nothing in the compiled program. Set the environment variable
`EQX_RNG_TYPECHECK=0` before importing `eqx_rng` to turn them off.
"""

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from ._custom_types import _LEGACY_KEY_FIX
from ._util import is_legacy_key

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


def _legacy_key_params(fn: Callable[..., Any], args: tuple, kwargs: dict) -> list[str]:
    """The names of the key parameters of `fn` (named `key` or annotated with a key
    type) given a legacy key; other arguments (a `uint32[2]` array of ids, a tree
    holding raw keys) are never blamed."""
    try:
        signature = inspect.signature(fn)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return []
    names = []
    for name, value in bound.arguments.items():
        annotation = str(signature.parameters[name].annotation)
        is_key_param = name == "key" or "Key[" in annotation
        if is_key_param and is_legacy_key(value):
            names.append(f"`{name}`")
    return names


def _call_name(fn: Callable[..., Any], args: tuple) -> str:
    """`derive`, or `Dropout.__call__` for a method (named after the instance's
    class, not the base class that defines it)."""
    qualname = getattr(fn, "__qualname__", getattr(fn, "__name__", "this function"))
    if (
        "." in qualname
        and args
        and qualname.split(".")[0] in {c.__name__ for c in type(args[0]).__mro__}
    ):
        return f"{type(args[0]).__name__}.{qualname.rsplit('.', 1)[1]}"
    return qualname


def _legacy_key_error(name: str, params: list[str]) -> TypeCheckError:
    return TypeCheckError(
        f"{_LEGACY_KEY_FIX}\n`{name}` got a legacy `uint32[2]` key (from "
        f"`jax.random.PRNGKey`) for {' and '.join(params)}; eqx_rng takes typed PRNG "
        "keys."
    )


def typecheck(fn: _T) -> _T:
    """Check a function's jaxtyping annotations with beartype when it is called.

    The same as `jaxtyping.jaxtyped(typechecker=beartype)`, except that a failing
    call given a legacy `uint32[2]` key (from `jax.random.PRNGKey`) raises a short
    error whose first line is the fix (`eqx_rng.as_key(key)`, or
    `jax.random.key(seed)`) and whose second names the function and the argument,
    instead of the type checker's report. Under
    `jax.jit` the check runs once, at trace time. A no-op when `EQX_RNG_TYPECHECK=0`
    was set before import.

    **Arguments:**

    - `fn`: A function, method or dataclass (for example an `eqx.Module`).

    **Returns:**

    The checked function (or `fn` unchanged when checking is off).

    **Raises:**

    A `jaxtyping.TypeCheckError` (a `TypeError`) naming the argument and the
    dimension when a call breaks the annotations; for a legacy key, the short
    message above.

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
        except TypeCheckError:
            # A legacy key is the commonest cause for a user coming from
            # `jax.random.PRNGKey`: a short error whose first line is the fix,
            # instead of the type checker's report.
            params = _legacy_key_params(fn, args, kwargs)  # type: ignore[arg-type]
            if params:
                name = _call_name(fn, args)  # type: ignore[arg-type]
                raise _legacy_key_error(name, params) from None
            raise

    return wrapper  # type: ignore[return-value]
