"""The `typecheck` decorator: jaxtyping shape contracts checked by beartype.

Checks run when a function is called; under `jax.jit` that is once, at trace time, so
they cost nothing in the compiled program. Set the environment variable
`EQX_RNG_TYPECHECK=0` before importing `eqx_rng` to turn them off.

A check costs about a millisecond (jaxtyping and beartype walk every annotation), and
a traced model calls the same layer with the same argument types many times (two
Dropouts, a chain of blocks, a scan body traced again, `derive` per step). So each
checked function remembers the signatures it has passed (`_signature`: the
arguments' tree structure, each array's type, shape and dtype, every other leaf's
type and value) and does not check one again. Whether a call passes depends only on
these, so no check is lost.
"""

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.tree_util as jtu
import numpy as np
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from ._custom_types import _LEGACY_KEY_FIX
from ._util import is_legacy_key

Fn = TypeVar("Fn")

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


# Signatures remembered per checked function (oldest forgotten first).
_MAX_SIGNATURES = 256


def _signature(args: tuple, kwargs: dict) -> Any:
    """A hashable description of a call's arguments on which the check's outcome
    depends, or `None` if one cannot be made (an unhashable leaf or static field).

    Arrays (concrete, NumPy or tracers) are described by type, shape and dtype,
    other leaves by type and value; the tree structure includes Modules' static
    fields.
    """
    leaves, treedef = jtu.tree_flatten((args, kwargs))
    parts: list = [treedef]
    for x in leaves:
        if isinstance(x, jax.Array | np.ndarray):
            parts.append((type(x), x.shape, x.dtype))
        else:
            parts.append((type(x), x))
    key = tuple(parts)
    try:
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


class _Seen:
    """The signatures one function has passed, at most `_MAX_SIGNATURES`."""

    __slots__ = ("keys",)

    def __init__(self):
        self.keys: dict = {}

    def __contains__(self, key: Any) -> bool:
        try:
            return key in self.keys
        except (TypeError, ValueError):  # a static leaf whose `==` is not a bool
            return False

    def add(self, key: Any) -> None:
        try:
            self.keys[key] = None
        except (TypeError, ValueError):
            return
        if len(self.keys) > _MAX_SIGNATURES:
            del self.keys[next(iter(self.keys))]


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


def typecheck(fn: Fn) -> Fn:
    """Check a function's jaxtyping annotations with beartype when it is called.

    The same as `jaxtyping.jaxtyped(typechecker=beartype)`, except that a failing
    call given a legacy `uint32[2]` key (from `jax.random.PRNGKey`) raises a short
    error whose first line is the fix (`eqx_rng.as_key(key)`, or
    `jax.random.key(seed)`) and whose second names the function and the argument,
    instead of the type checker's report. Under
    `jax.jit` the check runs once, at trace time. A no-op when `EQX_RNG_TYPECHECK=0`
    was set before import.

    A function checks each signature once: a call whose arguments have the tree
    structure, array types, shapes and dtypes, and other values of a call that
    passed (arguments and return value) is not checked again.

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
    seen = _Seen()

    @functools.wraps(fn)  # type: ignore[arg-type]
    def wrapper(*args, **kwargs):
        key = _signature(args, kwargs)
        if key is not None and key in seen:
            return fn(*args, **kwargs)  # type: ignore[operator]
        try:
            out = checked(*args, **kwargs)
        except TypeCheckError:
            # A legacy key is the commonest cause for a user coming from
            # `jax.random.PRNGKey`: a short error whose first line is the fix,
            # instead of the type checker's report.
            params = _legacy_key_params(fn, args, kwargs)  # type: ignore[arg-type]
            if params:
                name = _call_name(fn, args)  # type: ignore[arg-type]
                raise _legacy_key_error(name, params) from None
            raise
        if key is not None:
            seen.add(key)
        return out

    return wrapper  # type: ignore[return-value]
