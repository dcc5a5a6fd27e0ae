"""`scan`: `lax.scan` whose step `t` gets the key `derive(key, t)`."""

import functools
import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._custom_types import _legacy_key_message
from ._keys import derive
from ._util import describe, is_typed_key

_MISSING = object()


def _check_key(key: Any) -> None:
    if is_typed_key(key) and key.shape == ():
        return
    if is_typed_key(key):
        hint = (
            f"an array of keys of shape {tuple(key.shape)}. Step t gets "
            "`derive(key, t)` from the one key; to give each step a key of your own, "
            "pass the keys in `xs`"
        )
    elif isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32:
        raise TypeError(
            _legacy_key_message("eqx_rng.scan(fn)(carry, xs, key=...)", key.shape)
        )
    else:
        hint = f"{describe(key)}; pass `jax.random.key(seed)` or `eqx_rng.as_key(seed)`"
    raise TypeError(
        f"`eqx_rng.scan(fn)(carry, xs, key=...)` takes one typed key, got {hint}."
    )


def _takes_key(fn: Callable) -> bool | None:
    """Whether `fn` accepts a keyword `key` (`None` if its signature is unknown)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(
        p.kind == p.VAR_KEYWORD
        or (p.name == "key" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _scan_length(xs: Any, length: int | None) -> int:
    """The number of steps: `length`, or the leading axis of every array of `xs`."""
    sizes: dict[int, str] = {}
    for path, leaf in jtu.tree_leaves_with_path(xs):
        if not eqx.is_array(leaf):
            raise ValueError(
                f"`eqx_rng.scan`: `xs` holds arrays only (one slice per step), but "
                f"`xs{jtu.keystr(path)}` is {describe(leaf)}; close over it in `fn` "
                "instead."
            )
        if leaf.ndim == 0:
            raise ValueError(
                f"`eqx_rng.scan`: every array of `xs` needs a leading axis (one slice "
                f"per step), but `xs{jtu.keystr(path)}` is a scalar; close over it "
                "in `fn` instead, or stack one value per step."
            )
        sizes.setdefault(leaf.shape[0], f"xs{jtu.keystr(path)}")
    if length is not None:
        sizes.setdefault(length, "length")
    if not sizes:
        raise ValueError(
            "`eqx_rng.scan`: with no arrays in `xs` the number of steps is unknown; "
            "pass `eqx_rng.scan(fn, length=T)`."
        )
    if len(sizes) > 1:
        found = ", ".join(f"{name} -> {n}" for n, name in sizes.items())
        raise ValueError(
            f"`eqx_rng.scan`: the leading axis of every array of `xs` (and `length`, "
            f"if given) is the number of steps, and they disagree: {found}."
        )
    return next(iter(sizes))


def scan(
    fn: Callable,
    *,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> Callable:
    """`jax.lax.scan` whose step may take a keyword `key`: step `t` gets
    `derive(key, t)`.

    `scan(fn)(carry, xs, key=key)` runs `carry, y = fn(carry, x, key=k)` for each
    slice `x` of `xs` along its leading axis, with `k = eqx_rng.derive(key, t)` for
    the slice at position `t` of `xs` (also with `reverse=True`, which visits the
    positions backwards but keys them by position). So a step's key depends only on
    `key` and its position, never on how many steps run before it, and
    `eqx_rng.vmap(scan(fn))` over chains gives chain `c`, step `t` exactly
    `eqx_rng.grid_keys(key, (C, T))[c, t]`.

    Without `key=`, `fn` is called as `fn(carry, x)`; with `key=None`, as
    `fn(carry, x, key=None)` (for layers that are in inference mode). Non-array
    leaves of `carry` (activation functions, Python numbers) are held fixed and
    passed to every step; the step must return them unchanged. Composes with `jit`,
    `grad`, `eqx_rng.vmap` and `jax.checkpoint` (pass `jax.checkpoint(fn)` to
    recompute each step in the backward pass instead of storing it).

    **Arguments:**

    - `fn`: `fn(carry, x, *, key) -> (carry, y)`.
    - `length`: The number of steps; needed only when `xs` is `None` (or holds no
        arrays). (Keyword only argument.)
    - `reverse`: Visit the positions of `xs` from last to first, as in
        `lax.scan`; `ys` is indexed by position either way. (Keyword only argument.)
    - `unroll`: As in `lax.scan`. (Keyword only argument.)

    **Returns:**

    `scanned(carry, xs=None, *, key) -> (carry, ys)`, with `ys` the stacked `y`s.

    **Raises:**

    Here: `ValueError` for a negative `length` or `unroll < 1`. At call time:
    `TypeError` if `key` is not one typed key (a legacy key points to
    `eqx_rng.as_key`) or `fn` takes no `key`; `ValueError` if the arrays of `xs`
    disagree on the number of steps or `xs` holds a non-array, or if the step
    changes the carry's structure or its non-array leaves.

    !!! Example

        ```python
        def step(h, x, *, key):
            h = 0.9 * h + x + 0.1 * jr.normal(key, h.shape)
            return h, h

        key = jr.key(0)
        xs = jnp.ones((5, 3))
        h, hs = eqx_rng.scan(step)(jnp.zeros(3), xs, key=key)
        # Step 0 drew from derive(key, 0):
        h0, _ = step(jnp.zeros(3), xs[0], key=eqx_rng.derive(key, 0))
        assert jnp.allclose(hs[0], h0) and hs.shape == (5, 3)
        ```
    """
    if length is not None and (
        isinstance(length, bool) or not isinstance(length, int) or length < 0
    ):
        raise ValueError(
            f"`eqx_rng.scan(length=...)` is None or an int >= 0, got {length!r}."
        )
    if not isinstance(unroll, bool) and (not isinstance(unroll, int) or unroll < 1):
        raise ValueError(
            f"`eqx_rng.scan(unroll=...)` is an int >= 1 or a bool, got {unroll!r}."
        )
    name = _fn_name(fn)

    @functools.wraps(fn)
    def scanned(carry: Any, xs: Any = None, *, key: Any = _MISSING) -> Any:
        if key is not _MISSING and key is not None:
            _check_key(key)
        if key is not _MISSING and _takes_key(fn) is False:
            raise TypeError(
                f"`eqx_rng.scan(fn)(..., key=...)`: `fn` ({name}) takes no keyword "
                "`key`; define it as `fn(carry, x, *, key)`, or call without `key=`."
            )
        n = _scan_length(xs, length)
        dynamic, static = eqx.partition(carry, eqx.is_array)
        in_def = jtu.tree_structure(carry)

        def body(dyn: Any, t_x: tuple) -> tuple:
            t, x = t_x
            c = eqx.combine(dyn, static)
            if key is _MISSING:
                out = fn(c, x)
            else:
                out = fn(c, x, key=None if key is None else derive(key, t))
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"`eqx_rng.scan`: `fn` ({name}) must return `(carry, y)`, got "
                    f"{type(out).__name__}."
                )
            new_carry, y = out
            new_dyn, new_static = eqx.partition(new_carry, eqx.is_array)
            if jtu.tree_structure(new_carry) != in_def or not eqx.tree_equal(
                new_static, static
            ):
                raise ValueError(
                    f"`eqx_rng.scan`: `fn` ({name}) must return a carry with the "
                    "structure and non-array leaves of the carry it got; got "
                    f"{jtu.tree_structure(new_carry)} for {in_def}. Return arrays "
                    "where the input had arrays (`jnp.asarray(...)`)."
                )
            return new_dyn, y

        ts = jnp.arange(n, dtype=jnp.int32)
        dynamic, ys = lax.scan(
            body, dynamic, (ts, xs), length=n, reverse=reverse, unroll=unroll
        )
        return eqx.combine(dynamic, static), ys

    return scanned


__all__ = ["scan"]
