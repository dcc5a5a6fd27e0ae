"""`eqx_rng.shared`: mark an argument of an `eqx_rng.vmap` call as shared on purpose."""

from typing import Any

import jax.tree_util as jtu

_OUTSIDE_MSG = (
    "`eqx_rng.shared(...)` only marks an argument of an `eqx_rng.vmap` call "
    "(`eqx_rng.vmap(f)(xs, eqx_rng.shared(value))`), which unwraps it before `f` "
    "sees it; here it reached {where}. Pass the value itself (`shared.value`), or "
    "call the function through `eqx_rng.vmap`."
)


class Shared:
    """The marker `eqx_rng.shared(value)` returns; see `eqx_rng.shared`.

    Not a pytree: `eqx_rng.vmap` finds it among its arguments and unwraps it. Used
    anywhere else, it refuses array conversion and attribute access with a message
    saying so.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"`eqx_rng.shared(...)` is immutable; cannot set {name}.")

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(_OUTSIDE_MSG.format(where=f"code reading `.{name}`"))

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_OUTSIDE_MSG.format(where="a NumPy operation"))

    def __repr__(self) -> str:
        return (
            f"eqx_rng.shared({self.value!r}) (only an `eqx_rng.vmap` argument "
            f"marker: pass the value itself elsewhere)"
        )


def shared(value: Any) -> Shared:
    """Mark one argument of an `eqx_rng.vmap` call as shared by every mapped call.

    The argument is passed unmapped (the same in every call), unwrapped before the
    function sees it, and exempt from `BroadcastKeyError`: the function may draw from
    keys inside it without folding in per-call data, because every call is meant to
    draw the same numbers (one weight sample of a Bayes-by-Backprop layer for the
    whole batch, one random feature map, one permutation). `key=` is still derived
    per call, so per-example noise stays per example.

    It may wrap a whole positional or keyword argument, or a part of one (a subtree
    of a pytree argument). Everything inside is unmapped whatever `in_axes` says for
    the argument as a whole; a per-argument `in_axes` entry (tuple or dict) that maps
    a shared argument is a `ValueError`.

    **Arguments:**

    - `value`: Any pytree (a key, a Module, an array).

    **Returns:**

    A marker that only `eqx_rng.vmap` accepts. Anywhere else it is an error: NumPy
    conversion and attribute access (`.shape`) raise a `TypeError` /
    `AttributeError` saying to pass the value itself; JAX operations and
    `jax.random` raise JAX's `TypeError`, which names the `Shared` type.

    !!! Example

        ```python
        def bayes_layer(x, weight_key, *, key):
            w = jr.normal(weight_key, (3, 3))  # one weight sample for the batch
            return w @ x + 0.1 * jr.normal(key, (3,))  # noise per example

        xs = jnp.ones((8, 3))
        ys = eqx_rng.vmap(bayes_layer)(
            xs, eqx_rng.shared(jr.key(1)), key=jr.key(2)
        )
        w = jr.normal(jr.key(1), (3, 3))
        assert jnp.allclose(ys[0] - ys[1], 0.1 * (
            jr.normal(eqx_rng.derive(jr.key(2), 0), (3,))
            - jr.normal(eqx_rng.derive(jr.key(2), 1), (3,))
        ), atol=1e-5)
        ```
    """
    if isinstance(value, Shared):
        return value
    return Shared(value)


def is_shared(x: Any) -> bool:
    return isinstance(x, Shared)


def unwrap_shared(tree: Any) -> tuple[Any, list[bool], bool]:
    """`tree` with every `Shared` replaced by its value; a flag per leaf of the
    result (True: inside a `Shared`); and whether `tree` itself was a `Shared`."""
    if isinstance(tree, Shared):
        value = tree.value
        return value, [True] * len(jtu.tree_leaves(value)), True
    if not any(isinstance(x, Shared) for x in jtu.tree_leaves(tree, is_leaf=is_shared)):
        return tree, [False] * len(jtu.tree_leaves(tree)), False
    mask = jtu.tree_map(
        lambda x: jtu.tree_map(lambda _: True, x.value) if is_shared(x) else False,
        tree,
        is_leaf=is_shared,
    )
    unwrapped = jtu.tree_map(
        lambda x: x.value if is_shared(x) else x, tree, is_leaf=is_shared
    )
    return unwrapped, jtu.tree_leaves(mask), False


__all__ = ["Shared", "is_shared", "shared", "unwrap_shared"]
